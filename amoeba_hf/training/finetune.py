"""Stage 2 end to end: attach SMoL, build the data, run `AmoebaTrainer`, resume from the last checkpoint."""

import os
from dataclasses import dataclass
from pathlib import Path

from datasets import concatenate_datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data import TEMPLATES, TEXT_FIELDS, instruction_dataset, load_instructions, load_records, text_dataset
from .trainer import AmoebaTrainer, AmoebaTrainingArguments


@dataclass
class FinetuneSettings:
    """The recipe; defaults follow AmoebaLLM scaled to a CPU budget (see docs/usage.md)."""

    data: list[str]
    steps: int = 200
    batch_size: int = 2
    grad_accum: int = 4
    learning_rate: float = 2e-4
    max_grad_norm: float = 0.3
    max_prompt_tokens: int = 256
    max_response_tokens: int = 128
    text_block_size: int = 256
    template: str = "auto"
    experts: int = 5
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    router_noise: bool = True
    random_shapes: int = 2
    widths: list[float] | None = None
    distillation: bool = True
    distill_teacher: str = "largest"
    loss_balancing: bool = True
    train_base: bool = False
    save_steps: int = 50
    seed: int = 0

    def validate(self) -> None:
        """Refuse settings the Trainer would silently reinterpret (max_steps=0 trains by epochs; no experts would
        train every base weight), before any folder is created or a model is loaded."""
        counts = {
            "steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "max_prompt_tokens": self.max_prompt_tokens, "max_response_tokens": self.max_response_tokens,
            "text_block_size": self.text_block_size, "top_k": self.top_k, "rank": self.rank,
            "save_steps": self.save_steps,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.experts < 1:
            raise ValueError(
                f"experts must be >= 1 (1 = plain LoRA), got {self.experts}: Stage 2 trains LoRA experts on a frozen "
                "base (train_base, --train-base, trains the base weights as well)"
            )
        if self.random_shapes < 0:
            raise ValueError(f"random_shapes must be >= 0, got {self.random_shapes}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for width in self.widths or ():
            if not 0.0 < width <= 1.0:
                raise ValueError(f"width {width} is outside (0, 1]")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {self.template!r}; choose from {TEMPLATES}")


def is_instruction_file(path: str) -> bool:
    """Instruction data (Alpaca records with `instruction`/`output`) rather than plain text, judged by the file's head."""
    return not path.endswith(".txt") and '"instruction"' in Path(path).read_text(errors="replace")[:4096]


def check_data(paths: list[str]) -> None:
    """Fail fast, before a model is loaded: every file exists, parses and has the fields its kind needs."""
    if not paths:
        raise ValueError("no training data given")
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"training data {path} does not exist")
        if is_instruction_file(path):
            load_instructions(path)
        else:
            load_records(path, TEXT_FIELDS)


def build_dataset(paths: list[str], tokenizer: PreTrainedTokenizerBase, settings: FinetuneSettings):
    """Instruction files (with `instruction`/`output`) and text files, tokenised and concatenated."""
    check_data(paths)
    parts = []
    for path in paths:
        if is_instruction_file(path):
            parts.append(instruction_dataset(path, tokenizer, settings.max_prompt_tokens, settings.max_response_tokens,
                                             settings.template))
        else:
            parts.append(text_dataset(path, tokenizer, settings.text_block_size))
    return concatenate_datasets(parts).shuffle(seed=settings.seed)


def last_complete_checkpoint(work_dir: str | os.PathLike) -> str | None:
    """Newest `checkpoint-N` whose trainer state was written (last, by the Trainer); None if there is none.

    A process killed while saving leaves a checkpoint folder without it, and resuming from that one would fail.
    """
    folder = Path(work_dir)
    if not folder.is_dir():
        return None
    steps = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if suffix.isdigit() and (path / TRAINER_STATE_NAME).is_file():
            steps[int(suffix)] = path
    return str(steps[max(steps)]) if steps else None


def finetune(model, tokenizer: PreTrainedTokenizerBase, settings: FinetuneSettings, work_dir: str | os.PathLike,
             callbacks: list[TrainerCallback] | None = None, **training_overrides) -> AmoebaTrainer:
    """Train `model` one-for-all; checkpoints go to `work_dir`, and a re-run resumes from the newest complete one."""
    settings.validate()
    dataset = build_dataset(settings.data, tokenizer, settings)
    if not model.config.smol_experts and settings.experts:
        set_seed(settings.seed)
        model.enable_smol(experts=settings.experts, top_k=min(settings.top_k, settings.experts), rank=settings.rank,
                          alpha=settings.alpha, router_noise=settings.router_noise, train_base=settings.train_base,
                          exact_full_shape=settings.distill_teacher == "base")
    args = AmoebaTrainingArguments(
        output_dir=str(work_dir),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=settings.max_grad_norm,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=max(1, min(10, settings.steps // 10)),
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        random_shapes=settings.random_shapes,
        shape_widths=settings.widths,
        distillation=settings.distillation,
        distill_teacher=settings.distill_teacher,
        loss_balancing=settings.loss_balancing,
        shape_seed=settings.seed,
        dataloader_num_workers=0,
        **training_overrides,
    )
    trainer = AmoebaTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
    )
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(work_dir))
    model.eval()
    return trainer

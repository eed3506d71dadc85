"""Stage 2 end to end: attach SMoL, build the data, run `AmoebaTrainer`, resume from the last checkpoint."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from datasets import concatenate_datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..fingerprint import (
    Fingerprint,
    data_digests,
    loaded_model_identity,
    model_dtype,
    processes,
    settings_record,
)
from ..modeling.shape_space import check_widths
from .data import (
    TEMPLATES,
    DataFields,
    ensure_pad_token,
    instruction_dataset,
    is_file_source,
    is_instruction_data,
    load_documents,
    load_instructions,
    text_dataset,
)
from .trainer import SHAPE_SAMPLINGS, TEACHERS, AmoebaTrainer, AmoebaTrainingArguments, check_student_order

LR_SCHEDULES = ("constant", "linear", "cosine")
# TrainingArguments that change how training runs, not what it learns: left out of the resume fingerprint.
OPERATIONAL_TRAINING_ARGUMENTS = (
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "dataloader_num_workers", "use_cpu", "disable_tqdm",
    "logging_steps", "report_to",
)


@dataclass
class TrainerSettings:
    """The Trainer's own arguments that matter at scale (precision, memory, the distributed engine), under their
    `TrainingArguments` names: the flags of `amoeba train` and `amoeba build` beside the recipe.

    Run several processes with `accelerate launch`: DDP as it is, FSDP with `--fsdp`. DeepSpeed is refused: the
    sandwich runs one backward pass per shape, and its engine steps the optimizer after each of them.
    Precision (bf16 as resolved, fp16, tf32) and FSDP (it decides how checkpoints are sharded) are in the resume
    fingerprint; gradient checkpointing and dataloader workers are not (`OPERATIONAL_TRAINING_ARGUMENTS`).
    """

    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 autocast (default: on when training on a GPU that supports it)"}
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 autocast with loss scaling (GPUs without bf16)"})
    tf32: bool | None = field(default=None, metadata={"help": "TF32 matmuls on Ampere or newer GPUs"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward: less memory, about a third more time"}
    )
    fsdp: str = field(
        default="", metadata={"help": "FSDP options of TrainingArguments, e.g. 'full_shard auto_wrap'"}
    )
    fsdp_config: str | None = field(default=None, metadata={"help": "FSDP config JSON (e.g. {\"fsdp_version\": 2})"})
    deepspeed: str | None = field(default=None, metadata={"help": "refused, see above: use DDP or --fsdp"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "processes loading batches"})

    def validate(self) -> None:
        if self.deepspeed:
            raise ValueError(
                "DeepSpeed is not supported: one-for-all training runs one backward pass per shape, and DeepSpeed "
                "steps the optimizer after each; use DDP (accelerate launch) or FSDP (--fsdp 'full_shard auto_wrap')"
            )
        if self.bf16 and self.fp16:
            raise ValueError("choose one of --bf16 and --fp16")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")

    def training_arguments(self) -> dict:
        """`TrainingArguments` fields; bf16 on by default where a GPU supports it, checkpointing non-reentrant (the
        reentrant form cannot backpropagate once per shape through the same inputs). `use_cpu` where there is no
        accelerator: without it the Trainer treats `torchrun`/`accelerate launch` processes on CPUs as unrelated
        single processes, each training alone."""
        self.validate()
        bf16 = self.bf16
        if bf16 is None:
            bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        arguments = {"bf16": bf16, "fp16": self.fp16, "gradient_checkpointing": self.gradient_checkpointing,
                     "dataloader_num_workers": self.dataloader_num_workers,
                     "use_cpu": not torch.accelerator.is_available()}
        if self.gradient_checkpointing:
            arguments["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        if self.tf32 is not None:
            arguments["tf32"] = self.tf32
        if self.fsdp:
            arguments.update(fsdp=self.fsdp, fsdp_config=self.fsdp_config)
        return arguments


@dataclass
class FinetuneSettings:
    """Stage 2's recipe, also the flags of `amoeba train`; defaults follow AmoebaLLM scaled to a CPU budget.

    `training_arguments` turns it into the `AmoebaTrainingArguments` the Trainer runs with. All but the
    `OPERATIONAL` settings are in the fingerprint that guards resumption (the checkpoint interval does not change the
    result: a resumed run ends with the weights of an uninterrupted one).
    """

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("save_steps",)

    data: list[str] = field(
        default_factory=list,
        metadata={"help": "Alpaca JSON/JSONL (instruction, input, output) and/or text (.txt, JSONL `text`)",
                  "nargs": "+", "required": True},
    )
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(
        default=2,
        metadata={"help": "sequences per device and micro-batch", "aliases": ("--per-device-train-batch-size",)},
    )
    grad_accum: int = field(
        default=4, metadata={"help": "micro-batches per optimizer step", "aliases": ("--gradient-accumulation-steps",)}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate", "flag": "--lr"})
    lr_schedule: str = field(
        default="constant",
        metadata={"help": "learning rate over the steps: constant, or decayed to 0 (linear, cosine)",
                  "choices": LR_SCHEDULES},
    )
    max_prompt_tokens: int = field(default=256, metadata={"help": "instruction prompts keep their last N tokens"})
    max_response_tokens: int = field(default=128, metadata={"help": "answers keep their first N tokens"})
    experts: int = field(default=5, metadata={"help": "LoRA experts per linear; 1 = plain LoRA"})
    top_k: int = field(default=2, metadata={"help": "experts each shape mixes"})
    rank: int = field(default=8, metadata={"help": "LoRA rank of each expert"})
    random_shapes: int = field(
        default=2,
        metadata={"help": "random shapes per step besides the smallest and (unless --teacher base) the largest"},
    )
    widths: list[float] | None = field(
        default=None, metadata={"help": "widths to sample, e.g. 1,0.875,0.75 (default: uniform range)"}
    )
    shape_sampling: str = field(
        default="uniform",
        metadata={"help": "how the random shapes are drawn: uniform, or loss (in proportion to their running KL from "
                          "the teacher: the batch goes to the shapes furthest from it)", "choices": SHAPE_SAMPLINGS},
    )
    teacher_assistant: bool = field(
        default=False,
        metadata={"help": "distil each student from the next larger shape of its step instead of from the teacher"},
    )
    distillation: bool = field(default=True, metadata={"help": "train every shape on labels (ablation)"})
    distill_teacher: str = field(
        default="largest",
        metadata={
            "help": "distillation teacher: the largest shape, trained on labels (paper), or the frozen base model, "
            "which then stays the full shape exactly (with --train-base: a frozen copy, and the full shape trains "
            "towards it)",
            "choices": TEACHERS, "flag": "--teacher",
        },
    )
    loss_balancing: bool = field(
        default=True, metadata={"help": "disable loss-magnitude balancing (ablation)", "flag": "--no-balancing"}
    )
    router_noise: bool = field(
        default=True,
        metadata={"help": "route without training noise (learns faster on short budgets, see docs/training.md)"},
    )
    train_base: bool = field(default=False, metadata={"help": "also train the base weights (default: frozen)"})
    train_recovery: bool = field(
        default=False,
        metadata={"help": "also train calibration's depth bridges and width corrections (default: frozen; the full "
                          "shape uses neither)"},
    )
    save_steps: int = field(
        default=50, metadata={"help": "checkpoint interval; re-run resumes from the last"}
    )
    seed: int = field(default=0, metadata={"help": "seed of data order, expert initialisation and shape sampling"})
    max_grad_norm: float = field(default=0.3, metadata={"cli": False})
    text_block_size: int = field(default=256, metadata={"cli": False})
    template: str = field(default="auto", metadata={"cli": False})
    alpha: float = field(default=16.0, metadata={"cli": False})

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
        if self.top_k > max(self.experts, 2):
            # The default top_k (2) with one expert is plain LoRA and means the one expert; any other excess would be
            # cut to the expert count while the settings record the value asked for.
            raise ValueError(f"top_k (--top-k) {self.top_k} exceeds experts (--experts) {self.experts}: a shape mixes "
                             f"at most all experts; choose --top-k in 1..{self.experts}")
        if self.random_shapes < 0:
            raise ValueError(f"random_shapes must be >= 0, got {self.random_shapes}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        check_widths(self.widths)
        check_student_order(self.shape_sampling, self.teacher_assistant, self.distillation)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {self.template!r}; choose from {TEMPLATES}")
        if self.distill_teacher not in TEACHERS:
            raise ValueError(f"distill_teacher must be one of {TEACHERS}, got {self.distill_teacher!r}")
        if self.distill_teacher == "base" and not self.distillation:
            raise ValueError(
                "distill_teacher 'base' (--teacher base) distils from the frozen base model; it cannot be combined "
                "with distillation off (--no-distillation)"
            )

    def training_arguments(self, output_dir: str | os.PathLike, **overrides) -> AmoebaTrainingArguments:
        """The Trainer's arguments for this recipe (the one place that maps its names onto the Trainer's);
        `overrides` are further `AmoebaTrainingArguments` fields."""
        arguments = {
            "output_dir": str(output_dir),
            "max_steps": self.steps,
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": self.lr_schedule,
            "max_grad_norm": self.max_grad_norm,
            "save_strategy": "steps",
            "save_steps": self.save_steps,
            "save_total_limit": 2,
            "logging_steps": max(1, min(10, self.steps // 10)),
            "report_to": [],
            "seed": self.seed,
            "data_seed": self.seed,
            "random_shapes": self.random_shapes,
            "shape_widths": self.widths,
            "distillation": self.distillation,
            "distill_teacher": self.distill_teacher,
            "loss_balancing": self.loss_balancing,
            "shape_seed": self.seed,
            "shape_sampling": self.shape_sampling,
            "teacher_assistant": self.teacher_assistant,
        }
        return AmoebaTrainingArguments(**{**arguments, **overrides})


def is_instruction_file(path: str) -> bool:
    """Instruction data (Alpaca records with `instruction`/`output`) rather than plain text, judged by the file's head."""
    return not path.endswith(".txt") and '"instruction"' in Path(path).read_text(errors="replace")[:4096]


def check_data(sources: list[str], data_fields: DataFields = DataFields()) -> None:
    """Fail fast, before a model is loaded: every file exists or Hub dataset (`name[:config][@split]`) loads, and
    each parses and has the fields its kind needs (`data_fields` apply to every source)."""
    if not sources:
        raise ValueError("no training data given")
    for source in sources:
        if is_file_source(source) and not Path(source).is_file():
            raise FileNotFoundError(f"training data {source} does not exist")
        if is_instruction_data(source, data_fields):
            load_instructions(source, data_fields)
        else:
            load_documents(source, "training data", data_fields)


def build_dataset(sources: list[str], tokenizer: PreTrainedTokenizerBase, settings: FinetuneSettings,
                  data_fields: DataFields = DataFields()):
    """Instruction data (with `instruction`/`output`) and text, files or Hub datasets, tokenised and concatenated.

    A tokenizer without a pad token (Llama base) gets its EOS as pad token here, before the collator pads with it.
    """
    check_data(sources, data_fields)
    ensure_pad_token(tokenizer)
    parts = []
    for source in sources:
        if is_instruction_data(source, data_fields):
            parts.append(instruction_dataset(source, tokenizer, settings.max_prompt_tokens,
                                             settings.max_response_tokens, settings.template, data_fields))
        else:
            parts.append(text_dataset(source, tokenizer, settings.text_block_size, data_fields))
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


def trainer_record(training_arguments: dict) -> dict:
    """The result-affecting `TrainingArguments` fields (by flag) and the number of processes, for a fingerprint."""
    record = {f"--{name.replace('_', '-')}": value for name, value in training_arguments.items()
              if name not in OPERATIONAL_TRAINING_ARGUMENTS}
    return {**record, "the number of processes": processes()}


def finetune(model, tokenizer: PreTrainedTokenizerBase, settings: FinetuneSettings, work_dir: str | os.PathLike,
             callbacks: list[TrainerCallback] | None = None, trainer_settings: TrainerSettings | None = None,
             model_identity: dict[str, str] | None = None, **training_overrides) -> AmoebaTrainer:
    """Train `model` one-for-all; checkpoints go to `work_dir`, and a re-run with the same settings, model and data
    resumes from the newest complete one (other ones are refused: ResumeMismatchError). `trainer_settings` choose
    precision, memory savings and the distributed engine. `model_identity` identifies the model's source
    (`source_identity`); without it the loaded model is hashed."""
    settings.validate()
    if settings.train_recovery and not (model.config.depth_bridges or model.config.width_compensation):
        raise ValueError("train_recovery (--train-recovery) trains calibration's depth bridges and width corrections, "
                         "and this model has neither: calibrate it with --depth-bridges or --width-compensation")
    training_overrides = {**(trainer_settings or TrainerSettings()).training_arguments(), **training_overrides}
    fingerprint = Fingerprint(
        {**settings_record(settings), **trainer_record(training_overrides), **model_dtype(model)},
        model_identity or loaded_model_identity(model), data_digests(settings.data),
    )
    fingerprint.guard(work_dir)
    dataset = build_dataset(settings.data, tokenizer, settings)
    if not model.config.smol_experts and settings.experts:
        set_seed(settings.seed)
        model.enable_smol(experts=settings.experts, top_k=min(settings.top_k, settings.experts), rank=settings.rank,
                          alpha=settings.alpha, router_noise=settings.router_noise, train_base=settings.train_base,
                          train_recovery=settings.train_recovery,
                          exact_full_shape=settings.distill_teacher == "base")
    elif model.config.smol_experts:
        model.set_trainable(settings.train_base, settings.train_recovery)
    args = settings.training_arguments(work_dir, **training_overrides)
    if args.should_save:
        fingerprint.record(work_dir)
    trainer = AmoebaTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
    )
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(work_dir))
    model.eval()
    return trainer

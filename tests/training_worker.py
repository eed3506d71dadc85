"""Subprocess side of test_training.py: a DDP run under torchrun, and a `finetune()` run that can be killed.

    torchrun --nproc_per_node 2 training_worker.py ddp RESULT.pt      (or plain python for the 1-process run)
    torchrun --nproc_per_node 2 training_worker.py fsdp RESULT.pt     (FSDP2, full shard, through the Trainer)
    torchrun --nproc_per_node 2 training_worker.py ddp-loss RESULT.pt (DDP, loss-directed shape sampling)
    torchrun --nproc_per_node 2 training_worker.py ddp-full-weights RESULT.pt (or fsdp-: every weight trains)
    python training_worker.py finetune WORK_DIR DATA.json RESULT.pt RECIPE [PAUSE_STEP]

Both run on one thread per process (several processes share the CPU) and save their final weights to RESULT.pt.
"""

import os
import sys
import time

import torch
from conftest import tiny_source, tiny_tokenizer
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, TrainerCallback

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.training.finetune import FinetuneSettings, finetune
from amoeba_hf.training.trainer import AmoebaTrainer, AmoebaTrainingArguments

DDP_GLOBAL_BATCH = 4
DDP_STEPS = 3
FSDP_ARGUMENTS = {
    "fsdp": "full_shard auto_wrap",
    "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["AmoebaDecoderLayer"]},
}


def gathered(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: FSDP2 holds a shard of it (a DTensor) on each process."""
    value = parameter.detach()
    return (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()


def ddp_rows() -> list[dict[str, list[int]]]:
    """16 examples whose response lengths (1..12 tokens) differ between ranks and micro-batches."""
    generator = torch.Generator().manual_seed(3)
    rows = []
    for index in range(16):
        prompt = torch.randint(3, 97, (3 + index % 5,), generator=generator).tolist()
        response = torch.randint(3, 97, (1 + (index * 7) % 12,), generator=generator).tolist()
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def smol_model(full_weights: bool = False) -> AmoebaForCausalLM:
    """Tiny any-shape model with SMoL experts whose B matrices are non-zero, so every LoRA parameter learns at once,
    and bias compensation (input means in place of calibration), which FSDP must compute on whole weights.
    `full_weights`: every weight trains, and the full shape stays expert-free (for the base teacher)."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    generator = torch.Generator().manual_seed(1)
    layers = model.model.layers
    means = [(torch.randn(layer.self_attn.o_proj.in_features, generator=generator),
              torch.randn(layer.mlp.down_proj.in_features, generator=generator)) for layer in layers]
    model.model.permute_widths([torch.arange(layer.self_attn.k_proj.out_features // 16) for layer in layers],
                               [torch.arange(layer.mlp.down_proj.in_features) for layer in layers], input_means=means)
    model.enable_smol(experts=3, top_k=2, rank=4, exact_full_shape=full_weights, train_base=full_weights)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def run_ddp(result_path: str, engine: str = "ddp") -> None:
    """3 SGD steps, global batch 4 x 2 accumulation, whatever the process count; saves weights and the shapes used.
    `engine="fsdp"` shards every decoder layer with FSDP2 (weights gathered back for the comparison); "ddp-loss" is
    DDP with loss-directed shape sampling; "ddp-full-weights" and "fsdp-full-weights" train every weight, distilled
    from the base."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    full_weights = engine.endswith("full-weights")
    model = smol_model(full_weights)
    tokenizer = tiny_tokenizer()
    args = AmoebaTrainingArguments(
        output_dir=os.path.join(os.path.dirname(result_path), f"ddp-out-{world_size}"),
        max_steps=DDP_STEPS,
        per_device_train_batch_size=DDP_GLOBAL_BATCH // world_size,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to=[],
        logging_steps=100,
        disable_tqdm=True,
        ddp_backend="gloo" if world_size > 1 else None,
        use_cpu=True,
        shape_sampling="loss" if engine == "ddp-loss" else "uniform",
        distill_teacher="base" if full_weights else "largest",
        **FSDP_ARGUMENTS if engine.startswith("fsdp") else {},
    )
    trainer = AmoebaTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(ddp_rows()), processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
    )
    shapes = []
    sample_shapes = trainer.sample_shapes

    def recording_sample_shapes(amoeba):
        sandwich = sample_shapes(amoeba)
        shapes.append([tuple(shape) for _, shape in sandwich])
        return sandwich

    trainer.sample_shapes = recording_sample_shapes
    trainer.train()
    rank = trainer.args.process_index
    weights = {name: gathered(p) for name, p in model.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "shapes": shapes}, result_path.replace(".pt", f".rank{rank}.pt"))


class PauseAtStep(TrainerCallback):
    """Announces the step and sleeps, so that the test can SIGKILL the process at a known point."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            print(f"paused at step {self.step}", flush=True)
            time.sleep(600)


FINETUNE_RECIPES = {  # what the resume test varies
    "uniform": {},
    "loss": {"shape_sampling": "loss"},
    "full-weights": {"distill_teacher": "base", "train_base": True, "learning_rate": 1e-3},
}


def run_finetune(work_dir: str, data: str, result_path: str, recipe: str, pause_step: int | None) -> None:
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    settings = FinetuneSettings(
        data=[data], steps=5, batch_size=2, grad_accum=2, experts=3, top_k=2, rank=4, save_steps=2, seed=0,
        **FINETUNE_RECIPES[recipe],
    )
    callbacks = [PauseAtStep(pause_step)] if pause_step is not None else None
    finetune(model, tiny_tokenizer(), settings, work_dir, callbacks=callbacks, disable_tqdm=True, use_cpu=True)
    torch.save(model.state_dict(), result_path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] in ("ddp", "fsdp", "ddp-loss", "ddp-full-weights", "fsdp-full-weights"):
        run_ddp(sys.argv[2], sys.argv[1])
    else:
        run_finetune(*sys.argv[2:6], int(sys.argv[6]) if len(sys.argv) > 6 else None)

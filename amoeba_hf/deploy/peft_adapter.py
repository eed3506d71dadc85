"""One shape as a plain subnet plus a standard peft LoRA adapter, instead of a subnet with the LoRA merged in.

At a fixed shape the SMoL mixture is an ordinary LoRA: each target linear mixes its experts' A and B with that
shape's gates, `A = sum_e g_e A_e`, `B = sum_e g_e B_e`, and adds `(alpha / r) * B @ A` (see `ElasticLinear`). So
the shape is exactly `PeftModel(plain subnet, LoRA(r, alpha))` with those A and B: the adapter can be served
separately (e.g. several shapes' adapters on their shared base in vLLM or TGI), merged later, or trained further.
"""

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..io import DEFAULT_MAX_SHARD_SIZE, atomic_directory
from ..modeling.elastic_linear import ElasticLinear
from ..modeling.modeling_amoeba import AmoebaForCausalLM

ADAPTER_FOLDER = "adapter"


def shape_lora(model: AmoebaForCausalLM, depth: int, width: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of the shape's LoRA per target linear, keyed by its module path in the exported subnet.

    Raises ValueError for a model without SMoL experts, and for the full shape of a `smol_exact_full_shape` model,
    which has no experts by design (its plain subnet alone is that shape).
    """
    if not model.config.smol_experts:
        raise ValueError("This model has no SMoL experts (enable_smol was never run): export_subnet alone gives "
                         "every shape, there is no adapter to export")
    with torch.no_grad(), model.shaped(depth, width):
        inner = model.model
        inner.route(deterministic=True)
        lora = {}
        for slot, layer in enumerate(inner.active_layers):
            for name, module in layer.named_modules():
                if not isinstance(module, ElasticLinear) or module.lora_A is None:
                    continue
                if module.gates is None:
                    raise ValueError(
                        f"Shape {tuple(model.shape)} has no adapter: this model keeps its full shape expert-free "
                        "(smol_exact_full_shape), so export_subnet(depth, width) alone is that shape"
                    )
                mixed_a, mixed_b = module.mixed_experts()
                if name == "self_attn.q_proj":  # query heads in the exported subnet's stock order
                    mixed_b = layer.self_attn.stock_head_order(mixed_b, 0)
                elif name == "self_attn.o_proj":
                    mixed_a = layer.self_attn.stock_head_order(mixed_a, 1)
                elif name == "mlp.down_proj" and layer.mlp.bridge_map() is not None:
                    # the subnet's down_proj holds T W (depth bridge merged): the update becomes T B A
                    mixed_b = (layer.mlp.bridge_map().float() @ mixed_b.float()).to(mixed_b.dtype)
                lora[f"model.layers.{slot}.{name}"] = (mixed_a.clone(), mixed_b.clone())
    return lora


def lora_config(model: AmoebaForCausalLM) -> LoraConfig:
    """The peft LoraConfig equal to the model's SMoL experts at one shape (scaling alpha / r, no rsLoRA)."""
    config = model.config
    return LoraConfig(
        r=config.smol_rank,
        lora_alpha=config.smol_alpha,
        lora_dropout=config.smol_dropout,
        target_modules=list(config.smol_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapter(model: AmoebaForCausalLM, depth: int, width: float, subnet: PreTrainedModel) -> PeftModel:
    """`subnet` (the shape exported with `merge=False`) wrapped as a PeftModel holding the shape's LoRA.

    `subnet` is modified in place (peft injects its LoRA layers), as `get_peft_model` does.
    """
    lora = shape_lora(model, depth, width)
    peft_model = get_peft_model(subnet, lora_config(model))
    base = peft_model.get_base_model()
    with torch.no_grad():
        for path, (mixed_a, mixed_b) in lora.items():
            layer = base.get_submodule(path)
            layer.lora_A["default"].weight.copy_(mixed_a)
            layer.lora_B["default"].weight.copy_(mixed_b)
    injected = sum(1 for name, _ in base.named_modules() if name.endswith(".lora_A.default"))
    if injected != len(lora):
        raise RuntimeError(f"peft targeted {injected} linears but the shape has {len(lora)} LoRA linears")
    return peft_model.eval()


def export_adapter(
    model: AmoebaForCausalLM,
    depth: int,
    width: float,
    out: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write the shape as `out/` (its plain subnet without the LoRA, plus `tokenizer` if given; weights larger than
    `max_shard_size` in shards) and `out/adapter/` (a standard peft LoRA adapter), all or nothing. `out` must be new
    or empty.

    Load it back with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")`;
    its logits equal the elastic model's at that shape. The adapter records `out` as its base model path.
    """
    shape_lora(model, depth, width)  # refuse a shape without an adapter before writing anything
    subnet = model.export_subnet(depth, width, merge=False)
    with atomic_directory(out) as staging:
        subnet.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        peft_model = attach_adapter(model, depth, width, subnet)
        peft_model.peft_config["default"].base_model_name_or_path = str(out)
        peft_model.save_pretrained(staging / ADAPTER_FOLDER, save_embedding_layers=False)
    return Path(out)


__all__ = ["ADAPTER_FOLDER", "attach_adapter", "export_adapter", "lora_config", "shape_lora"]

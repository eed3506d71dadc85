"""`amoeba plan`: parameters, memory, FLOPs and time of every stage, known before renting GPUs.

The model is built on the meta device from its config (no weight is read), converted and given its SMoL experts and
router by the same code as `amoeba convert` and `amoeba train`, so parameter counts are the real ones; the depth
search is counted by running the DP itself with a scorer that only counts. Memory and FLOPs are formulas over those
counts, spelled out in `plan`'s docstring so that benchmarks can hold measured peaks against them.
"""

import copy
import inspect
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers import initialization as init

from ..modeling.configuration_amoeba import AmoebaConfig
from ..modeling.modeling_amoeba import AmoebaForCausalLM, is_recovery_parameter
from ..modeling.shape_space import (
    LayerWidth,
    ShapeSpace,
    attention_parameters,
    check_widths,
    compensation_sizes,
    full_layer_sizes,
    neuron_cost,
)
from ..modeling.subnet_export import amoeba_config_from_source, check_local_source
from ..selection.bridges import bridge_spans
from ..selection.calibrate import DEPTH_BRIDGES_DEFAULT, WIDTH_COMPENSATION_DEFAULT, CalibrationSettings
from ..selection.depth import SCORES, dp_depth_table, drop_last_table, kl_score, removable_layers
from ..training.finetune import FinetuneSettings
from ..training.trainer import TEACHERS
from .build import PRESETS, eval_shapes

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
FP32 = 4
# The DP's KL scorer keeps the teacher's log-probabilities only when they fit in this many bytes.
KL_CACHE_BYTES = inspect.signature(kl_score).parameters["cache_bytes"].default


@dataclass
class PlanSettings:
    """What `amoeba plan` costs (its flags); the recipe's defaults are `amoeba calibrate`'s and `amoeba train`'s."""

    dtype: str = field(
        default="bfloat16",
        metadata={"help": "dtype of the base weights and activations", "choices": tuple(DTYPE_BYTES)},
    )
    batch_size: int = field(default=1, metadata={"help": "sequences per device and micro-batch (train, evaluate)"})
    seq_len: int = field(default=2048, metadata={"help": "tokens per sequence, in every stage"})
    grad_accum: int = field(default=FinetuneSettings.grad_accum, metadata={"help": "micro-batches per optimizer step"})
    processes: int = field(default=1, metadata={"help": "data-parallel training processes (one device each)"})
    fsdp: bool = field(default=False, metadata={"help": "shard weights, gradients and optimizer state over processes"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "keep only each layer's input, recompute the rest in backward"}
    )
    experts: int = field(default=FinetuneSettings.experts, metadata={"help": "LoRA experts per linear"})
    top_k: int = field(default=FinetuneSettings.top_k, metadata={"help": "experts each shape mixes"})
    rank: int = field(default=FinetuneSettings.rank, metadata={"help": "LoRA rank of each expert"})
    random_shapes: int = field(
        default=FinetuneSettings.random_shapes, metadata={"help": "random shapes per micro-batch besides the sandwich"}
    )
    teacher: str = field(
        default=FinetuneSettings.distill_teacher,
        metadata={"help": "distillation teacher (base: a no-grad forward of the full shape per micro-batch)",
                  "choices": TEACHERS},
    )
    train_base: bool = field(default=False, metadata={"help": "also train the base weights"})
    steps: int = field(default=FinetuneSettings.steps, metadata={"help": "optimizer steps, for the training total"})
    min_depth: int | None = field(default=None, metadata={"help": "smallest depth (default: half the layers)"})
    samples: int = field(default=CalibrationSettings.samples, metadata={"help": "calibration samples"})
    score: str = field(default=CalibrationSettings.score, metadata={"help": "DP score", "choices": SCORES})
    keep_last: int = field(default=CalibrationSettings.keep_last, metadata={"help": "never remove the last K layers"})
    keep_first: bool = field(default=CalibrationSettings.keep_first, metadata={"help": "never remove the first layer"})
    widths: list[float] | None = field(
        default=None, metadata={"help": "width grid calibration sets, e.g. 1,0.75,0.5 (default: the model's)"}
    )
    depth_bridges: bool = field(
        default=DEPTH_BRIDGES_DEFAULT,
        metadata={"help": "calibration fits depth bridges, counted as one removed span per depth (the spans depend "
                          "on the data; a calibrated checkpoint counts its own)"},
    )
    width_compensation: bool = field(
        default=WIDTH_COMPENSATION_DEFAULT, metadata={"help": "calibration fits width corrections (uniform widths)"}
    )
    width_compensation_rank: int = field(
        default=CalibrationSettings.width_compensation_rank, metadata={"help": "rank of each width correction"}
    )
    eval_tokens: int = field(default=PRESETS["standard"].eval_tokens, metadata={"help": "tokens scored per shape"})
    tflops: float | None = field(
        default=None, metadata={"help": "measured throughput of one device in TFLOP/s, for time estimates"}
    )

    def validate(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        counts = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "processes": self.processes,
                  "experts": self.experts, "top_k": self.top_k, "rank": self.rank, "steps": self.steps,
                  "samples": self.samples, "eval_tokens": self.eval_tokens,
                  "width_compensation_rank": self.width_compensation_rank}
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.random_shapes < 0 or self.keep_last < 0:
            raise ValueError(f"random_shapes and keep_last must be >= 0, got {self.random_shapes}, {self.keep_last}")
        check_widths(self.widths)
        if self.tflops is not None and not self.tflops > 0:
            raise ValueError(f"tflops must be > 0, got {self.tflops}")


def load_config(model: str | os.PathLike | PreTrainedConfig) -> PreTrainedConfig:
    """The config of a Hub id, a model folder or a config JSON file; only config.json is read."""
    if isinstance(model, PreTrainedConfig):
        return copy.deepcopy(model)
    if os.path.isfile(model):
        return AutoConfig.from_pretrained(model)
    check_local_source(model)
    try:
        return AutoConfig.from_pretrained(model)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        raise OSError(f"cannot read the config of {os.fspath(model)!r}: {reason}") from error


def apply_planned_calibration(config: AmoebaConfig, settings: PlanSettings) -> None:
    """Give a config that calibration has not seen (no depth table, no experts) the width grid and closed-form
    recovery `amoeba calibrate` would give it with these settings, so that the model built from it holds those
    parameters: width corrections for every grid width below 1 (their sizes follow from the config), and depth
    bridges for the spans of the drop-last table, one per depth below full (the real spans depend on the data:
    SmolLM2-135M's block-influence table has 15 for its 15 depths). A calibrated or trained checkpoint keeps what it
    has."""
    if config.depth_table is not None or config.smol_experts:
        return
    if settings.widths:
        config.width_grid, config.min_width = sorted(settings.widths, reverse=True), min(settings.widths)
        config.validate_architecture()
    if settings.depth_bridges:
        layers = config.num_hidden_layers
        scan = removable_layers(layers, settings.keep_last, settings.keep_first)
        table = drop_last_table(layers, scan, min(layers - config.min_depth, len(scan)))
        config.depth_bridges = [list(span) for span in bridge_spans(table, layers)] or None
    if settings.width_compensation and config.width_mode == "uniform":
        config.width_compensation = [width for width in config.width_grid if width < 1.0] or None
        config.width_compensation_rank = settings.width_compensation_rank


def meta_model(config: PreTrainedConfig, settings: PlanSettings) -> AmoebaForCausalLM:
    """The any-shape model as Stage 2 trains it, on the meta device: converted (a source config), with the widths and
    recovery calibration would give it (`apply_planned_calibration`) and with SMoL enabled as `finetune` enables it,
    unless the checkpoint already has experts."""
    if config.model_type != "amoeba":
        config = amoeba_config_from_source(config, min_depth=settings.min_depth)
    elif settings.min_depth is not None:
        config.min_depth = settings.min_depth
        config.depth_table = None
    apply_planned_calibration(config, settings)
    with torch.device("meta"), init.no_init_weights():
        model = AmoebaForCausalLM(config)
        model.tie_weights()  # as `from_llama` does: tied embeddings are one parameter
        if config.smol_experts:
            model.set_trainable(settings.train_base)
        else:
            model.enable_smol(experts=settings.experts, top_k=min(settings.top_k, settings.experts),
                              rank=settings.rank, train_base=settings.train_base,
                              exact_full_shape=settings.teacher == "base")
    return model


def parameter_counts(model: AmoebaForCausalLM) -> dict[str, int]:
    """Parameters by role; tied embeddings count once (as `model.parameters()` does). "recovery" are the depth
    bridges and width corrections (float32, in the any-shape checkpoint only)."""
    counts = {"body": 0, "embeddings": 0, "experts": 0, "router": 0, "recovery": 0, "trainable": 0}
    body = {id(p) for p in (*model.model.layers.parameters(), *model.model.norm.parameters())}
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            role = "experts"
        elif "shape_router" in name:
            role = "router"
        elif is_recovery_parameter(name):
            role = "recovery"
        else:
            role = "body" if id(parameter) in body else "embeddings"
        counts[role] += parameter.numel()
        counts["trainable"] += parameter.numel() if parameter.requires_grad else 0
    counts["base"] = counts["body"] + counts["embeddings"]
    counts["total"] = counts["base"] + counts["experts"] + counts["router"] + counts["recovery"]
    return counts


def depth_search_cost(num_layers: int, min_depth: int, settings: PlanSettings) -> dict[str, int]:
    """The DP's candidate evaluations, layer forwards (each over all samples) and vocabulary projections, counted by
    running `dp_depth_table` itself with a scorer that charges what `select_depths` charges (the prefix cache on)."""
    scan = removable_layers(num_layers, settings.keep_last, settings.keep_first)
    max_removed = num_layers - min_depth
    if max_removed > len(scan):
        raise ValueError(
            f"min_depth {min_depth} would remove {max_removed} layers, but only {len(scan)} are removable with "
            f"keep_last={settings.keep_last}, keep_first={settings.keep_first}"
        )
    layer_forwards = num_layers if max_removed else 0  # cache_layer_inputs: one full pass storing every layer's input

    def evaluate(removed: frozenset[int], boundary: int) -> float:
        nonlocal layer_forwards
        layer_forwards += sum(1 for index in range(boundary, num_layers) if index not in removed)
        return 0.0

    evaluations = dp_depth_table(num_layers, scan, max_removed, evaluate, show_progress=False)[1] if max_removed else 0
    return {"min_depth": min_depth, "removable_layers": len(scan), "max_removed": max_removed,
            "evaluations": evaluations, "layer_forwards": layer_forwards}


def projected_positions(settings: PlanSettings, vocab_size: int, evaluations: int) -> int:
    """Positions the DP projects onto the vocabulary: per candidate, every scored position of the samples (ppl: all
    but the last of each block; kl: all, plus the teacher once if its log-probs fit the scorer's cache, else per
    candidate; mmlu: the last prompt token)."""
    samples, seq_len = settings.samples, settings.seq_len
    if settings.score == "ppl":
        return evaluations * samples * (seq_len - 1)
    if settings.score == "mmlu":
        return evaluations * samples
    tokens = samples * seq_len
    teacher = tokens if tokens * vocab_size * FP32 <= KL_CACHE_BYTES else evaluations * tokens
    return evaluations * tokens + teacher


@dataclass
class ForwardFlops:
    """FLOPs of one forward pass by kind, since backward treats them differently."""

    linear: float = 0.0
    lora: float = 0.0
    attention: float = 0.0
    head: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.lora + self.attention + self.head

    def backward(self, train_base: bool) -> float:
        """Input gradients through every matmul (1x), weight gradients of what trains (1x), attention 2x."""
        return self.linear * (1 + train_base) + self.head * (1 + train_base) + 2 * self.lora + 2 * self.attention


def _projection_sizes(config: AmoebaConfig, size: LayerWidth) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a layer at `size`."""
    hidden, query, kv = config.hidden_size, size.query_heads * config.head_dim, size.key_value_groups * config.head_dim
    inter = size.intermediate_size
    return {"q_proj": (hidden, query), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (query, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def layer_flops(config: AmoebaConfig, size: LayerWidth, tokens: int, seq_len: int, lora_rank: int) -> ForwardFlops:
    """One decoder layer at `size` over `tokens` tokens in sequences of `seq_len`: 2 FLOPs per weight and token,
    the active LoRA (one mixed rank-r pair per target) likewise, and attention's QK^T and AV, 4 * span * query dim
    per token (span: the sequence, or the sliding window; causal masking not halved, as kernels compute)."""
    weights = attention_parameters(config, size) + size.intermediate_size * neuron_cost(config)
    lora = 0
    if lora_rank:
        lora = sum(lora_rank * (i + o) for name, (i, o) in _projection_sizes(config, size).items()
                   if name in config.smol_target_modules)
    span = min(seq_len, config.sliding_window or seq_len)
    return ForwardFlops(linear=2.0 * weights * tokens, lora=2.0 * lora * tokens,
                        attention=4.0 * span * size.query_heads * config.head_dim * tokens)


def shape_flops(config: AmoebaConfig, space: ShapeSpace, shape: tuple[int, float], tokens: int, seq_len: int,
                positions: int, lora_rank: int) -> ForwardFlops:
    """A forward pass of one shape, projecting `positions` positions onto the vocabulary."""
    flops = ForwardFlops(head=2.0 * config.hidden_size * config.vocab_size * positions)
    for size in space.layer_widths(*shape).values():
        part = layer_flops(config, size, tokens, seq_len, lora_rank)
        flops.linear, flops.lora, flops.attention = (
            flops.linear + part.linear, flops.lora + part.lora, flops.attention + part.attention)
    return flops


def layer_activation_bytes(config: AmoebaConfig, size: LayerWidth, tokens: int, dtype_bytes: int,
                           train_base: bool) -> int:
    """Bytes one decoder layer saves for backward over `tokens` tokens, as measured on this code with SDPA (flash or
    memory-efficient kernels, no s x s matrix) and frozen base weights, whose matmuls save no input:

    per token: RMSNorm inputs upcast to fp32 (2 x 4h) and their rsqrt (2 x 4); SDPA's q, k, v and output
    (d * (2q + 2kv)) and fp32 logsumexp (4 per head); SwiGLU's gate, up and act(gate) (3 x d * i); for each SMoL
    target, its input in fp32 (a copy per target unless the model is fp32, where q/k/v and gate/up share theirs and
    o_proj's is SDPA's output) and its rank-r LoRA hidden (4r). Per layer: the mixed expert factors (4r(in+out) per
    target). `train_base` adds the base matmuls' inputs and both RMSNorm outputs (d each). d = `dtype_bytes`.
    """
    d, hidden, inter = dtype_bytes, config.hidden_size, size.intermediate_size
    query, kv = size.query_heads * config.head_dim, size.key_value_groups * config.head_dim
    per_token = {
        "norm inputs": 2 * FP32 * hidden, "norm rsqrt": 2 * FP32, "query": d * query, "key": d * kv, "value": d * kv,
        "attention output": d * query, "logsumexp": FP32 * size.query_heads, "gate": d * inter, "up": d * inter,
        "act": d * inter,
    }
    sources = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
               "o_proj": "attention output", "gate_proj": "mlp input", "up_proj": "mlp input",
               "down_proj": "mlp hidden"}
    widths = {"attention input": hidden, "attention output": query, "mlp input": hidden, "mlp hidden": inter}
    per_layer = 0
    rank = config.smol_rank if config.smol_experts else 0
    for name, (fan_in, fan_out) in _projection_sizes(config, size).items():
        if rank and name in config.smol_target_modules:
            source = sources[name]
            per_token[source if d == FP32 else f"{name} fp32 input"] = FP32 * widths[source]
            per_token[f"{name} lora hidden"] = FP32 * rank
            per_layer += FP32 * rank * (fan_in + fan_out)
    if train_base:
        for source in sources.values():
            per_token.setdefault(source, d * widths[source])
        per_token["norm outputs"] = 2 * d * hidden
    return sum(per_token.values()) * tokens + per_layer


def corrected_weight_bytes(config: AmoebaConfig, size: LayerWidth, d: int) -> int:
    """Bytes a layer at full size `size` saves for backward beyond `layer_activation_bytes` at a grid width with width
    corrections: o_proj's and down_proj's weight with the correction folded in (`ElasticLinear.shape_weight`) is a
    new tensor, not a view of the frozen weight, and the input gradient needs it (hidden x kept x d each). The most
    over the corrected grid widths; nothing without width compensation."""
    per_width: dict[str, int] = {}
    for name in ("o_proj", "down_proj"):
        for key, (_, kept) in compensation_sizes(config, name, size).items():
            per_width[key] = per_width.get(key, 0) + kept * config.hidden_size * d
    return max(per_width.values(), default=0)


def _inference_working_set(config: AmoebaConfig, tokens: int, d: int) -> int:
    """Largest transient of a no-grad layer: residual and normed input, plus attention's q, k, v and output or
    the MLP's gate, up and act(gate), whichever is larger."""
    widest = max(full_layer_sizes(config), key=lambda s: (s.query_heads, s.intermediate_size))
    query, kv = widest.query_heads * config.head_dim, widest.key_value_groups * config.head_dim
    return tokens * d * (2 * config.hidden_size + max(2 * query + 2 * kv, 3 * widest.intermediate_size))


def _memory(weights: float = 0, experts: float = 0, optimizer: float = 0, gradients: float = 0,
            activations: float = 0, fsdp_gather: float = 0) -> dict[str, int]:
    memory = {"weights": weights, "experts": experts, "optimizer": optimizer, "gradients": gradients,
              "activations": activations, "fsdp_gather": fsdp_gather}
    memory = {key: int(math.ceil(value)) for key, value in memory.items()}
    memory["total"] = sum(memory.values())
    return memory


def _stage(name: str, processes: int, memory: dict[str, int], flops: float, settings: PlanSettings,
           **extra) -> dict:
    seconds = None if settings.tflops is None or not flops else flops / (settings.tflops * 1e12)
    return {"stage": name, "processes": processes, "memory": memory, "flops": flops, "seconds": seconds, **extra}


def plan(config_or_path: str | os.PathLike | PreTrainedConfig, **settings) -> dict:
    """Parameters, per-device memory, FLOPs and (with `tflops`) time of convert, calibrate, one training step and
    evaluating each shape, for `config_or_path` (a config, a Hub id, a model folder or a config JSON file; no weights
    are read). `settings` are `PlanSettings` fields. Returns a JSON-ready dict; bytes and FLOPs are plain numbers.

    Assumptions (d = bytes of `dtype`, L layers, h hidden, V vocabulary, T = batch_size * seq_len tokens):

    - Parameters: the model as `amoeba train` trains it, built on the meta device; experts and router are fp32
      (`_keep_in_fp32_modules_strict`), everything else in `dtype`.
    - convert, calibrate and evaluate run in one process on one device (as the package runs them); only training
      uses `processes`. DDP replicates everything and keeps a bucket copy of the gradients; `fsdp` divides weights,
      experts, gradients and optimizer state by `processes` and adds the gathered parameters in use (the root
      unit, i.e. embeddings, head and router, plus two decoder layers: the one computing and the one prefetched).
    - Optimizer: AdamW, two moments in each trainable parameter's dtype (fp32 for experts and router); gradients
      likewise. No optimizer-step or allocator overhead, no CUDA context (~0.5 GiB per process), no fragmentation.
    - Training activations are those of the full shape (the largest graph; each shape's graph is freed after its
      backward). Per layer `layer_activation_bytes` plus, with width corrections, `corrected_weight_bytes` (an
      upper bound: the full shape has none, narrower shapes save less); with gradient checkpointing, L x T x h x d
      (each layer's input) plus one layer's recomputed activations. Plus rotary cos/sin (2 x seq_len x head_dim x
      d), the final norm (T x (4h + 4)) and the logits and loss over every position (all labelled: an upper bound;
      instruction data labels only responses): T x V x (d + 16), i.e. the logits, their fp32 copy, the saved
      log-probabilities and the teacher's log-probabilities and probabilities (fp32). Padded batches would add a
      T x s mask and expand k/v to the query heads; eager attention would add the s x s attention matrix per head
      and layer.
    - Calibrate: the width step (a full forward of `samples` blocks, in chunks of `CalibrationSettings.chunk_size`,
      float64 channel statistics) or the DP, whichever holds more: the DP caches every layer's input and the final
      hidden states ((L + 1) x samples x seq_len x h x d), runs one chunk at a time, and (score kl) caches the
      teacher's fp32 log-probabilities when they fit in `kl_score`'s cache.
    - Evaluate: `perplexity` with `batch_size` windows of `seq_len`; the model holds its experts.
    - FLOPs: 2 per weight and token forward, plus attention's 4 x span x query dim per token and layer; backward is
      1x forward for input gradients through every matmul plus 1x for the weight gradients of what trains (so ~2x
      forward with a frozen base, 3x with `train_base`), attention 2x; checkpointing recomputes the layers' forward.
      A training micro-batch runs the sandwich (largest unless `teacher="base"` with a frozen base, smallest,
      `random_shapes` random ones costed at the mean over the shape grid), plus a no-grad full forward with
      `teacher="base"`; per device. With `teacher="base"` and `train_base`, the teacher is a frozen copy of the
      model (base weights in `dtype`, experts in fp32, never sharded), counted in the weights.
    - Time: FLOPs / `tflops` (a measured throughput, so efficiency is in it); convert reads and writes only.
    """
    settings = PlanSettings(**settings)
    settings.validate()
    source = load_config(config_or_path)
    named = not isinstance(config_or_path, PreTrainedConfig)
    name = getattr(source, "name_or_path", None) or (os.fspath(config_or_path) if named else source.model_type)
    model = meta_model(source, settings)
    config = model.config
    params = parameter_counts(model)
    uniform = copy.deepcopy(config)
    uniform.width_mode = "uniform"  # global widths are costed as uniform ones: their allocation needs the weights
    space = ShapeSpace(uniform)
    d = DTYPE_BYTES[settings.dtype]
    search = depth_search_cost(config.num_hidden_layers, config.min_depth, settings)
    search["vocabulary_projections"] = projected_positions(settings, config.vocab_size, search["evaluations"])
    train = _train_stage(model, params, space, settings, d)
    stages = [
        _stage("convert", 1, _memory(weights=params["base"] * d), 0.0, settings),
        _calibrate_stage(config, params, space, search, settings, d),
        train,
        *_evaluate_stages(config, params, space, settings, d),
    ]
    train_seconds = None if train["seconds"] is None else train["seconds"] * settings.steps
    return {
        "model": name,
        "source_model_type": config.source_model_type,
        "architecture": {
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "attention_heads": config.num_attention_heads,
            "key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
            "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_word_embeddings,
        },
        "settings": asdict(settings),
        "parameters": params,
        "depth_search": search,
        "stages": stages,
        "train_total": {"steps": settings.steps, "flops": train["flops"] * settings.steps, "seconds": train_seconds},
    }


def _calibrate_stage(config: AmoebaConfig, params: dict[str, int], space: ShapeSpace, search: dict[str, int],
                     settings: PlanSettings, d: int) -> dict:
    """Stage 1 in one process: width statistics (one full forward), then the DP on the full-width layers."""
    vocab, hidden, sizes = config.vocab_size, config.hidden_size, full_layer_sizes(config)
    tokens = settings.samples * settings.seq_len
    layer_costs = [layer_flops(config, size, tokens, settings.seq_len, 0).total for size in sizes]
    width_flops = shape_flops(config, space, space.full_shape, tokens, settings.seq_len, tokens, 0).total
    dp_flops = (search["layer_forwards"] * sum(layer_costs) / len(sizes)
                + 2.0 * hidden * vocab * search["vocabulary_projections"])
    chunk = min(CalibrationSettings.chunk_size, settings.samples) * settings.seq_len
    widest_input = max(max(s.query_heads * config.head_dim, s.intermediate_size) for s in sizes)
    # The statistics hooks hold a float64 copy of a projection's input and its squared deviations.
    width_memory = _inference_working_set(config, chunk, d) + chunk * vocab * d + 2 * chunk * widest_input * 8
    dp_memory = 0
    if search["max_removed"]:
        dp_memory = (len(sizes) + 1) * tokens * hidden * d + _inference_working_set(config, chunk, d)
        if settings.score != "mmlu":
            dp_memory += chunk * vocab * (d + 8)
        if settings.score == "kl" and tokens * vocab * FP32 <= KL_CACHE_BYTES:
            dp_memory += tokens * vocab * FP32
    recovery_memory = max(_bridge_fit_memory(config, chunk, d), _compensation_fit_memory(config, tokens, chunk, d))
    memory = _memory(weights=params["base"] * d + params["recovery"] * FP32,
                     activations=max(width_memory, dp_memory, recovery_memory))
    return _stage("calibrate", 1, memory, width_flops + dp_flops, settings)


def _bridge_fit_memory(config: AmoebaConfig, chunk: int, d: int) -> int:
    """`fit_depth_bridges` over chunks of `chunk` tokens: float64 X^T X per kept layer with a span and X^T Y per
    span, plus the one being added; per chunk, in the model's dtype, each such layer's output and MLP output and the
    stream after each span's end, and up to five chunk-sized float64 transients (X, the layer's output, a stream and
    two steps of the target)."""
    spans = [tuple(span) for span in config.depth_bridges or ()]
    if not spans:
        return 0
    hidden, kept, ends = config.hidden_size, len({i for i, _ in spans}), len({j for _, j in spans})
    sums = 8 * hidden * hidden * (kept + len(spans) + 1)
    streams = d * chunk * hidden * (2 * kept + ends) + 5 * 8 * chunk * hidden
    return sums + streams + _inference_working_set(config, chunk, d)


def _compensation_fit_memory(config: AmoebaConfig, tokens: int, chunk: int, d: int) -> int:
    """`fit_width_compensation`, one layer at a time: every block's hidden states at that layer's input and output,
    and the larger of running the layer (float64 input sums of o_proj and down_proj, a chunk's float64 input copy)
    and solving its projections in turn (o_proj while down_proj's sums wait): the projection's C (its sums, centred
    in place), and at the widest grid width below 1 two kept^2 matrices, the update, its right-hand side and the
    removed columns, float64 (in^2 + 2 kept^2 + 2 kept x hidden + in x hidden; for in = 4096, kept = 3584, hidden =
    1024 within a few percent of getrusage's peak on CPU)."""
    if not config.width_compensation:
        return 0
    hidden, widest = config.hidden_size, max(full_layer_sizes(config), key=lambda s: s.intermediate_size)
    inputs = {"o_proj": widest.query_heads * config.head_dim, "down_proj": widest.intermediate_size}
    sums = {name: 8 * (size * size + size) for name, size in inputs.items()}
    run = sum(sums.values()) + 8 * chunk * max(inputs.values()) + _inference_working_set(config, chunk, d)
    solve, waiting = 0, sum(sums.values())
    for name, size in inputs.items():
        kept = max((columns for _, columns in compensation_sizes(config, name, widest).values()), default=0)
        if kept:
            solve = max(solve, waiting + 8 * (2 * kept * kept + 2 * kept * hidden + size * hidden))
        waiting -= sums[name]
    return 2 * tokens * hidden * d + max(run, solve)


def _train_stage(model: AmoebaForCausalLM, params: dict[str, int], space: ShapeSpace, settings: PlanSettings,
                 d: int) -> dict:
    """One optimizer step (`grad_accum` sandwiches) on one of `processes` devices."""
    config = model.config
    hidden, vocab, seq_len = config.hidden_size, config.vocab_size, settings.seq_len
    tokens = settings.batch_size * seq_len
    shard = settings.processes if settings.fsdp else 1
    experts = params["experts"] + params["router"]
    trained_base = params["base"] if settings.train_base else 0
    gradients = experts * FP32 + trained_base * d
    if settings.processes > 1 and not settings.fsdp:
        gradients *= 2  # DDP's bucket copy
    saved = [layer_activation_bytes(config, size, tokens, d, settings.train_base)
             + corrected_weight_bytes(config, size, d) for size in full_layer_sizes(config)]
    if settings.gradient_checkpointing:
        layers = config.num_hidden_layers * tokens * hidden * d + max(saved)
    else:
        layers = sum(saved)
    rotary, final_norm = 2 * seq_len * config.head_dim * d, tokens * (FP32 * hidden + FP32)
    activations = layers + rotary + final_norm + tokens * vocab * (d + 16)
    gather = 0
    if settings.fsdp and settings.processes > 1:
        layer = model.model.layers[0].named_parameters()
        layer_bytes = sum(p.numel() * (FP32 if "lora_" in n or is_recovery_parameter(n) else d) for n, p in layer)
        gather = params["embeddings"] * d + hidden * d + params["router"] * FP32 + 2 * layer_bytes
    full_trains = settings.teacher == "largest" or settings.train_base
    # Full-weight training from the base teacher keeps a frozen, unsharded copy of the model as the teacher.
    recovery = params["recovery"] * FP32
    teacher_copy = 0
    if settings.teacher == "base" and settings.train_base:
        teacher_copy = params["base"] * d + recovery + experts * FP32
    memory = _memory(weights=(params["base"] * d + recovery) / shard + teacher_copy, experts=experts * FP32 / shard,
                     optimizer=2 * (experts * FP32 + trained_base * d) / shard, gradients=gradients / shard,
                     activations=activations, fsdp_gather=gather)

    full = space.full_shape
    sandwich = ([full] if full_trains else []) + [(min(space.depths), space.min_width)]
    random_pool = [shape for shape in space.grid() if full_trains or shape != full]
    if settings.random_shapes and not random_pool:
        raise ValueError("teacher 'base' trains every shape but the full one, and the shape space has no other")

    def trained(shape: tuple[int, float]) -> float:
        forward = shape_flops(config, space, shape, tokens, seq_len, tokens, config.smol_rank)
        recompute = forward.total - forward.head if settings.gradient_checkpointing else 0.0
        return forward.total + forward.backward(settings.train_base) + recompute

    flops = sum(map(trained, sandwich))
    if settings.random_shapes:
        flops += settings.random_shapes * sum(map(trained, random_pool)) / len(random_pool)
    if settings.teacher == "base":
        flops += shape_flops(config, space, full, tokens, seq_len, tokens, 0).total
    return _stage("train", settings.processes, memory, flops * settings.grad_accum, settings,
                  tokens_per_step=tokens * settings.grad_accum * settings.processes)


def _evaluate_stages(config: AmoebaConfig, params: dict[str, int], space: ShapeSpace, settings: PlanSettings,
                     d: int) -> list[dict]:
    """Held-out perplexity of each shape `amoeba build` reports, in one process, with the experts loaded."""
    seq_len, vocab = settings.seq_len, config.vocab_size
    scored = math.ceil(settings.eval_tokens / seq_len) * seq_len
    activations = _inference_working_set(config, settings.batch_size * seq_len, d) + seq_len * vocab * (d + 8)
    memory = _memory(weights=params["base"] * d + params["recovery"] * FP32,
                     experts=(params["experts"] + params["router"]) * FP32, activations=activations)
    return [
        _stage("evaluate", 1, memory,
               shape_flops(config, space, shape, scored, seq_len, scored, config.smol_rank).total, settings,
               shape=list(shape), shape_parameters=space.parameter_count(*shape))
        for shape in eval_shapes(space)
    ]


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f}" if value else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _processes(settings: dict) -> str:
    count = settings["processes"]
    if count == 1:
        return "1 training process"
    return f"{count} training processes ({'FSDP' if settings['fsdp'] else 'DDP'})"


def format_plan(result: dict) -> str:
    """The plan as the text table `amoeba plan` prints (memory in GiB per device)."""
    params, search, settings = result["parameters"], result["depth_search"], result["settings"]
    arch = result["architecture"]
    lines = [
        f"{result['model']} ({result['source_model_type']}, {arch['layers']} layers, hidden {arch['hidden_size']}, "
        f"vocab {arch['vocab_size']}, {'tied' if arch['tie_word_embeddings'] else 'untied'} embeddings)",
        f"parameters: {params['total']:,} = {params['base']:,} base ({params['body']:,} body + "
        f"{params['embeddings']:,} embeddings) + {params['experts']:,} experts + {params['router']:,} router + "
        f"{params['recovery']:,} recovery (depth bridges, width corrections); trainable {params['trainable']:,}",
        f"settings: {settings['dtype']}, batch {settings['batch_size']} x {settings['seq_len']} tokens per device, "
        f"grad accum {settings['grad_accum']}, {_processes(settings)}, gradient checkpointing "
        f"{'on' if settings['gradient_checkpointing'] else 'off'}",
        f"depth DP: min depth {search['min_depth']}, {settings['samples']} samples x {settings['seq_len']} tokens, "
        f"score {settings['score']}: {search['evaluations']:,} evaluations, "
        f"{search['layer_forwards']:,} layer forwards, "
        f"{search['vocabulary_projections']:,} positions projected onto the vocabulary",
        "",
        f"{'stage':<22} {'procs':>5} {'weights':>8} {'experts':>8} {'optim':>8} {'grads':>8} {'activ':>8} "
        f"{'gather':>8} {'total':>8} {'TFLOP':>10} {'time':>9}",
    ]
    for stage in result["stages"]:
        label = stage["stage"] + (" (per step)" if stage["stage"] == "train" else "")
        if "shape" in stage:
            label = f"evaluate {stage['shape'][0]}x{stage['shape'][1]:g}"
        memory = stage["memory"]
        cells = " ".join(f"{_gib(memory[key]):>8}" for key in
                         ("weights", "experts", "optimizer", "gradients", "activations", "fsdp_gather", "total"))
        flops = f"{stage['flops'] / 1e12:,.1f}" if stage["flops"] else "-"
        lines.append(f"{label:<22} {stage['processes']:>5} {cells} {flops:>10} {_duration(stage['seconds']):>9}")
    total = result["train_total"]
    lines += [
        "memory in GiB per device; weights: base in the chosen dtype, recovery in fp32; experts, router, their "
        "gradients and AdamW moments in fp32",
        f"train total: {total['steps']} steps, {total['flops'] / 1e15:,.1f} PFLOP per device"
        + (f", {_duration(total['seconds'])}" if total["seconds"] is not None else " (pass --tflops for times)"),
    ]
    return "\n".join(lines)


__all__ = ["PlanSettings", "corrected_weight_bytes", "format_plan", "layer_activation_bytes", "plan"]

"""Stage 2a: local reconstruction. Each kept layer's SMoL experts learn to reproduce the dense model's hidden states.

For a shape that keeps layer i, the target is the dense hidden state entering the next layer that shape keeps
(after its last kept layer, the dense final hidden state before the norm), and the input is the dense hidden state
entering layer i. Layer i at the shape's width thus learns to absorb both its pruned channels and the depth table's
gap after it (LLM-Streamline's objective, with dense inputs). Given dense inputs the layers are independent: the
dense states are cached once, then the layers are trained one after the other, each with its own optimizer, and the
experts of every finished layer are saved, so an interrupted run resumes at the next layer with the same result.

Only the experts are trained: base weights and router stay frozen, and the full shape is never changed (a model whose
full shape uses its experts keeps it as an anchor shape, trained to keep reproducing its own dense states).
"""

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, set_seed

from ..fingerprint import Fingerprint, data_digests, loaded_model_identity, model_dtype, settings_record
from ..io import write_text_atomically
from ..modeling.modeling_amoeba import LayerInputs
from ..modeling.shape_space import Shape, ShapeSpace, check_widths
from ..placement import input_device
from ..selection.data import text_blocks
from .data import DataFields, is_file_source

STATE_FILE = "state.json"


@dataclass
class ReconstructionSettings:
    """Stage 2a's recipe, also the flags of `amoeba reconstruct`; defaults fit a ~100M-parameter model on a CPU
    in minutes (32 blocks of 256 tokens, 32 steps of 4 blocks per layer: 4 passes over the data).

    All but the `OPERATIONAL` settings are in the fingerprint that guards resumption (the chunk size of the dense
    pass changes memory, not the states)."""

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("chunk_size",)

    data: list[str] = field(
        default_factory=list,
        metadata={"help": "text (.txt, a document per line; JSON/JSONL `text`, or Alpaca records, read as text)",
                  "nargs": "+", "required": True},
    )
    samples: int = field(default=32, metadata={"help": "token blocks, split evenly over the data files"})
    seq_len: int = field(default=256, metadata={"help": "tokens per block"})
    steps: int = field(default=32, metadata={"help": "optimizer steps per layer"})
    batch_size: int = field(default=4, metadata={"help": "blocks per step"})
    learning_rate: float = field(default=5e-3, metadata={"help": "constant AdamW learning rate", "flag": "--lr"})
    random_shapes: int = field(
        default=1, metadata={"help": "random shapes per step besides the smallest and the widest non-full shape"}
    )
    widths: list[float] | None = field(
        default=None, metadata={"help": "widths random shapes draw from, e.g. 0.875,0.75 (default: uniform range)"}
    )
    experts: int = field(default=5, metadata={"help": "LoRA experts per linear, if the model has none yet"})
    top_k: int = field(default=2, metadata={"help": "experts each shape mixes, if the model has none yet"})
    rank: int = field(default=8, metadata={"help": "LoRA rank of each expert, if the model has none yet"})
    seed: int = field(default=0, metadata={"help": "seed of the blocks, expert initialisation and shape sampling"})
    weight_decay: float = field(default=0.0, metadata={"cli": False})
    max_grad_norm: float = field(default=1.0, metadata={"cli": False})
    alpha: float = field(default=16.0, metadata={"cli": False})
    chunk_size: int = field(default=4, metadata={"cli": False})

    def validate(self) -> None:
        """Check the settings and that the data files exist, before a model is loaded."""
        counts = {
            "samples": self.samples, "steps": self.steps, "batch_size": self.batch_size, "experts": self.experts,
            "top_k": self.top_k, "rank": self.rank, "chunk_size": self.chunk_size,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.top_k > max(self.experts, 2):
            # The default top_k (2) with one expert is plain LoRA and means the one expert; any other excess would be
            # cut to the expert count while the settings record the value asked for.
            raise ValueError(f"top_k (--top-k) {self.top_k} exceeds experts (--experts) {self.experts}: a shape mixes "
                             f"at most all experts; choose --top-k in 1..{self.experts}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.random_shapes < 0:
            raise ValueError(f"random_shapes must be >= 0, got {self.random_shapes}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or not self.max_grad_norm > 0:
            raise ValueError(f"need weight_decay >= 0 and max_grad_norm > 0, got {self.weight_decay}, "
                             f"{self.max_grad_norm}")
        check_widths(self.widths)
        if not self.data:
            raise ValueError("no reconstruction data: pass data (--data), .txt or JSON/JSONL files with `text`")
        if self.samples < len(self.data):
            raise ValueError(f"samples ({self.samples}) must be at least the number of data files ({len(self.data)})")
        for path in self.data:
            if is_file_source(path) and not Path(path).is_file():
                raise FileNotFoundError(f"reconstruction data {path} does not exist")


@dataclass
class ReconstructionReport:
    """What a run did: per trained layer, the mean normalised error of its shapes at the first and last step."""

    layers: dict[int, tuple[float, float]]
    skipped_layers: list[int]
    resumed_layers: list[int]
    cache_seconds: float
    train_seconds: float


@dataclass
class DenseStates:
    """The full shape's hidden states: `hidden[i]` enters layer i (N x T x H), `hidden[L]` is the final hidden
    state before the norm; `inputs` are the layer inputs (mask, rotary embeddings) of a batch of `batch_size`."""

    hidden: list[torch.Tensor]
    inputs: LayerInputs
    batch_size: int


def reconstruction_blocks(sources: list[str], tokenizer: PreTrainedTokenizerBase, samples: int, seq_len: int,
                          seed: int = 0, data_fields: DataFields = DataFields()) -> torch.Tensor:
    """`samples` blocks of `seq_len` tokens, split evenly over the files or Hub datasets (earlier ones take the
    remainder)."""
    per_source = [samples // len(sources) + (index < samples % len(sources)) for index in range(len(sources))]
    return torch.cat([text_blocks(source, tokenizer, count, seq_len, seed, data_fields)
                      for source, count in zip(sources, per_source)])


def dense_states(model, input_ids: torch.Tensor, batch_size: int, chunk_size: int = 4) -> DenseStates:
    """Run the full shape once over `input_ids` (full blocks, no padding) and keep every layer's input."""
    inner = model.model
    model.set_shape(*model.shape_space.full_shape)
    inner.route(deterministic=True)
    hidden: list[list[torch.Tensor]] = [[] for _ in range(len(inner.layers) + 1)]
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], chunk_size):
            chunk = inner.prepare_inputs(input_ids[start : start + chunk_size])
            states = chunk.inputs_embeds
            for index, layer in enumerate(inner.layers):
                hidden[index].append(states)
                states = inner.run_layers(states, [layer], chunk)
            hidden[-1].append(states)
        inputs = inner.prepare_inputs(input_ids[:batch_size])
    return DenseStates([torch.cat(parts) for parts in hidden], inputs, min(batch_size, input_ids.shape[0]))


def target_index(space: ShapeSpace, depth: int, layer: int) -> int:
    """Index of the dense state a kept layer must produce at `depth`: the input of the next kept layer, or the
    number of layers (the final state) after the last one."""
    kept = space.kept_layers(depth)
    position = kept.index(layer)
    return kept[position + 1] if position + 1 < len(kept) else space.num_layers


class LayerShapes:
    """The shapes that train one layer: the smallest and the widest non-full shape keeping it, plus random ones.

    Random shapes draw a depth that keeps the layer and a width from `widths` (default: uniform in
    [min_width, 1]). With `anchor`, the full shape joins every step (its experts are shared with the others).
    """

    def __init__(self, space: ShapeSpace, layer: int, widths: list[float] | None, exact_full_shape: bool):
        self.space = space
        self.widths = widths
        self.exact_full_shape = exact_full_shape
        self.depths = [depth for depth in space.depths if layer in space.kept_layers(depth)]
        self.can_draw = any(Shape(d, w) != space.full_shape for d in self.depths for w in (widths or [space.min_width]))
        grid = sorted({*space.width_grid, space.min_width, *(widths or ())})
        candidates = [Shape(d, w) for d in self.depths for w in grid
                      if space.min_width <= w <= 1.0 and Shape(d, w) != space.full_shape]
        self.fixed: list[Shape] = []
        if candidates:
            smallest = Shape(min(self.depths), space.min_width)
            widest = max(candidates, key=lambda shape: space.parameter_count(*shape))
            self.fixed = [smallest] if widest == smallest else [smallest, widest]

    @property
    def trainable(self) -> bool:
        """Whether any shape but the full one keeps this layer."""
        return bool(self.fixed)

    def sample(self, rng: random.Random, count: int) -> list[Shape]:
        shapes = list(self.fixed)
        for _ in range(count if self.can_draw else 0):
            shape = self._random(rng)
            while self.exact_full_shape and shape == self.space.full_shape:
                shape = self._random(rng)
            shapes.append(shape)
        if not self.exact_full_shape:
            shapes.append(self.space.full_shape)
        return shapes

    def _random(self, rng: random.Random) -> Shape:
        width = rng.choice(self.widths) if self.widths else round(rng.uniform(self.space.min_width, 1.0), 4)
        return Shape(rng.choice(self.depths), width)


def layer_error(model, states: DenseStates, layer: int, shape: Shape, rows: torch.Tensor) -> torch.Tensor:
    """Normalised MSE of `layer` at `shape` on dense inputs `rows`: MSE(out, target) / mean(target^2), so layers
    whose residual stream is large do not dominate. The model must be at `shape`, routed."""
    inner = model.model
    target = states.hidden[target_index(model.shape_space, shape.depth, layer)][rows]
    output = inner.run_layers(states.hidden[layer][rows], [inner.layers[layer]], states.inputs)
    target = target.float()
    return F.mse_loss(output.float(), target) / target.pow(2).mean().clamp(min=1e-12)


def set_routed_shape(model, shape: Shape) -> None:
    """Switch to `shape` and hand its deterministic gates to the active experts (the router is frozen)."""
    model.set_shape(*shape)
    model.model.route(deterministic=True)


class BatchSampler:
    """Rows of `batch_size` blocks from consecutive seeded permutations of the `count` blocks."""

    def __init__(self, count: int, batch_size: int, seed: str):
        self.count, self.batch_size = count, batch_size
        self.rng = random.Random(seed)
        self.queue: list[int] = []

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch_size:
            order = list(range(self.count))
            self.rng.shuffle(order)
            self.queue += order
        rows, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return torch.tensor(rows)


class ReconstructionState:
    """Finished layers in `state_dir`: `layer_<i>.safetensors` (its experts), then `state.json` (each finished
    layer's first/last error); `fingerprint.json` names the run they belong to (another run's is refused, see
    amoeba_hf.fingerprint)."""

    def __init__(self, state_dir: str | os.PathLike | None, fingerprint: Fingerprint | None):
        self.folder = None if state_dir is None else Path(state_dir)
        self.fingerprint = fingerprint
        self.layers: dict[int, tuple[float, float]] = {}
        if self.folder is not None:
            fingerprint.guard(self.folder)
            if (self.folder / STATE_FILE).is_file():
                saved = json.loads((self.folder / STATE_FILE).read_text())
                self.layers = {int(i): tuple(errors) for i, errors in saved["layers"].items()}

    def load(self, model) -> list[int]:
        """Put every finished layer's experts into `model`; returns those layers."""
        for index in sorted(self.layers):
            tensors = load_file(self.folder / f"layer_{index}.safetensors")
            parameters = dict(expert_parameters(model, index))
            with torch.no_grad():
                for name, tensor in tensors.items():
                    parameters[name].copy_(tensor)
        return sorted(self.layers)

    def save(self, model, index: int, errors: tuple[float, float]) -> None:
        self.layers[index] = errors
        if self.folder is None:
            return
        self.fingerprint.record(self.folder)
        path = self.folder / f"layer_{index}.safetensors"
        staging = path.with_name(f".{path.name}.tmp")
        save_file({name: p.detach().contiguous() for name, p in expert_parameters(model, index)}, staging)
        os.replace(staging, path)
        write_text_atomically(self.folder / STATE_FILE, json.dumps({"layers": self.layers}))


def expert_parameters(model, index: int) -> list[tuple[str, torch.nn.Parameter]]:
    """Layer `index`'s LoRA expert parameters, named within the layer."""
    return [(name, p) for name, p in model.model.layers[index].named_parameters() if "lora_" in name]


def reconstruct(
    model,
    tokenizer: PreTrainedTokenizerBase,
    settings: ReconstructionSettings,
    state_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    model_identity: dict[str, str] | None = None,
) -> ReconstructionReport:
    """Train every layer's experts so that each shape's kept layers reproduce the dense hidden states (see the
    module's docstring); the experts of each finished layer are saved in `state_dir`, and a re-run with the same
    settings, model and data continues at the next layer (other ones are refused: ResumeMismatchError).
    `model_identity` identifies the model's source (`source_identity`); without it the loaded model is hashed. The
    model ends at its full shape, in eval mode."""
    settings.validate()
    space = model.shape_space
    for width in settings.widths or ():
        space.validate(space.num_layers, width)
    fingerprint = None
    if state_dir is not None:
        fingerprint = Fingerprint({**settings_record(settings), **model_dtype(model)},
                                  model_identity or loaded_model_identity(model), data_digests(settings.data))
    state = ReconstructionState(state_dir, fingerprint)
    blocks = reconstruction_blocks(settings.data, tokenizer, settings.samples, settings.seq_len, settings.seed)
    blocks = blocks.to(input_device(model))
    if not model.config.smol_experts:
        set_seed(settings.seed)
        model.enable_smol(experts=settings.experts, top_k=min(settings.top_k, settings.experts), rank=settings.rank,
                          alpha=settings.alpha, exact_full_shape=True)
    model.eval()
    trainable_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    start = time.perf_counter()
    states = dense_states(model, blocks, settings.batch_size, settings.chunk_size)
    cache_seconds = time.perf_counter() - start
    resumed = state.load(model)
    plans = {i: LayerShapes(space, i, settings.widths, model.config.smol_exact_full_shape)
             for i in range(space.num_layers)}
    todo = [i for i, plan in plans.items() if plan.trainable and i not in state.layers]
    start = time.perf_counter()
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with tqdm(total=len(todo) * settings.steps, disable=not show_progress, desc="reconstruct",
                  unit="step") as bar:
            for index in todo:
                errors = _train_layer(model, states, index, plans[index], settings, bar)
                state.save(model, index, errors)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable_flags[name])
        model.set_shape(*space.full_shape)
        model.eval()
    skipped = [i for i, plan in plans.items() if not plan.trainable]
    return ReconstructionReport(dict(state.layers), skipped, resumed, cache_seconds, time.perf_counter() - start)


def _train_layer(model, states: DenseStates, index: int, plan: LayerShapes, settings: ReconstructionSettings,
                 bar: tqdm) -> tuple[float, float]:
    """AdamW on layer `index`'s experts for `settings.steps` steps; returns the mean error at the first and last."""
    parameters = [p for _, p in expert_parameters(model, index)]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    rows = BatchSampler(states.hidden[index].shape[0], states.batch_size, f"{settings.seed}:{index}:rows")
    errors = []
    for step in range(settings.steps):
        shapes = plan.sample(random.Random(f"{settings.seed}:{index}:{step}"), settings.random_shapes)
        batch = rows.next()
        total = 0.0
        for shape in shapes:
            set_routed_shape(model, shape)
            loss = layer_error(model, states, index, shape, batch) / len(shapes)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        errors.append(total)
        bar.set_postfix(layer=index, error=f"{total:.4f}")
        bar.update(1)
    for parameter in parameters:
        parameter.requires_grad_(False)
    return errors[0], errors[-1]

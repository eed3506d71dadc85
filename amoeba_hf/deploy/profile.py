"""Measured speed and memory of shapes on this machine: prefill, time to first token, decode, peak memory.

Parameter counts do not predict speed: per-layer work that no width removes (norms, attention, kernel launches,
Python), the LM head, and non-uniform (global) widths make shapes of equal size run at different speeds. So a
deployment decision needs measurements, and measurements are slow: they are cached per device and settings in
the checkpoint folder (`.amoeba_cache/amoeba_profile.json`, never pushed), and a later call measures only the shapes it
has not seen.

Noise control: every repetition measures all shapes round-robin (machine noise hits them alike), a first
repetition warms up (and measures memory), and the stored numbers are medians.
"""

import ctypes
import gc
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from ..io import write_text_atomically
from ..modeling.shape_space import shape_key

# Measurements name this machine (CPU model, GPU, library versions): they stay in a hidden folder of the checkpoint,
# which `amoeba push` never uploads.
CACHE_DIR = ".amoeba_cache"
PROFILE_FILE = f"{CACHE_DIR}/amoeba_profile.json"
PROFILE_FORMAT = 1
MODES = ("elastic", "exported")


@dataclass(frozen=True)
class ProfileSettings:
    """What is measured, and therefore part of the cache key; also flags of `amoeba profile` and `amoeba search`.
    Repetitions only change precision, so they are not here.

    Each batch size runs every prompt length (prefill), then decodes `new_tokens` greedy steps after the longest
    prompt. Batch 1 prefill is the time to first token.
    """

    prompt_lengths: tuple[int, ...] = field(default=(128,), metadata={"help": "prefill lengths in tokens"})
    batch_sizes: tuple[int, ...] = field(default=(1, 4), metadata={"help": "batch sizes to measure"})
    new_tokens: int = field(default=16, metadata={"help": "decode steps measured after the longest prompt"})

    def __post_init__(self):
        """Validated and normalised (sorted, without repeats) on creation: an instance is a cache key."""
        self.validate()
        for name in ("prompt_lengths", "batch_sizes"):
            object.__setattr__(self, name, tuple(sorted(set(getattr(self, name)))))

    def validate(self) -> None:
        for name in ("prompt_lengths", "batch_sizes"):
            values = tuple(getattr(self, name))
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
        if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int) or self.new_tokens < 1:
            raise ValueError(f"new_tokens must be a positive integer, got {self.new_tokens!r}")

    def describe(self) -> str:
        return (f"prompts {','.join(map(str, self.prompt_lengths))} | batches {','.join(map(str, self.batch_sizes))}"
                f" | {self.new_tokens} new tokens")


@dataclass(frozen=True)
class Runtime:
    """Where the numbers were measured: a profile is only valid for the same device, threads, dtype and torch."""

    device: str
    threads: int
    dtype: str
    torch_version: str

    @classmethod
    def of(cls, model: PreTrainedModel) -> "Runtime":
        device = model.device
        if device.type == "cuda":
            name = f"cuda: {torch.cuda.get_device_name(device)}"
        else:
            name = f"{device.type}: {_cpu_name()}"
        return cls(name, torch.get_num_threads(), str(model.dtype).removeprefix("torch."), torch.__version__)

    def describe(self) -> str:
        return f"{self.device} | {self.threads} threads | {self.dtype} | torch {self.torch_version}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class ShapeProfile:
    """Medians for one shape in one form (elastic model at that shape, or its exported subnet).

    `peak_memory_bytes` is the model's weights (all of the elastic model's; only the subnet's when exported) plus
    the peak of activations and KV cache of one batch's workload; the runtime itself (Python, libraries, CUDA
    context) is not included. None where this platform cannot measure it.
    """

    prefill_ms: dict[str, float]
    decode_ms_per_step: dict[str, float]
    peak_memory_bytes: dict[str, int | None]
    weight_bytes: int
    layers: str
    repeats: int
    measured: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def ttft_ms(self, prompt_length: int) -> float:
        return self.prefill_ms[f"1x{prompt_length}"]

    def prefill_tokens_per_s(self, batch_size: int, prompt_length: int) -> float:
        return 1e3 * batch_size * prompt_length / self.prefill_ms[f"{batch_size}x{prompt_length}"]

    def decode_latency_ms(self, batch_size: int) -> float:
        """Time per generated token of each sequence (one decode step of the batch)."""
        return self.decode_ms_per_step[str(batch_size)]

    def decode_tokens_per_s(self, batch_size: int) -> float:
        """Generated tokens per second over the whole batch."""
        return 1e3 * batch_size / self.decode_ms_per_step[str(batch_size)]

    def memory_bytes(self, batch_size: int) -> int | None:
        return self.peak_memory_bytes.get(str(batch_size))


@dataclass
class DeviceProfile:
    """All measured shapes of one checkpoint for one runtime and settings: shape key -> mode -> profile."""

    runtime: Runtime
    settings: ProfileSettings
    shapes: dict[str, dict[str, ShapeProfile]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.runtime.describe()} | {self.settings.describe()}"

    def get(self, depth: int, width: float, mode: str) -> ShapeProfile | None:
        return self.shapes.get(shape_key(depth, width), {}).get(mode)

    def to_json(self) -> dict:
        return {
            "runtime": asdict(self.runtime),
            "settings": asdict(self.settings),
            "shapes": {key: {mode: asdict(p) for mode, p in modes.items()} for key, modes in self.shapes.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "DeviceProfile":
        settings = data["settings"]
        return cls(
            Runtime(**data["runtime"]),
            ProfileSettings(tuple(settings["prompt_lengths"]), tuple(settings["batch_sizes"]), settings["new_tokens"]),
            {key: {mode: ShapeProfile(**p) for mode, p in modes.items()} for key, modes in data["shapes"].items()},
        )


def layer_signature(model: PreTrainedModel, depth: int, width: float) -> str:
    """Fingerprint of what a shape runs (kept layers and their sizes): a re-calibrated folder invalidates it."""
    widths = model.shape_space.layer_widths(depth, width)
    sizes = [model.config.hidden_size, model.config.vocab_size]
    sizes += [[index, size.key_value_groups, size.intermediate_size] for index, size in sorted(widths.items())]
    if model.config.attention_unit == "query_heads":
        sizes.append([size.query_heads_per_group for _, size in sorted(widths.items())])
    return hashlib.sha1(json.dumps(sizes).encode()).hexdigest()[:12]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, shared (tied) storage counted once."""
    storages = {}
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_prefill(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[float, Cache, torch.Tensor]:
    """Seconds to read a batch of prompts and pick each one's next token, as `generate` does (the time to first
    token at batch 1); returns the filled cache and the picked tokens for `time_decode`."""
    _synchronize(input_ids.device)
    start = time.perf_counter()
    output = model(input_ids, use_cache=True, logits_to_keep=1)
    next_tokens = output.logits[:, -1:].argmax(dim=-1)
    _synchronize(input_ids.device)
    return time.perf_counter() - start, output.cache, next_tokens


@torch.inference_mode()
def time_decode(model: PreTrainedModel, cache: Cache, next_tokens: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy decode steps from a filled cache (the per-token cost of generation)."""
    _synchronize(next_tokens.device)
    start = time.perf_counter()
    for _ in range(steps):
        output = model(next_tokens, cache=cache, use_cache=True)
        next_tokens = output.logits[:, -1:].argmax(dim=-1)
    _synchronize(next_tokens.device)
    return time.perf_counter() - start


def time_set_shape(model: PreTrainedModel, shapes: list[tuple[int, float]], switches: int = 100) -> list[float]:
    """Milliseconds of each of `switches` shape switches, cycling through `shapes`, after one untimed switch (the
    first builds the cached shape space); the shape is restored after."""
    times = []
    with model.shaped(*shapes[-1]):
        for index in range(switches):
            start = time.perf_counter()
            model.set_shape(*shapes[index % len(shapes)])
            times.append((time.perf_counter() - start) * 1e3)
    return times


class _PeakMemory:
    """Peak memory a block allocates above what is resident before it: the CUDA allocator's peak, or on Linux the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs after returning free heap pages)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> "_PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._start = _status_bytes("VmRSS")
        except (OSError, KeyError):
            self._start = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            self.bytes = max(0, _status_bytes("VmHWM") - self._start)


def _status_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


class _Samples:
    """Timings of one (shape, mode) across repetitions."""

    def __init__(self):
        self.prefill: dict[str, list[float]] = {}
        self.decode: dict[str, list[float]] = {}
        self.memory: dict[str, int | None] = {}


def _run_workload(model: PreTrainedModel, prompts: dict[tuple[int, int], torch.Tensor], settings: ProfileSettings,
                  samples: _Samples, measure_memory: bool) -> None:
    longest = settings.prompt_lengths[-1]
    for batch in settings.batch_sizes:
        peak = _PeakMemory(model.device)
        with peak if measure_memory else nullcontext():
            for length in settings.prompt_lengths:
                seconds, cache, next_tokens = time_prefill(model, prompts[batch, length])
                samples.prefill.setdefault(f"{batch}x{length}", []).append(seconds * 1e3)
                if length == longest:
                    seconds = time_decode(model, cache, next_tokens, settings.new_tokens)
                    samples.decode.setdefault(str(batch), []).append(seconds * 1e3 / settings.new_tokens)
                del cache, next_tokens
        if measure_memory:
            samples.memory[str(batch)] = peak.bytes


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _groups(model: PreTrainedModel, shapes: list[tuple[int, float]], exported: bool) -> list[list[tuple[int, float]]]:
    """Shapes measured together (round-robin) while their exported subnets, held in memory, take at most a quarter
    of the free memory: exporting again in every repetition would cost more than the measurement."""
    if not exported:
        return [shapes]
    limit = _available_bytes(model.device) // 4
    per_parameter = model.dtype.itemsize
    groups, current, used = [], [], 0
    for shape in shapes:
        size = model.shape_space.parameter_count(*shape) * per_parameter
        if current and used + size > limit:
            groups.append(current)
            current, used = [], 0
        current.append(shape)
        used += size
    return groups + [current]


def profile_shapes(
    model: PreTrainedModel,
    shapes: Iterable[tuple[int, float]],
    settings: ProfileSettings = ProfileSettings(),
    *,
    modes: Iterable[str] = MODES,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, ShapeProfile]]:
    """Measure shapes of an any-shape model now (no cache): shape key -> mode -> medians of `repeats` runs.

    `elastic` runs the model itself after `set_shape`; `exported` runs `export_subnet` copies, which are held in
    memory for the run (in groups that fit a quarter of free memory). The model's shape is restored afterwards.
    """
    modes = tuple(dict.fromkeys(modes))
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"unknown profile modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    shapes = list(dict.fromkeys(model.shape_space.validate(*shape) for shape in shapes))
    generator = torch.Generator().manual_seed(0)
    prompts = {
        (batch, length): torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        for batch in settings.batch_sizes for length in settings.prompt_lengths
    }
    prompts = {key: ids.to(model.device) for key, ids in prompts.items()}
    results = {}
    for group in _groups(model, shapes, "exported" in modes):
        subnets = {}
        if "exported" in modes:
            subnets = {shape: model.export_subnet(*shape).to(model.device) for shape in group}
        samples = {(shape, mode): _Samples() for shape in group for mode in modes}
        for repetition in range(repeats + 1):
            for shape in group:
                for mode in modes:
                    with nullcontext(subnets[shape]) if mode == "exported" else model.shaped(*shape) as target:
                        _run_workload(target, prompts, settings, samples[shape, mode], measure_memory=repetition == 0)
            if progress is not None:
                progress(f"profiled {len(group)} shapes: {'warm-up' if repetition == 0 else 'repetition'} "
                         f"{repetition}/{repeats} done")
        for shape in group:
            signature = layer_signature(model, *shape)
            for mode in modes:
                sample = samples[shape, mode]
                weights = weight_bytes(subnets[shape] if mode == "exported" else model)
                results.setdefault(shape_key(*shape), {})[mode] = ShapeProfile(
                    prefill_ms={k: statistics.median(v[1:]) for k, v in sample.prefill.items()},
                    decode_ms_per_step={k: statistics.median(v[1:]) for k, v in sample.decode.items()},
                    peak_memory_bytes={k: None if v is None else weights + v for k, v in sample.memory.items()},
                    weight_bytes=weights,
                    layers=signature,
                    repeats=repeats,
                )
        del subnets
    return results


def load_profiles(folder: str | Path) -> dict[str, DeviceProfile]:
    """Every cached profile of a checkpoint folder, by key (empty if none); a damaged file raises ValueError."""
    path = Path(folder) / PROFILE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {PROFILE_FORMAT}")
        profiles = [DeviceProfile.from_json(entry) for entry in data["profiles"].values()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a valid profile cache ({error}); delete it to measure again") from None
    return {profile.key: profile for profile in profiles}


def save_profile(folder: str | Path, profile: DeviceProfile) -> None:
    """Merge a profile's shapes into the folder's cache (re-read first, so concurrent writers lose nothing)."""
    profiles = load_profiles(folder)
    stored = profiles.setdefault(profile.key, DeviceProfile(profile.runtime, profile.settings))
    for key, modes in profile.shapes.items():
        stored.shapes.setdefault(key, {}).update(modes)
    data = {"format": PROFILE_FORMAT, "profiles": {key: p.to_json() for key, p in profiles.items()}}
    write_text_atomically(Path(folder) / PROFILE_FILE, json.dumps(data, indent=1) + "\n")


def profile_checkpoint(
    model: PreTrainedModel,
    folder: str | Path,
    shapes: Iterable[tuple[int, float]],
    settings: ProfileSettings = ProfileSettings(),
    *,
    modes: Iterable[str] = MODES,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> DeviceProfile:
    """The folder's cached profile for this runtime and settings, after measuring the shapes (and modes) it lacks.

    A cached shape whose layers changed since it was measured (the folder was re-calibrated) is measured again.
    """
    modes = tuple(dict.fromkeys(modes))
    runtime = Runtime.of(model)
    cached = load_profiles(folder).get(DeviceProfile(runtime, settings).key) or DeviceProfile(runtime, settings)
    needs = {}
    for shape in dict.fromkeys(model.shape_space.validate(*shape) for shape in shapes):
        signature = layer_signature(model, *shape)
        stale = tuple(mode for mode in modes if getattr(cached.get(*shape, mode), "layers", None) != signature)
        if stale:
            needs.setdefault(stale, []).append(shape)
    for stale_modes, stale_shapes in needs.items():
        if progress is not None:
            progress(f"profiling {len(stale_shapes)} shapes ({', '.join(stale_modes)}) on {runtime.describe()}")
        measured = profile_shapes(model, stale_shapes, settings, modes=stale_modes, repeats=repeats, progress=progress)
        save_profile(folder, DeviceProfile(runtime, settings, measured))
        for key, by_mode in measured.items():
            cached.shapes.setdefault(key, {}).update(by_mode)
    return cached


def format_profile(profile: DeviceProfile, space, shapes: Iterable[tuple[int, float]], modes: Iterable[str] = MODES
                   ) -> str:
    """Fixed-width table: per shape and mode, time to first token, prefill and decode speed, peak memory."""
    settings = profile.settings
    first = settings.prompt_lengths[0]
    columns = [f"TTFT@{first} ms"]
    columns += [f"prefill {b}x{n} tok/s" for b in settings.batch_sizes for n in settings.prompt_lengths]
    columns += [f"decode b{b} tok/s" for b in settings.batch_sizes] + [f"ms/token b{settings.batch_sizes[0]}"]
    columns += [f"memory b{b} MB" for b in settings.batch_sizes]
    lines = [f"{profile.runtime.describe()} | {settings.describe()}",
             f"{'shape':<9} {'mode':<8} {'parameters':>12}  " + "  ".join(columns)]
    for depth, width in shapes:
        for mode in modes:
            measured = profile.get(depth, width, mode)
            if measured is None:
                continue
            values = [measured.ttft_ms(first)]
            values += [measured.prefill_tokens_per_s(b, n)
                       for b in settings.batch_sizes for n in settings.prompt_lengths]
            values += [measured.decode_tokens_per_s(b) for b in settings.batch_sizes]
            values += [measured.decode_latency_ms(settings.batch_sizes[0])]
            values += [None if (m := measured.memory_bytes(b)) is None else m / 2**20 for b in settings.batch_sizes]
            cells = ["-".rjust(len(c)) if v is None else f"{v:>{len(c)}.1f}" for c, v in zip(columns, values)]
            lines.append(f"{shape_key(depth, width):<9} {mode:<8} {space.parameter_count(depth, width):>12,}  "
                         + "  ".join(cells))
    return "\n".join(lines)


__all__ = [
    "CACHE_DIR",
    "MODES",
    "PROFILE_FILE",
    "DeviceProfile",
    "ProfileSettings",
    "Runtime",
    "ShapeProfile",
    "format_profile",
    "load_profiles",
    "profile_checkpoint",
    "profile_shapes",
    "save_profile",
    "time_decode",
    "time_prefill",
    "time_set_shape",
]

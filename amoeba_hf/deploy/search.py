"""Choose the shape to deploy: the best quality within a latency, throughput, memory or size budget.

Quality comes from stored `amoeba eval` results (or a quick evaluation); speed and memory come from measurements
on this device (`profiling.py`), never from parameter counts: at equal size a shallower shape runs faster than a
narrower one, and global widths spend the same parameters unevenly across layers.
"""

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evaluation.report import LOWER_IS_BETTER, headline_columns, metric_columns, pareto_front
from ..evaluation.runner import EvalSettings, evaluate_shapes
from ..evaluation.tasks import task_label
from ..modeling.shape_space import shape_key
from ..plotting import png_figure
from .profile import CACHE_DIR, MODES, DeviceProfile, ProfileSettings, profile_checkpoint

QUICK_EVAL_FILE = f"{CACHE_DIR}/amoeba_quick_eval.json"
FRONTIER_FILE = "amoeba_frontier.png"
QUICK_LIMIT = 200
QUICK_PPL_WINDOWS = 8
QUICK_PPL_WINDOW = 1024


@dataclass(frozen=True)
class Resource:
    """A measurable property of a shape that a budget can limit."""

    name: str
    unit: str
    attribute: str
    lower_is_better: bool

    def format(self, value: float) -> str:
        if self.attribute == "parameters":
            return f"{value / 1e6:.1f}M"
        return f"{value:.3g} {self.unit}" if value < 100 else f"{value:.0f} {self.unit}"


LATENCY = Resource("decode latency", "ms/token", "latency_ms", True)
THROUGHPUT = Resource("decode throughput", "tokens/s", "tokens_per_s", False)
MEMORY = Resource("peak memory", "GB", "memory_gb", True)
PARAMETERS = Resource("parameters", "parameters", "parameters", True)


@dataclass(frozen=True)
class Budget:
    """Limits a deployed shape must meet (any combination; at least one). Latency and throughput are of decoding
    at the search's batch size; memory is weights plus activations and KV cache at that batch size."""

    max_latency_ms: float | None = None
    min_tokens_per_s: float | None = None
    max_memory_gb: float | None = None
    max_params: int | None = None

    def limits(self) -> list[tuple[Resource, float]]:
        """(resource, limit) pairs in priority order: the first one is the frontier's axis."""
        pairs = [(LATENCY, self.max_latency_ms), (THROUGHPUT, self.min_tokens_per_s), (MEMORY, self.max_memory_gb),
                 (PARAMETERS, self.max_params)]
        return [(resource, limit) for resource, limit in pairs if limit is not None]

    def validate(self) -> None:
        if not self.limits():
            raise ValueError("give at least one budget: max latency (ms/token), min tokens/s, max memory (GB) or "
                             "max parameters")
        for name, value in asdict(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    @property
    def needs_profile(self) -> bool:
        return any(resource is not PARAMETERS for resource, _ in self.limits())

    def describe(self) -> str:
        return ", ".join(_describe_limit(resource, limit) for resource, limit in self.limits())


def _describe_limit(resource: Resource, limit: float) -> str:
    return f"{resource.name} {'<=' if resource.lower_is_better else '>='} {resource.format(limit)}"


@dataclass(frozen=True)
class Quality:
    """One quality metric per shape, e.g. WikiText-2 perplexity."""

    label: str
    lower_is_better: bool
    values: dict[tuple[int, float], float]


@dataclass(frozen=True)
class Candidate:
    """A shape with its quality and (where measured) its speed and memory on this device."""

    depth: int
    width: float
    parameters: int
    quality: float
    latency_ms: float | None = None
    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    memory_gb: float | None = None

    @property
    def key(self) -> str:
        return shape_key(self.depth, self.width)

    def value(self, resource: Resource) -> float | None:
        return getattr(self, resource.attribute)


@dataclass(frozen=True)
class SearchResult:
    """The chosen shape, the accuracy-efficiency frontier along the budget's first resource (among the shapes that
    meet its other limits, so the chosen shape is on it), and every candidate."""

    best: Candidate
    frontier: list[Candidate]
    candidates: list[Candidate]
    budget: Budget
    quality_label: str
    lower_is_better: bool
    context: str

    @property
    def resource(self) -> Resource:
        return self.budget.limits()[0][0]


class BudgetError(ValueError):
    """No candidate shape meets the budget."""


def _quality_order(value: float, lower_is_better: bool) -> float:
    """Sort key, smaller is better; NaN (a diverged evaluation) is worst."""
    if math.isnan(value):
        return math.inf
    return value if lower_is_better else -value


def _cost(candidate: Candidate, resource: Resource) -> float:
    value = candidate.value(resource)
    return value if resource.lower_is_better else -value


def search_shape(
    candidates: list[Candidate], budget: Budget, *, quality_label: str, lower_is_better: bool, context: str = ""
) -> SearchResult:
    """The best-quality candidate within every limit of the budget (ties: the cheaper one).

    Raises BudgetError naming, for each limit, the best value any candidate achieves.
    """
    budget.validate()
    if not candidates:
        raise ValueError("no candidate shapes: the quality source holds no results for this model")
    limits = budget.limits()
    for resource, _ in limits:
        unmeasured = [c.key for c in candidates if c.value(resource) is None]
        if unmeasured:
            raise ValueError(f"{resource.name} was not measured for shapes {', '.join(unmeasured)}")
    feasible = [c for c in candidates if all(_meets(c, resource, limit) for resource, limit in limits)]
    if not feasible:
        raise BudgetError(_impossible_budget_message(candidates, limits, context))
    primary = limits[0][0]
    best = min(feasible, key=lambda c: (_quality_order(c.quality, lower_is_better), _cost(c, primary), c.parameters))
    within_others = [c for c in candidates if all(_meets(c, resource, limit) for resource, limit in limits[1:])]
    frontier = pareto_front(within_others, cost=lambda c: _cost(c, primary),
                            badness=lambda c: _quality_order(c.quality, lower_is_better))
    return SearchResult(best, frontier, candidates, budget, quality_label, lower_is_better, context)


def _meets(candidate: Candidate, resource: Resource, limit: float) -> bool:
    value = candidate.value(resource)
    return value <= limit if resource.lower_is_better else value >= limit


def _impossible_budget_message(candidates: list[Candidate], limits: list[tuple[Resource, float]], context: str) -> str:
    parts = []
    for resource, limit in limits:
        extreme = min(candidates, key=lambda c: _cost(c, resource))
        word = "smallest" if resource.lower_is_better else "largest"
        parts.append(f"{_describe_limit(resource, limit)}: the {word} achievable is "
                     f"{resource.format(extreme.value(resource))} (shape {extreme.key})")
    where = f" ({context})" if context else ""
    lead = f"no shape of the {len(candidates)} candidates meets the budget{where}"
    if len(limits) > 1 and all(any(_meets(c, r, limit) for c in candidates) for r, limit in limits):
        lead += "; each limit alone can be met, but not all together"
    return f"{lead}: " + "; ".join(parts)


def _metric_for(results: dict, metric: str | None) -> tuple[str, str]:
    """(task, metric) for a name like `wikitext2` (its headline metric) or `arc_easy/acc`; default wikitext2."""
    columns = metric_columns(results)
    headline = dict(headline_columns(results))
    available = ", ".join(f"{t}/{m}" for t, m in columns) or "none"
    if metric is None:
        if not headline:
            raise ValueError("the evaluation results hold no finished scores")
        task = "wikitext2" if "wikitext2" in headline else next(iter(headline))
        return task, headline[task]
    task, _, name = metric.partition("/")
    task = task_label(task)
    if name:
        if (task, name) not in columns:
            raise ValueError(f"metric {metric!r} is not in the evaluation results; available: {available}")
        return task, name
    if task not in headline:
        raise ValueError(f"task {task!r} is not in the evaluation results; available: {available}")
    return task, headline[task]


def stored_quality(results: dict | str | Path, metric: str | None = None) -> Quality:
    """Per-shape quality from `amoeba eval --out` results (a file or its loaded dict).

    `metric` is a task (its headline metric: ppl, else acc_norm where reported, else acc) or `task/metric`.
    """
    if not isinstance(results, dict):
        path = Path(results)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not an evaluation results file ({error.msg})") from None
        if not isinstance(results, dict) or not isinstance(results.get("shapes"), dict):
            raise ValueError(f"{path} is not an evaluation results file (written by amoeba eval --out)")
    task, name = _metric_for(results, metric)
    values = {
        (entry["depth"], float(entry["width"])): float(entry["tasks"][task][name])
        for entry in results["shapes"].values() if name in entry["tasks"].get(task, {})
    }
    return Quality(f"{task} {name}", name in LOWER_IS_BETTER, values)


def quick_quality(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    shapes: list[tuple[int, float]],
    metric: str,
    data_dir: str | Path,
    *,
    batch_size: int = 8,
) -> Quality:
    """Score shapes on one task (`metric` as in `stored_quality`) with a small, fixed budget: perplexity over
    8 windows, or 200 seeded multiple-choice items.

    Results are kept in `.amoeba_cache/amoeba_quick_eval.json` in the checkpoint folder (never pushed), so a later
    search scores only new shapes; a file from other data or settings is replaced.
    """
    window = min(QUICK_PPL_WINDOW, model.config.max_position_embeddings)
    settings = EvalSettings(str(Path(data_dir).resolve()), limit=QUICK_LIMIT, ppl_window=window,
                            ppl_tokens=QUICK_PPL_WINDOWS * window)
    out = Path(folder) / QUICK_EVAL_FILE
    model_name = str(Path(folder).resolve())
    if out.is_file():
        try:
            saved = json.loads(out.read_text(encoding="utf-8"))
            stale = saved.get("model") != model_name or saved.get("settings") != asdict(settings)
        except json.JSONDecodeError:
            stale = True
        if stale:
            out.unlink()
    results = evaluate_shapes(model, tokenizer, shapes, [metric.partition("/")[0]], settings, model_name=model_name,
                              out=out, batch_size=batch_size)
    quality = stored_quality(results, metric)
    wanted = {(depth, float(width)) for depth, width in shapes}
    return Quality(f"{quality.label} (quick)", quality.lower_is_better,
                   {shape: value for shape, value in quality.values.items() if shape in wanted})


def _checked_shapes(space, quality: Quality) -> list[tuple[int, float]]:
    """The scored shapes, largest first; a shape this checkpoint cannot run means the results are another model's."""
    for depth, width in quality.values:
        try:
            space.validate(depth, width)
        except ValueError as error:
            raise ValueError(f"the evaluation results hold shape {shape_key(depth, width)}, which this checkpoint "
                             f"cannot run ({error}): were they made for another model?") from None
    return sorted(quality.values, key=lambda shape: (-shape[0], -shape[1]))


def build_candidates(
    space, quality: Quality, profile: DeviceProfile | None, *, mode: str = "exported", batch_size: int = 1
) -> list[Candidate]:
    """One candidate per shape with a quality score; measured numbers from `profile` (decode at `batch_size`,
    time to first token at the shortest prompt) when given."""
    candidates = []
    for depth, width in _checked_shapes(space, quality):
        measured = {}
        if profile is not None:
            shape_profile = profile.get(depth, width, mode)
            if shape_profile is None:
                raise ValueError(f"shape {shape_key(depth, width)} has no {mode} profile")
            memory = shape_profile.memory_bytes(batch_size)
            measured = {
                "latency_ms": shape_profile.decode_latency_ms(batch_size),
                "tokens_per_s": shape_profile.decode_tokens_per_s(batch_size),
                "ttft_ms": shape_profile.ttft_ms(profile.settings.prompt_lengths[0]),
                "memory_gb": None if memory is None else memory / 1e9,
            }
        candidates.append(Candidate(depth, width, space.parameter_count(depth, width), quality.values[depth, width],
                                    **measured))
    return candidates


def search_checkpoint(
    model: PreTrainedModel,
    folder: str | Path,
    budget: Budget,
    quality: Quality,
    *,
    settings: ProfileSettings = ProfileSettings(),
    mode: str = "exported",
    batch_size: int = 1,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search the shapes that have a quality score; if the budget limits speed or memory, they are profiled first
    (cached in `folder`, so only shapes never measured with these settings on this device cost time).

    `mode` says what will be deployed: `exported` subnets (`export_subnet`) or the `elastic` model at that shape.
    """
    budget.validate()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    profile, context = None, "parameter counts"
    if budget.needs_profile:
        if batch_size not in settings.batch_sizes:
            raise ValueError(f"batch size {batch_size} is not among the profiled batch sizes "
                             f"{', '.join(map(str, settings.batch_sizes))}")
        shapes = _checked_shapes(model.shape_space, quality)
        profile = profile_checkpoint(model, folder, shapes, settings, modes=(mode,), repeats=repeats,
                                     progress=progress)
        form = "exported subnets" if mode == "exported" else "elastic model"
        context = f"batch {batch_size}, {form}, {profile.runtime.describe()}"
    candidates = build_candidates(model.shape_space, quality, profile, mode=mode, batch_size=batch_size)
    return search_shape(candidates, budget, quality_label=quality.label, lower_is_better=quality.lower_is_better,
                        context=context)


def format_search(result: SearchResult) -> str:
    """The frontier as a table (the chosen shape marked *) and a line naming the choice."""
    columns = [("parameters", lambda c: f"{c.parameters / 1e6:.1f}M"),
               ("ms/token", lambda c: _number(c.latency_ms)), ("tokens/s", lambda c: _number(c.tokens_per_s)),
               ("TTFT ms", lambda c: _number(c.ttft_ms)), ("memory GB", lambda c: _number(c.memory_gb, 3)),
               (result.quality_label, lambda c: _number(c.quality, 4))]
    widths = [max(10, len(name)) for name, _ in columns]
    title = (f"frontier: {result.quality_label} vs {result.resource.name} ({result.context}), "
             f"{len(result.frontier)} of {len(result.candidates)} shapes")
    lines = [
        title,
        f"  {'shape':<9} " + " ".join(f"{name:>{w}}" for (name, _), w in zip(columns, widths)),
    ]
    for candidate in result.frontier:
        mark = "*" if candidate == result.best else " "
        lines.append(f"{mark} {candidate.key:<9} " + " ".join(f"{cell(candidate):>{w}}"
                                                              for (_, cell), w in zip(columns, widths)))
    best = result.best
    measured = "".join(f", {resource.format(best.value(resource))}" for resource, _ in result.budget.limits()
                       if resource is not PARAMETERS)
    lines.append(f"best within {result.budget.describe()}: {best.key} (depth {best.depth}, width {best.width:g}; "
                 f"{result.quality_label} {_number(best.quality, 4)}, {best.parameters / 1e6:.1f}M parameters"
                 f"{measured})")
    return "\n".join(lines)


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def plot_search(result: SearchResult, path: str | Path) -> None:
    """PNG: quality against the budget's resource (frontier, limit, choice); with measurements, also measured
    decode latency against parameters, where the dashed line is the parameter-count prediction."""
    with_latency = all(c.latency_ms is not None for c in result.candidates)
    size = (11, 4.2) if with_latency else (5.5, 4.2)
    with png_figure(path, 2 if with_latency else 1, size=size) as (figure, axes):
        _plot_quality_vs_cost(axes[0], result)
        if with_latency:
            _plot_latency_vs_parameters(axes[1], result.candidates)
        figure.suptitle(result.context, fontsize=8)


def _plot_quality_vs_cost(axis, result: SearchResult) -> None:
    resource, limit = result.budget.limits()[0]
    scale = 1e-6 if resource is PARAMETERS else 1.0
    xs = [c.value(resource) * scale for c in result.candidates]
    axis.scatter(xs, [c.quality for c in result.candidates], s=14, color="tab:gray", label="shapes")
    front = result.frontier
    axis.step([c.value(resource) * scale for c in front], [c.quality for c in front], where="post", color="tab:red",
              label="frontier")
    for candidate in front:
        axis.annotate(candidate.key, (candidate.value(resource) * scale, candidate.quality), fontsize=6,
                      xytext=(2, 2), textcoords="offset points")
    axis.axvline(limit * scale, color="tab:green", linestyle="--", label="budget")
    axis.scatter([result.best.value(resource) * scale], [result.best.quality], s=90, marker="*", color="tab:orange",
                 zorder=3, label=f"chosen {result.best.key}")
    if result.lower_is_better:
        axis.set_yscale("log")
    axis.set_xlabel(f"{resource.name} ({'M' if resource is PARAMETERS else resource.unit})")
    axis.set_ylabel(result.quality_label)
    axis.set_title("quality vs measured cost" if resource is not PARAMETERS else "quality vs size", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def _plot_latency_vs_parameters(axis, candidates: list[Candidate]) -> None:
    largest = max(candidates, key=lambda c: c.parameters)
    params = [c.parameters / 1e6 for c in candidates]
    axis.scatter(params, [c.latency_ms for c in candidates], s=14, color="tab:blue", label="measured")
    for candidate in candidates:
        axis.annotate(candidate.key, (candidate.parameters / 1e6, candidate.latency_ms), fontsize=6,
                      xytext=(2, 2), textcoords="offset points")
    slope = largest.latency_ms / largest.parameters
    axis.plot([0, largest.parameters / 1e6], [0, slope * largest.parameters], "--", color="tab:gray",
              label="proportional to parameters")
    axis.set_xlim(left=min(params) * 0.9)
    axis.set_ylim(bottom=min(c.latency_ms for c in candidates) * 0.9)
    axis.set_xlabel("parameters (M)")
    axis.set_ylabel("decode latency (ms/token)")
    axis.set_title("measured speed is not parameter count", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


__all__ = [
    "FRONTIER_FILE",
    "Budget",
    "BudgetError",
    "Candidate",
    "Quality",
    "SearchResult",
    "build_candidates",
    "format_search",
    "plot_search",
    "quick_quality",
    "search_checkpoint",
    "search_shape",
    "stored_quality",
]

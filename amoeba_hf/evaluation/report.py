"""Results of `evaluate_shapes` as a text table, a CSV file and a metric-vs-parameters frontier plot."""

import csv
import io
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ..io import write_text_atomically
from ..plotting import png_figure

T = TypeVar("T")

LOWER_IS_BETTER = {"ppl"}
METRIC_ORDER = ("ppl", "acc", "acc_norm")


def metric_columns(results: dict) -> list[tuple[str, str]]:
    """(task, metric) columns in first-seen task order: ppl for perplexity, acc (and acc_norm) otherwise."""
    columns = {}
    for entry in results["shapes"].values():
        for task, metrics in entry["tasks"].items():
            for metric in METRIC_ORDER:
                if metric in metrics:
                    columns[(task, metric)] = None
    return list(columns)


def headline_columns(results: dict) -> list[tuple[str, str]]:
    """One column per task for the plot: acc_norm where reported (the harness's headline for HellaSwag), else the first."""
    by_task: dict[str, str] = {}
    for task, metric in metric_columns(results):
        if task not in by_task or metric == "acc_norm":
            by_task[task] = metric
    return list(by_task.items())


def _rows(results: dict) -> list[list]:
    columns = metric_columns(results)
    rows = []
    for key, entry in results["shapes"].items():
        values = [entry["tasks"].get(task, {}).get(metric) for task, metric in columns]
        rows.append([key, entry["depth"], entry["width"], entry["parameters"], *values])
    return rows


def format_table(results: dict) -> str:
    """Fixed-width table: shape, parameters, then every metric (accuracies in %, perplexity as is)."""
    columns = metric_columns(results)
    names = [f"{task} {metric}" for task, metric in columns]
    widths = [max(9, len(n)) for n in names]
    lines = [f"{'shape':<9} {'parameters':>12}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for key, _, _, parameters, *values in _rows(results):
        cells = []
        for (_, metric), value, width in zip(columns, values, widths):
            text = "-" if value is None else f"{value:.2f}" if metric in LOWER_IS_BETTER else f"{100 * value:.1f}"
            cells.append(f"{text:>{width}}")
        lines.append(f"{key:<9} {parameters:>12,}  " + "  ".join(cells))
    return "\n".join(lines)


def write_csv(results: dict, path: str | Path) -> None:
    columns = metric_columns(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["shape", "depth", "width", "parameters", *(f"{task}/{metric}" for task, metric in columns)])
    writer.writerows(["" if v is None else v for v in row] for row in _rows(results))
    write_text_atomically(path, buffer.getvalue())


def pareto_front(items: Iterable[T], cost: Callable[[T], float], badness: Callable[[T], float]) -> list[T]:
    """Items that no cheaper-or-equal item beats, cheapest first: the accuracy-efficiency frontier.

    `badness` orders quality, smaller is better (a perplexity, or minus an accuracy); NaN (a diverged evaluation)
    is worse than anything and never on the front.
    """
    front, best = [], math.inf
    for item in sorted(items, key=lambda i: (cost(i), _nan_last(badness(i)))):
        order = _nan_last(badness(item))
        if order < best:
            front.append(item)
            best = order
    return front


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def plot_frontier(results: dict, path: str | Path) -> None:
    """One panel per task: every shape as a dot, the best-for-its-size shapes joined as the frontier (PNG)."""
    columns = headline_columns(results)
    if not columns:
        raise ValueError("no finished results to plot")
    with png_figure(path, len(columns), size=(4.2 * len(columns), 3.6)) as (figure, axes):
        for axis, (task, metric) in zip(axes, columns):
            _plot_task(axis, results, task, metric)
        figure.suptitle(results["model"], fontsize=9)


def _plot_task(axis, results: dict, task: str, metric: str) -> None:
    points = [
        (entry["parameters"], entry["tasks"][task][metric], key)
        for key, entry in results["shapes"].items() if task in entry["tasks"]
    ]
    lower_is_better = metric in LOWER_IS_BETTER
    scale = 1 if lower_is_better else 100
    axis.scatter([p / 1e6 for p, _, _ in points], [v * scale for _, v, _ in points], s=18, color="tab:blue")
    for parameters, value, key in points:
        axis.annotate(key, (parameters / 1e6, value * scale), fontsize=6, xytext=(2, 2), textcoords="offset points")
    front = pareto_front(points, cost=lambda p: p[0], badness=lambda p: p[1] if lower_is_better else -p[1])
    axis.step([p / 1e6 for p, _, _ in front], [v * scale for _, v, _ in front], where="post", color="tab:red",
              label="frontier")
    if lower_is_better:
        axis.set_yscale("log")
    axis.set_title(f"{task} {metric}")
    axis.set_xlabel("parameters (M)")
    axis.set_ylabel(metric if lower_is_better else f"{metric} (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


__all__ = ["format_table", "headline_columns", "metric_columns", "pareto_front", "plot_frontier", "write_csv"]

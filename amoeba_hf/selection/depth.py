"""Which layers each depth keeps: dynamic programming on a calibration score (AmoebaLLM §2) and baselines.

The DP scans removable layers from the last to the first. In state (n, m), m of the last n scanned layers are
removed and every earlier layer is kept, so a candidate's hidden states up to the layer just removed are the full
model's: `LayerRunner` caches them once and each candidate runs only the suffix.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..modeling.modeling_amoeba import LayerInputs
from .data import MultipleChoiceBatch

SCORES = ("ppl", "kl", "mmlu")


class LayerRunner:
    """Runs any subset of the decoder layers on calibration inputs, chunk by chunk, without a cache.

    Inputs, masks and rotary embeddings come from the model's own `prepare_inputs` and layers run through its
    `run_layers`, so a candidate computes what the model does with those layers (sliding windows included).
    `cache_layer_inputs()` stores the full model's input to every layer (layers x samples x seq x hidden floats)
    so a candidate can start at any layer. `layer_forwards` counts layer applications to the whole calibration
    set, the cost unit reported against the naive DP.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, chunk_size: int = 4):
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.inner.route(deterministic=True)
        self.chunks: list[LayerInputs] = []
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], chunk_size):
                mask = None if attention_mask is None else attention_mask[start : start + chunk_size]
                self.chunks.append(self.inner.prepare_inputs(input_ids[start : start + chunk_size], attention_mask=mask))
        self.layer_inputs: list[list[torch.Tensor]] | None = None
        self.final_hidden: list[torch.Tensor] | None = None
        self.layer_forwards = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _apply(self, index: int, hidden: torch.Tensor, chunk: LayerInputs) -> torch.Tensor:
        return self.inner.run_layers(hidden, [self.layers[index]], chunk)

    def cache_layer_inputs(self) -> None:
        """One full forward storing every layer's input and the final normalised hidden states."""
        self.layer_inputs = [[] for _ in range(self.num_layers)]
        self.final_hidden = []
        with torch.no_grad():
            for chunk in self.chunks:
                hidden = chunk.inputs_embeds
                for index in range(self.num_layers):
                    self.layer_inputs[index].append(hidden)
                    hidden = self._apply(index, hidden, chunk)
                self.final_hidden.append(self.inner.norm(hidden))
        self.layer_forwards += self.num_layers

    def final_states(self, removed: frozenset[int], start: int = 0) -> list[torch.Tensor]:
        """Final normalised hidden states with `removed` layers skipped, starting from the cached input of `start`.

        `start > 0` is valid only when no layer before `start` is removed (true for every DP candidate).
        """
        if start > 0 and self.layer_inputs is None:
            raise RuntimeError("call cache_layer_inputs() before starting at a later layer")
        kept = [self.layers[index] for index in range(start, self.num_layers) if index not in removed]
        outputs = []
        with torch.no_grad():
            for position, chunk in enumerate(self.chunks):
                hidden = chunk.inputs_embeds if start == 0 else self.layer_inputs[start][position]
                outputs.append(self.inner.norm(self.inner.run_layers(hidden, kept, chunk)))
        self.layer_forwards += len(kept)
        return outputs


def perplexity_score(runner: LayerRunner, input_ids: torch.Tensor, chunk_size: int = 4) -> Callable:
    """Perplexity of the calibration blocks (next-token cross-entropy, lower is better)."""

    def score(states: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for position, hidden in enumerate(states):
            logits = runner.model.lm_head(hidden[:, :-1]).float()
            ids = input_ids[position * chunk_size : (position + 1) * chunk_size].to(logits.device)
            total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
        return float(torch.tensor(total / count).exp())

    return score


def kl_score(runner: LayerRunner, cache_bytes: int = 2 << 30) -> Callable:
    """Mean KL(full || candidate) of next-token distributions. The teacher's log-probabilities are cached when
    they fit in `cache_bytes`, else recomputed per chunk from the cached final hidden states."""

    def teacher_log_probs(hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(runner.model.lm_head(hidden).float(), dim=-1)

    tokens = sum(h.shape[0] * h.shape[1] for h in runner.final_hidden)
    cached = None
    if tokens * runner.model.config.vocab_size * 4 <= cache_bytes:
        cached = [teacher_log_probs(hidden) for hidden in runner.final_hidden]

    def score(states: list[torch.Tensor]) -> float:
        total = 0.0
        for position, hidden in enumerate(states):
            teacher = cached[position] if cached is not None else teacher_log_probs(runner.final_hidden[position])
            student = F.log_softmax(runner.model.lm_head(hidden).float(), dim=-1)
            total += F.kl_div(student, teacher, log_target=True, reduction="sum").item()
        return total / tokens

    return score


def multiple_choice_score(runner: LayerRunner, batch: MultipleChoiceBatch, chunk_size: int = 4) -> Callable:
    """Cross-entropy of the right answer among the letter tokens (lower is better; smoother than accuracy)."""

    def score(states: list[torch.Tensor]) -> float:
        total = 0.0
        for position, hidden in enumerate(states):
            rows = slice(position * chunk_size, (position + 1) * chunk_size)
            on_device = batch.to(hidden.device)
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), on_device.last_index[rows]]
            letters = runner.model.lm_head(last)[:, on_device.letter_ids].float()
            total += F.cross_entropy(letters, on_device.answers[rows].to(letters.device), reduction="sum").item()
        return total / batch.answers.numel()

    return score


def removable_layers(num_layers: int, keep_last: int = 1, keep_first: bool = False) -> list[int]:
    """Layers the selection may remove, from the last to the first."""
    first = 1 if keep_first else 0
    return list(range(num_layers - 1 - keep_last, first - 1, -1))


def _tables_from_removed(num_layers: int, removed_by_count: dict[int, list[int]]) -> dict[str, list[int]]:
    table = {str(num_layers): list(range(num_layers))}
    for count, removed in removed_by_count.items():
        table[str(num_layers - count)] = [i for i in range(num_layers) if i not in set(removed)]
    return table


def dp_depth_table(
    num_layers: int,
    scan: list[int],
    max_removed: int,
    evaluate: Callable[[frozenset[int], int], float],
    state: dict | None = None,
    on_row: Callable[[dict], None] | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, list[int]], int]:
    """The DP of METHOD.md §2: returns the depth table and the number of candidate evaluations made now.

    `evaluate(removed, boundary)` scores a removal set (lower is better); every removed layer is >= `boundary`.
    `state` (from `on_row`) resumes after the last completed row; ties keep the layer.
    """
    if not 1 <= max_removed <= len(scan):
        raise ValueError(f"can remove between 1 and {len(scan)} layers with these options, asked for {max_removed}")
    done = state["n"] if state else 0
    row = {int(m): (frozenset(r), s) for m, (r, s) in state["row"].items()} if state else {0: (frozenset(), None)}
    total = sum(min(n, max_removed) for n in range(1, len(scan) + 1))
    evaluations = 0
    with tqdm(total=total, initial=sum(min(n, max_removed) for n in range(1, done + 1)), disable=not show_progress,
              desc="depth DP", unit="eval") as bar:
        for n in range(done + 1, len(scan) + 1):
            layer = scan[n - 1]
            new_row = {0: row[0]}
            for m in range(1, min(n, max_removed) + 1):
                candidate = row[m - 1][0] | {layer}
                value = evaluate(candidate, layer)
                evaluations += 1
                bar.update(1)
                if m not in row or value < row[m][1]:
                    new_row[m] = (candidate, value)
                else:
                    new_row[m] = row[m]
            row = new_row
            if on_row is not None:
                on_row({"n": n, "row": {str(m): [sorted(r), s] for m, (r, s) in row.items()}})
    removed = {m: sorted(row[m][0]) for m in range(1, max_removed + 1)}
    return _tables_from_removed(num_layers, removed), evaluations


def block_influence_table(runner: LayerRunner, scan: list[int], max_removed: int) -> dict[str, list[int]]:
    """ShortGPT baseline: remove the layers whose output is most similar to their input (lowest 1 - cos)."""
    if runner.layer_inputs is None:
        runner.cache_layer_inputs()
    influence = {}
    for index in scan:
        outputs = runner.layer_inputs[index + 1] if index + 1 < runner.num_layers else None
        similarities = []
        with torch.no_grad():
            for position, inputs in enumerate(runner.layer_inputs[index]):
                out = outputs[position] if outputs is not None else runner._apply(index, inputs, runner.chunks[position])
                similarities.append(F.cosine_similarity(inputs.flatten(0, 1), out.flatten(0, 1), dim=-1))
        influence[index] = 1.0 - torch.cat(similarities).mean().item()
    order = sorted(scan, key=lambda i: influence[i])
    return _tables_from_removed(runner.num_layers, {m: order[:m] for m in range(1, max_removed + 1)})


def drop_last_table(num_layers: int, scan: list[int], max_removed: int) -> dict[str, list[int]]:
    """Baseline: remove the last removable layers first (the uncalibrated default when keep_last=1)."""
    return _tables_from_removed(num_layers, {m: scan[:m] for m in range(1, max_removed + 1)})

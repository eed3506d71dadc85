"""Scoring a causal LM (at its current shape) on evaluation tasks: windowed perplexity, log-likelihood choice.

Perplexity protocol: the text (or each document, joined with EOS) is tokenised once with the tokenizer's default
special tokens (a BOS first for Llama, none for SmolLM2) and cut to a token budget; windows of
`window` tokens start every `stride` tokens (default: `stride = window`, non-overlapping) while a full window fits,
so a trailing partial window is dropped. A window predicts its tokens from its own context only; with overlapping
windows each token is scored once, by the first window that sees it with `window - stride` tokens of context
(the first window scores all but its first token). Perplexity is `exp(total NLL / scored tokens)`.

Multiple choice follows lm-evaluation-harness: `log p(" " + choice | context)` summed over the choice's tokens;
`acc` takes the argmax, `acc_norm` the argmax of the log-likelihood divided by the choice's length in characters.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..placement import input_device
from ..training.data import encode_documents
from .tasks import TARGET_DELIMITER, ChoiceItem, PerplexityTask, Task

# A forward pass streams every weight, so a separate pass for a shared prefix costs about as much as ~100 tokens:
# sharing pays for few-shot exemplars, not for the short stem that a question's options share.
MIN_SHARED_PREFIX = 128

Request = tuple[list[int], list[int]]


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> Request:
    """lm-evaluation-harness's split: trailing spaces move from the context to the continuation, the whole string
    is tokenised once and the context's tokens are cut off, so the continuation is tokenised as the model reads it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    if whole[: len(context_ids)] != context_ids or len(whole) == len(context_ids):
        raise ValueError(f"cannot split the tokens of context {context[-40:]!r} + continuation {continuation!r}")
    return context_ids, whole[len(context_ids):]


def _common_prefix_length(sequences: Sequence[tuple[int, ...]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return length


def _plan_batches(inputs: list[tuple[int, ...]], batch_size: int) -> list[list[tuple[int, ...]]]:
    """Inputs that share a prefix of at least MIN_SHARED_PREFIX tokens (prompts with the same few-shot exemplars)
    go in one batch so the prefix runs once; the rest go longest first, to waste little on padding."""
    batches, loose, current = [], [], []
    for tokens in sorted(inputs):
        if current and (len(current) == batch_size or _common_prefix_length(current + [tokens]) < MIN_SHARED_PREFIX):
            (batches if len(current) > 1 else loose).append(current)
            current = []
        current.append(tokens)
    (batches if len(current) > 1 else loose).append(current)
    loose = sorted((tokens for (tokens,) in loose), key=len, reverse=True)
    return batches + [loose[i : i + batch_size] for i in range(0, len(loose), batch_size)]


def _last_hidden_states(decoder: torch.nn.Module, inputs: list[tuple[int, ...]], shared: int) -> torch.Tensor:
    """Hidden states of right-padded inputs after their first `shared` (common) tokens.

    Right padding needs no attention mask: causal attention never lets a real token see the padding after it.
    A long common prefix runs once and is reused through the KV cache by every row.
    """
    length = max(len(x) for x in inputs)
    device = input_device(decoder)
    ids = torch.zeros((len(inputs), length - shared), dtype=torch.long)
    for row, tokens in enumerate(inputs):
        ids[row, : len(tokens) - shared] = torch.tensor(tokens[shared:])
    ids = ids.to(device)
    if shared == 0:
        return decoder(input_ids=ids, use_cache=False).last_hidden_state
    cache = decoder(input_ids=torch.tensor([inputs[0][:shared]], device=device), use_cache=True).cache
    cache.batch_repeat_interleave(len(inputs))
    return decoder(input_ids=ids, cache=cache, use_cache=True).last_hidden_state


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel, requests: Sequence[Request], *, batch_size: int = 8, progress: tqdm | None = None
) -> list[float]:
    """`sum log p(continuation | context)` per (context tokens, continuation tokens) request.

    As in lm-evaluation-harness the model reads `(context + continuation)[:-1]`, left-truncated to its maximum
    length. Requests with identical inputs (MMLU's answer letters) share one forward pass; inputs that share a
    long prefix are batched together and the prefix runs once; logits are computed only where a continuation is
    scored.
    """
    max_length = model.config.max_position_embeddings
    by_input: dict[tuple[int, ...], list[int]] = {}
    for index, (context, continuation) in enumerate(requests):
        if not continuation or len(continuation) > max_length or not context:
            raise ValueError(
                f"request {index}: needs a non-empty context and 1..{max_length} continuation tokens, "
                f"got {len(context)} and {len(continuation)}"
            )
        whole = (context + continuation)[-(max_length + 1):]
        by_input.setdefault(tuple(whole[:-1]), []).append(index)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    scores = [0.0] * len(requests)
    for batch in _plan_batches(list(by_input), batch_size):
        spans = [max(len(requests[i][1]) for i in by_input[x]) for x in batch]
        shared = min(_common_prefix_length(batch), *(len(x) - span for x, span in zip(batch, spans)))
        shared = shared if len(batch) > 1 and shared >= MIN_SHARED_PREFIX else 0
        hidden = _last_hidden_states(decoder, batch, shared)
        for row, (tokens, span) in enumerate(zip(batch, spans)):
            end = len(tokens) - shared
            logprobs = F.log_softmax(head(hidden[row, end - span : end]).float(), dim=-1)
            for index in by_input[tokens]:
                continuation = torch.tensor(requests[index][1], device=logprobs.device)
                picked = logprobs[span - len(continuation) :].gather(-1, continuation[:, None])
                scores[index] = picked.sum().item()
        if progress is not None:
            progress.update(sum(len(by_input[x]) for x in batch))
    return scores


def perplexity_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of every full window; see the module docstring for the protocol."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if num_tokens < window:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than one window of {window}; lower --ppl-window")
    starts = range(0, num_tokens - window + 1, stride)
    return [(start, 1 if start == 0 else max(1, window - stride)) for start in starts]


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel, token_ids: torch.Tensor, *, window: int, stride: int | None = None,
    batch_size: int = 8, progress: tqdm | None = None,
) -> dict[str, float]:
    """Perplexity of a 1-D token sequence over fixed windows (protocol in the module docstring)."""
    windows = perplexity_windows(len(token_ids), window, stride or window)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    total_nll, scored = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        ids = torch.stack([token_ids[begin : begin + window] for begin, _ in batch]).to(input_device(model))
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        for row, (_, first) in enumerate(batch):
            logits = head(hidden[row, first - 1 : window - 1]).float()
            total_nll += F.cross_entropy(logits, ids[row, first:window].to(logits.device), reduction="sum").item()
            scored += window - first
        if progress is not None:
            progress.update(len(batch))
    return {"ppl": math.exp(total_nll / scored), "nll": total_nll / scored, "tokens": scored, "windows": len(windows)}


@dataclass(frozen=True)
class EncodedText:
    name: str
    token_ids: torch.Tensor
    window: int
    stride: int


@dataclass(frozen=True)
class EncodedChoices:
    """A choice task's requests, grouped (one group, or one per MMLU subject) so a group's prompts share prefixes."""

    name: str
    groups: dict[str, tuple[ChoiceItem, ...]]
    requests: dict[str, list[Request]]
    report_acc_norm: bool


EncodedTask = EncodedText | EncodedChoices


def encode_task(
    task: Task, tokenizer: PreTrainedTokenizerBase, *, ppl_window: int = 2048, ppl_stride: int | None = None,
    ppl_tokens: int | None = None,
) -> EncodedTask:
    """Tokenise a task once so that every shape scores exactly the same tokens."""
    if isinstance(task, PerplexityTask):
        documents = (task.text,) if isinstance(task.text, str) else task.text
        ids = encode_documents(tokenizer, documents, max_tokens=ppl_tokens)
        if ppl_tokens is not None:
            ids = ids[:ppl_tokens]
        stride = ppl_stride or ppl_window
        perplexity_windows(len(ids), ppl_window, stride)
        return EncodedText(task.name, torch.tensor(ids), ppl_window, stride)
    groups = task.subjects if task.subjects is not None else {"": task.items}
    requests = {
        group: [encode_pair(tokenizer, item.context, TARGET_DELIMITER + c) for item in items for c in item.choices]
        for group, items in groups.items()
    }
    return EncodedChoices(task.name, dict(groups), requests, task.report_acc_norm)


def _accuracy(correct: list[bool]) -> tuple[float, float]:
    """Mean and lm-evaluation-harness's standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(correct)
    mean = sum(correct) / n
    return mean, math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else 0.0


def choice_predictions(item: ChoiceItem, logprobs: Sequence[float]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood per character of the choice); ties pick the first."""
    normalised = [score / len(choice) for score, choice in zip(logprobs, item.choices)]
    return max(range(len(logprobs)), key=logprobs.__getitem__), max(range(len(normalised)), key=normalised.__getitem__)


def score_task(
    model: PreTrainedModel, encoded: EncodedTask, *, batch_size: int = 8, description: str | None = None
) -> dict:
    """Metrics of one encoded task at the model's current shape, with a progress bar."""
    if isinstance(encoded, EncodedText):
        total = len(perplexity_windows(len(encoded.token_ids), encoded.window, encoded.stride))
        with tqdm(total=total, desc=description, unit="window", leave=False) as progress:
            return perplexity(model, encoded.token_ids, window=encoded.window, stride=encoded.stride,
                              batch_size=batch_size, progress=progress)
    acc, acc_norm, per_group = [], [], {}
    total = sum(len(r) for r in encoded.requests.values())
    with tqdm(total=total, desc=description, unit="choice", leave=False) as progress:
        for group, items in encoded.groups.items():
            logprobs = continuation_logprobs(model, encoded.requests[group], batch_size=batch_size, progress=progress)
            offset, correct = 0, []
            for item in items:
                pred, pred_norm = choice_predictions(item, logprobs[offset : offset + len(item.choices)])
                offset += len(item.choices)
                correct.append(pred == item.label)
                acc_norm.append(pred_norm == item.label)
            if correct:
                per_group[group] = _accuracy(correct)[0]
            acc.extend(correct)
    if not acc:
        raise ValueError(f"{encoded.name}: no items to score")
    if list(encoded.groups) != [""]:
        return {"acc": sum(per_group.values()) / len(per_group), "acc_micro": _accuracy(acc)[0], "items": len(acc),
                "subjects": per_group}
    mean, stderr = _accuracy(acc)
    metrics = {"acc": mean, "acc_stderr": stderr}
    if encoded.report_acc_norm:
        metrics["acc_norm"], metrics["acc_norm_stderr"] = _accuracy(acc_norm)
    return {**metrics, "items": len(acc)}


__all__ = [
    "EncodedChoices", "EncodedText", "choice_predictions", "continuation_logprobs", "encode_pair", "encode_task",
    "perplexity", "perplexity_windows", "score_task",
]

"""Depth bridges: one linear map per removed span, fitted in closed form on calibration activations (ReplaceMe).

When a shape removes layers i+1..j and keeps layer i before them, the residual stream after layer i stands in for the
one after layer j. A bridge maps layer i's MLP output X so that the stream after layer i approximates the stream
after layer j: with R = h_i - X (the residual before the MLP's add) and Y = h_j - R,

    T = argmin ||X T^T - Y||^2 + lam ||T - I||^2,   i.e.   (X^T X + lam I) T^T = X^T Y + lam I,

solved in float64 from Gram matrices accumulated over the calibration blocks (the activations are never all held).
`lam = ridge * trace(X^T X) / hidden` shrinks T towards the identity, plain removal, where the data say little.
Activations are the full model's, so a bridge depends only on its span (i, j) and depths removing the same span share
it. A span starting at layer 0 has no kept layer before it: it gets no bridge. T merges into layer i's down_proj on
export (W <- T W), so the exported subnet stays a stock config.
"""

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm


def bridge_spans(depth_table: dict[str, list[int]], num_layers: int) -> list[tuple[int, int]]:
    """(kept layer i, last removed layer j) of every maximal run of removed layers i+1..j that some depth of
    `depth_table` has after a kept layer, sorted; runs at the start (layer 0 removed) have no kept layer before."""
    spans = set()
    for layers in depth_table.values():
        kept = sorted(layers)
        for position, index in enumerate(kept):
            following = kept[position + 1] if position + 1 < len(kept) else num_layers
            if following > index + 1:
                spans.add((index, following - 1))
    return sorted(spans)


def bridge_parameters(spans: Iterable[tuple[int, int]], hidden_size: int) -> int:
    """Parameters the stored bridges add to the any-shape checkpoint (none to an exported subnet)."""
    return len(set(spans)) * hidden_size * hidden_size


def solve_bridge(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """T (float32) from X^T X and X^T Y (float64): `(X^T X + lam I) T^T = X^T Y + lam I`, `lam = ridge * mean
    eigenvalue of X^T X`."""
    hidden = gram.shape[0]
    identity = torch.eye(hidden, dtype=gram.dtype, device=gram.device)
    lam = ridge * torch.trace(gram) / hidden
    transposed = torch.linalg.solve(gram + lam * identity, cross + lam * identity)
    return transposed.T.to(torch.float32).contiguous()


def fit_depth_bridges(
    model,
    input_ids: torch.Tensor,
    spans: Iterable[tuple[int, int]],
    ridge: float = 1e-2,
    chunk_size: int = 4,
    show_progress: bool = True,
) -> dict[tuple[int, int], torch.Tensor]:
    """The bridge of each span, fitted on the full model's activations over `input_ids` (blocks without padding)."""
    spans = sorted(set(spans))
    if not spans:
        return {}
    inner = model.model
    kept_layers = sorted({kept for kept, _ in spans})
    ends = {end for _, end in spans}
    grams: dict[int, torch.Tensor] = {}
    crosses: dict[tuple[int, int], torch.Tensor] = {}
    mlp_outputs: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, args, output):
            mlp_outputs[index] = output
        return hook

    handles = [inner.layers[index].mlp.register_forward_hook(capture(index)) for index in kept_layers]
    try:
        with torch.no_grad(), model.shaped(*model.shape_space.full_shape):
            inner.route(deterministic=True)
            chunks = range(0, input_ids.shape[0], chunk_size)
            for start in tqdm(chunks, disable=not show_progress, desc="depth bridges", unit="chunk"):
                inputs = inner.prepare_inputs(input_ids[start : start + chunk_size])
                hidden = inputs.inputs_embeds
                outputs, streams = {}, {}  # kept in the model's dtype, widened to float64 one at a time below
                for index, layer in enumerate(inner.layers):
                    hidden = inner.run_layers(hidden, [layer], inputs)
                    if index in mlp_outputs:
                        outputs[index] = (hidden.flatten(0, -2), mlp_outputs.pop(index).flatten(0, -2))
                    if index in ends:
                        streams[index] = hidden.flatten(0, -2)
                for kept in kept_layers:
                    after, output = (tensor.double() for tensor in outputs.pop(kept))
                    gram = output.T @ output
                    grams[kept] = gram if kept not in grams else grams[kept].add_(gram)
                    for end in (end for first, end in spans if first == kept):
                        # Y = h_j - R with R = h_i - X the residual before layer i's MLP output was added
                        cross = output.T @ (streams[end].double() - after + output)
                        crosses[(kept, end)] = cross if (kept, end) not in crosses else crosses[(kept, end)].add_(cross)
    finally:
        for handle in handles:
            handle.remove()
    return {span: solve_bridge(grams[span[0]], crosses[span], ridge) for span in spans}


__all__ = ["bridge_parameters", "bridge_spans", "fit_depth_bridges", "solve_bridge"]

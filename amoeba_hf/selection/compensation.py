"""Width compensation: a least-squares update of the kept input columns of o_proj and down_proj per grid width
(the OBS family's closed form: SlimGPT, ZipLM, OSSCAR; FLAP's bias compensation is its zeroth-order term).

A width keeps a prefix K of a projection's input columns and removes the rest R. With x the calibration inputs at full
shape, the update dW of W_K that best stands in for the removed columns is

    dW = argmin E||W_R x_R - dW x_K - c||^2 + lam ||dW||^2  =  W_R C_RK (C_KK + lam I)^-1,

with C the centred covariance of x and c = W_R mu_R - dW mu_K when bias compensation is on (c is then free, and the
existing mean term W_R mu_R gains -dW mu_K), else C the uncentred second moment and no c. `lam = ridge * trace(C_KK)
/ |K|` shrinks dW towards zero, plain pruning, where the data say little. Sums are float64 over the calibration
blocks; dW is stored as its truncated SVD, B A with B (out x r) and A (r x |K|) float32. Widths are
nested prefixes, so one pass gives every grid width's solution.
"""

import torch
from tqdm.auto import tqdm

from ..modeling.shape_space import compensation_key, compensation_sizes
from .depth import LayerRunner


def layer_moments(
    model, layer, hidden: list[torch.Tensor], chunks: list
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, int]], list[torch.Tensor]]:
    """Per "o_proj" / "down_proj" of `layer`, the float64 sums X^T X and X over the projection's inputs and the token
    count, from running `layer` on each chunk's hidden states (`chunks`: `prepare_inputs` of each chunk); and the
    layer's outputs, the next layer's hidden states."""
    moments: dict[str, tuple] = {}

    def accumulate(name: str):
        def hook(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if name not in moments:
                moments[name] = (rows.T @ rows, rows.sum(0), rows.shape[0])
                return
            gram, total, count = moments[name]
            gram.addmm_(rows.T, rows)  # in place: no second in^2 matrix while summing
            moments[name] = (gram, total.add_(rows.sum(0)), count + rows.shape[0])
        return hook

    handles = [linear.register_forward_pre_hook(accumulate(name)) for name, linear in layer.output_projections()]
    try:
        hidden = [model.model.run_layers(states, [layer], inputs) for states, inputs in zip(hidden, chunks)]
    finally:
        for handle in handles:
            handle.remove()
    return moments, hidden


def second_moment(moments: tuple[torch.Tensor, torch.Tensor, int], centred: bool) -> torch.Tensor:
    """The fit's matrix C from the sums (X^T X, X, token count): X^T X, or with `centred` the covariance up to the
    count, X^T X - X^T 1 1^T X / n, computed in place (the sums are not used after)."""
    gram, total, count = moments
    return gram.addr_(total, total, alpha=-1.0 / count) if centred else gram


def solve_compensation(weight: torch.Tensor, second: torch.Tensor, kept: int, ridge: float) -> torch.Tensor:
    """dW (float64, out x kept) for keeping the first `kept` input columns of `weight`, from C (`second_moment`).

    Beside C, two kept x kept matrices at a time (the ridge-shifted block, then its Cholesky factor)."""
    inner, cross = second[:kept, :kept], second[:kept, kept:]
    lam = ridge * torch.trace(inner) / kept
    shifted = inner.clone()
    shifted.diagonal().add_(lam)
    factor = torch.linalg.cholesky(shifted)
    del shifted
    removed = weight[:, kept:].to(second)
    return torch.cholesky_solve(cross @ removed.T, factor).T


def low_rank(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), float32, with B A the best rank-`rank` approximation of `update` (zero rows/columns past its rank).

    From the eigenvectors of the smaller Gram matrix (the top singular vectors of one side): B A = U_r U_r^T dW or
    dW V_r V_r^T, the truncated SVD's product, at a third of a full SVD's cost.
    """
    rows = update.shape[0] <= update.shape[1]
    _, vectors = torch.linalg.eigh(update @ update.T if rows else update.T @ update)
    used = min(rank, vectors.shape[1])
    top = vectors[:, -used:].flip(1)
    a = torch.zeros(rank, update.shape[1], dtype=update.dtype, device=update.device)
    b = torch.zeros(update.shape[0], rank, dtype=update.dtype, device=update.device)
    if rows:
        a[:used], b[:, :used] = top.T @ update, top
    else:
        a[:used], b[:, :used] = top.T, update @ top
    return a.float().contiguous(), b.float().contiguous()


def fit_width_compensation(
    model,
    input_ids: torch.Tensor,
    rank: int = 128,
    ridge: float = 0.1,
    chunk_size: int = 4,
    show_progress: bool = True,
) -> dict[tuple[float, int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Width corrections of every grid width below 1 (the config's `width_grid`), in the form
    `AmoebaForCausalLM.set_width_compensation` takes, fitted on the model's current (permuted) weights over
    `input_ids` (blocks without padding). Centred when the model has bias compensation.

    Layer by layer over the blocks' hidden states, each layer's corrections solved before the next layer runs, so
    that one layer's sums are alive at a time: at 7-8B one down_proj Gram matrix is 1.6 GB in float64, all 32
    layers' sums 57 GB."""
    config = model.config
    if config.width_mode != "uniform":
        raise ValueError("width compensation needs width_mode='uniform' (global widths keep depth-dependent columns)")
    widths = [width for width in config.width_grid if width < 1.0]
    corrections = {}
    with torch.no_grad(), model.shaped(*model.shape_space.full_shape):
        chunks = LayerRunner(model, input_ids, chunk_size=chunk_size).chunks
        hidden = [inputs.inputs_embeds for inputs in chunks]
        layers = tqdm(model.model.layers, disable=not show_progress, desc="width compensation", unit="layer")
        for index, layer in enumerate(layers):
            moments, hidden = layer_moments(model, layer, hidden, chunks)
            for name, linear in layer.output_projections():
                sizes = compensation_sizes(config, name, model.shape_space.full_sizes[index], widths, rank)
                fitted = {width: sizes[compensation_key(width)] for width in widths if compensation_key(width) in sizes}
                for width, correction in projection_corrections(linear, moments.pop(name), fitted, ridge,
                                                                config.bias_compensation).items():
                    corrections[width, index, name] = correction
    return corrections


def projection_corrections(
    linear, moments: tuple[torch.Tensor, torch.Tensor, int], sizes: dict[float, tuple[int, int]], ridge: float,
    centred: bool
) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of one projection per grid width of `sizes` (width -> (rank, kept columns)), from its input sums (a
    function of its own, so that the sums are freed before the next layer runs)."""
    second = second_moment(moments, centred)
    corrections = {}
    for width, (rank, kept) in sizes.items():
        update = solve_compensation(linear.weight.detach(), second, kept, ridge)
        corrections[width] = low_rank(update, rank)
    return corrections


def compensation_parameters(corrections: dict[tuple[float, int, str], tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Parameters the stored corrections add to the any-shape checkpoint (none to an exported subnet)."""
    return sum(a.numel() + b.numel() for a, b in corrections.values())


__all__ = ["compensation_parameters", "fit_width_compensation", "layer_moments", "low_rank", "projection_corrections",
           "second_moment", "solve_compensation"]

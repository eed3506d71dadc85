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


def collect_moments(
    model, input_ids: torch.Tensor, chunk_size: int = 4, show_progress: bool = True
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int]]:
    """Per (layer, "o_proj" / "down_proj"), the float64 sums X^T X and X over the projection's inputs at full shape,
    and the token count."""
    moments: dict[tuple[int, str], list] = {}
    handles = []

    def accumulate(entry: tuple[int, str]):
        def hook(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            gram, total, count = moments.get(entry, (0, 0, 0))
            moments[entry] = (gram + rows.T @ rows, total + rows.sum(0), count + rows.shape[0])
        return hook

    for index, layer in enumerate(model.model.layers):
        for name, linear in layer.output_projections():
            handles.append(linear.register_forward_pre_hook(accumulate((index, name))))
    try:
        with torch.no_grad(), model.shaped(*model.shape_space.full_shape):
            model.model.route(deterministic=True)
            chunks = range(0, input_ids.shape[0], chunk_size)
            for start in tqdm(chunks, disable=not show_progress, desc="width compensation", unit="chunk"):
                model(input_ids[start : start + chunk_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def solve_compensation(
    weight: torch.Tensor, gram: torch.Tensor, total: torch.Tensor, count: int, kept: int, ridge: float, centred: bool
) -> torch.Tensor:
    """dW (float64, out x kept) for keeping the first `kept` input columns of `weight`, from the sums of X^T X and X
    over `count` tokens (centred covariance if `centred`, else the second moment)."""
    second = gram - torch.outer(total, total) / count if centred else gram
    inner, cross = second[:kept, :kept], second[:kept, kept:]
    lam = ridge * torch.trace(inner) / kept
    identity = torch.eye(kept, dtype=second.dtype, device=second.device)
    removed = weight[:, kept:].to(second)
    factor = torch.linalg.cholesky(inner + lam * identity)
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
    `input_ids` (blocks without padding). Centred when the model has bias compensation."""
    config = model.config
    if config.width_mode != "uniform":
        raise ValueError("width compensation needs width_mode='uniform' (global widths keep depth-dependent columns)")
    widths = [width for width in config.width_grid if width < 1.0]
    moments = collect_moments(model, input_ids, chunk_size, show_progress)
    corrections = {}
    for index, layer in enumerate(model.model.layers):
        for name, linear in layer.output_projections():
            sizes = compensation_sizes(config, name, model.shape_space.full_sizes[index], widths, rank)
            gram, total, count = moments[index, name]
            for width in widths:
                if compensation_key(width) not in sizes:
                    continue
                used_rank, kept = sizes[compensation_key(width)]
                update = solve_compensation(linear.weight.detach(), gram, total, count, kept, ridge,
                                            config.bias_compensation)
                corrections[width, index, name] = low_rank(update, used_rank)
    return corrections


def compensation_parameters(corrections: dict[tuple[float, int, str], tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Parameters the stored corrections add to the any-shape checkpoint (none to an exported subnet)."""
    return sum(a.numel() + b.numel() for a, b in corrections.values())


__all__ = ["collect_moments", "compensation_parameters", "fit_width_compensation", "low_rank", "solve_compensation"]

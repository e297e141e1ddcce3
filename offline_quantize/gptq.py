"""GPTQ (Frantar et al., 2022): round one input column at a time, and spread its error over the
columns not yet rounded, weighted by the inverse of the layer's input second moment.

Written after the reference implementation (``gptq.py`` of IST-DASLab/gptq): dead
channels zeroed, 1% dampening, the upper Cholesky factor of H^-1, lazy batch
updates of ``block_size`` columns. The grid is a parameter: the uniform INT4 grid
gives GPTQ; AAAC's learned codebook pair gives AAAC with error compensation.

Group parameters are fitted when GPTQ reaches a group's first column, on the
weights as they are then (the reference's rule), unless they are given up front
(``static``: AAAC's learned scales and codebook choices). With ``act_order``
columns are visited by decreasing H[k, k], and each group's parameters are fixed
before the sweep: given, or fitted on the original weights ("static groups", as
GPTQModel and vLLM's Marlin expect), so groups stay contiguous in the checkpoint.
"""

from contextlib import contextmanager
from typing import Protocol

import torch

from aaac_kernels.format.errors import AAACError

DAMPENING = (0.01, 0.03, 0.1, 0.3, 1.0)  # fractions of mean(diag H), tried in order until H is positive definite


class Grid(Protocol):
    def fit(self, w: torch.Tensor, mean_square: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def quantize(self, w: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]: ...


def _inverse_cholesky(second_moment: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, with the smallest dampening that works."""
    mean_diag = second_moment.diagonal().mean()
    eye = torch.eye(second_moment.shape[0], dtype=second_moment.dtype, device=second_moment.device)
    for damp in DAMPENING:
        factor, info = torch.linalg.cholesky_ex(second_moment + damp * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise AAACError(f"GPTQ: the input second moment is not positive definite even with {DAMPENING[-1]:.0%} dampening")


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop is thousands of ops on a few thousand elements each: on a CPU, OpenMP's
    fork and join per op costs more than the work (100x more when a core is busy elsewhere)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    group_size: int,
    grid: Grid,
    act_order: bool = False,
    static: tuple[torch.Tensor, ...] | None = None,
    block_size: int = 128,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """Quantize weight [N, K] against the input second moment [K, K] (mean x x^T); ``static``, the grid's
    parameters per group [N, K // G, 1] each, fixes them instead of fitting them during the sweep.

    Returns (codes uint8 [N, K], the grid's parameters stacked per group [N, K // G, 1] each,
    dequantized weight fp32 [N, K]).
    """
    n, k = weight.shape
    groups = k // group_size
    w = weight.float().clone()
    second_moment = second_moment.float().clone()
    dead = second_moment.diagonal() == 0
    second_moment[dead, dead] = 1
    w[:, dead] = 0
    mean_square = second_moment.diagonal().clone()

    if act_order and static is None:
        static = grid.fit(w.reshape(n, groups, group_size), mean_square.reshape(groups, group_size))
    if act_order:
        perm = torch.argsort(mean_square, descending=True)
    else:
        perm = torch.arange(k, device=w.device)
    w, second_moment = w[:, perm], second_moment[perm][:, perm]
    hinv = _inverse_cholesky(second_moment)

    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    values = torch.zeros(n, k, device=w.device)
    fitted: list[tuple[torch.Tensor, ...]] = []
    # Blocks hold whole groups so that a group's parameters are fitted on fully updated weights.
    block_size = max(group_size, block_size - block_size % group_size)
    with _one_cpu_thread(w.device):
        _columns(w, hinv, mean_square, perm, static, fitted, codes, values, grid, group_size, block_size)

    inverse = torch.argsort(perm)
    if static is None:
        static = tuple(torch.stack(p, dim=1) for p in zip(*fitted))
    return codes[:, inverse], static, values[:, inverse]


def _columns(
    w, hinv, mean_square, perm, static, fitted, codes, values, grid: Grid, group_size: int, block_size: int
) -> None:
    """The GPTQ sweep, in place: round every column of ``w`` (permuted order) and spread its error."""
    k = w.shape[1]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            if static is not None:
                params = tuple(p[:, column // group_size] for p in static)
            else:
                if (i1 + i) % group_size == 0:
                    params = grid.fit(
                        w1[:, i : i + group_size].unsqueeze(1),
                        mean_square[perm[i1 + i : i1 + i + group_size]].unsqueeze(0),
                    )
                    params = tuple(p.squeeze(1) for p in params)
                    fitted.append(params)
            q, v = grid.quantize(w1[:, i : i + 1], params)
            codes[:, i1 + i], values[:, i1 + i] = q[:, 0], v[:, 0]
            err = (w1[:, i] - v[:, 0]) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

"""Encoding weights against a codebook: each weight's nearest entry, and each group's activation-weighted
error, the quantizer's inner loops.

On CPU they run in the C++ extension (kernels/csrc/nearest.cpp) where that was built, else, and on other
devices, in torch (``torch.bucketize``); both give the same indices, and the same errors up to the order
of their sums.
"""

from functools import cache
from types import ModuleType

import torch

from .cpu import load_native


def nearest(u: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index int64, entry value) of the nearest entry of a sorted 16-entry ``codebook`` for every element of
    ``u``; a tie between two entries goes to the lower one."""
    midpoints = (codebook[1:] + codebook[:-1]) * 0.5
    native = _native()
    if native is not None and u.device.type == "cpu" and u.dtype == codebook.dtype == torch.float32:
        return native.nearest(u, midpoints, codebook)
    index = torch.bucketize(u, midpoints)
    return index, codebook[index]


@cache
def _native() -> ModuleType | None:
    return load_native()


def group_errors(
    w: torch.Tensor, u: torch.Tensor, mean_square: torch.Tensor, scale: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weighted error of every group under each codebook, and the matching indices.

    w: [N, Gn, G]; u: w normalized by its group's scale; mean_square: [Gn, G]; scale: [N, Gn, 1]; codebooks:
    [C, 16], each sorted. Returns errors [C, N, Gn], sum mean_square (w - entry * scale)^2 over each group,
    and, per codebook, indices [N, Gn, G] (uint8).
    """
    native = _native()
    tensors = (w, u, mean_square, scale, codebooks)
    if native is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        errors, indices = native.group_errors(*tensors)
        return errors, list(indices)
    errors, indices = [], []
    for codebook in codebooks:
        idx, values = nearest(u, codebook)
        diff = w - values * scale
        errors.append((diff * diff * mean_square).sum(dim=-1))
        indices.append(idx.to(torch.uint8))
    return torch.stack(errors), indices

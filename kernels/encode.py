"""Encoding weights against a codebook: each weight's nearest entry, the quantizer's inner loop.

On CPU it runs in the C++ extension (kernels/csrc/nearest.cpp) where that was built, else, and on other
devices, through ``torch.bucketize``; both give the same indices.
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

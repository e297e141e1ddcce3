"""Round-to-nearest INT4 with per-group scales: the fixed-grid baseline AAAC is measured against."""

import torch
from torch import nn

from .source import block_linears, decoder_blocks


def rtn_dequantized(weight: torch.Tensor, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """Weight [N, K] -> its INT4 round-to-nearest reconstruction, same shape and dtype.

    Asymmetric: 16 levels between the group's min and max (scale and zero point).
    Symmetric: levels -8..7 times absmax / 7.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    if symmetric:
        scale = (w.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-12)
        q = torch.clamp(torch.round(w / scale), -8, 7)
        out = q * scale
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, 15)
        out = (q - zero) * scale
    return out.reshape(n, k).to(weight.dtype)


def apply_rtn(model: nn.Module, group_size: int, symmetric: bool = False) -> nn.Module:
    """Replace, in place, the weight of every decoder-block linear by its round-to-nearest reconstruction."""
    with torch.no_grad():
        for block in decoder_blocks(model):
            for module in block_linears(block).values():
                module.weight.data = rtn_dequantized(module.weight.data, group_size, symmetric)
    return model

"""The reference dequantizer: the one definition of what an AAAC layer means.

w[n, k] = C[sign(scale[g, n])][idx[n, k]] * |scale[g, n]|,   g = k // G
"""

import torch

from .layout import decode_scales, unpack_indices


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed AAAC tensors -> dense weight [N, K] (the nn.Linear layout) in ``dtype``."""
    indices = unpack_indices(qweight).long()  # [K, N]
    magnitude, choice = decode_scales(scales)  # [K // G, N]
    magnitude = magnitude.float().repeat_interleave(group_size, dim=0)
    choice = choice.repeat_interleave(group_size, dim=0)
    table = codebooks.float().reshape(-1)
    values = table[choice * codebooks.shape[1] + indices]
    return (values * magnitude).t().contiguous().to(dtype)

"""The uniform INT4 grid (a scale and a zero point per group) and round-to-nearest onto it.

This is the grid of RTN, GPTQ and AWQ: ``w_hat = (q - zero) * scale`` with
q in 0..15. Asymmetric groups span [min, max] (AutoAWQ's rule); symmetric
groups fix the zero point at 8 and span [-8, 7] * (2 absmax / 15) (the GPTQ
reference's rule). Scales are rounded to fp16 when fitted: fp16 is what the
checkpoint stores, so every rounding decision is made against stored values.
"""

from dataclasses import dataclass

import torch

LEVELS = 16


@dataclass(frozen=True)
class UniformGrid:
    symmetric: bool = False

    def fit(self, w: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of every group: w [..., G] -> two tensors [..., 1]. ``h`` is unused (min/max rule)."""
        if self.symmetric:
            scale = 2 * w.abs().amax(-1, keepdim=True) / (LEVELS - 1)
            scale = scale.clamp_min(1e-5).half().float()
            return scale, torch.full_like(scale, LEVELS // 2)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / (LEVELS - 1)).clamp_min(1e-5).half().float()
        zero = torch.clamp(torch.round(-lo / scale), 0, LEVELS - 1)
        return scale, zero

    def quantize(self, w: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes uint8, dequantized fp32) of ``w`` under ``params`` (broadcast against ``w``)."""
        scale, zero = params
        q = torch.clamp(torch.round(w / scale) + zero, 0, LEVELS - 1)
        return q.to(torch.uint8), (q - zero) * scale


def rtn_dequantized(weight: torch.Tensor, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """Weight [N, K] -> its round-to-nearest INT4 reconstruction in fp32, for error reports."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    grid = UniformGrid(symmetric)
    return grid.quantize(w, grid.fit(w))[1].reshape(n, k)


def round_to_grid(weight: torch.Tensor, group_size: int, grid: UniformGrid) -> tuple[torch.Tensor, ...]:
    """Weight [N, K] -> (codes uint8 [N, K], scale [N, K // G], zero [N, K // G]) on ``grid``."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    scale, zero = grid.fit(groups)
    codes = grid.quantize(groups, (scale, zero))[0].reshape(n, k)
    return codes, scale.squeeze(-1), zero.squeeze(-1)

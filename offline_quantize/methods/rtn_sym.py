"""``rtn-sym``: round-to-nearest onto the symmetric uniform INT4 grid (zero point fixed at 8)."""

import torch

from ..statistics import LinearStatistics
from ..uniform_grid import UniformGrid, round_to_grid
from .registry import LayerOptions, Method, QuantizedLinear, pack_uniform_layer, register


@register
class SymmetricRoundToNearest(Method):
    name = "rtn-sym"
    help = "uniform INT4, zero point fixed at 8, scale `2 absmax / 15` (the GPTQ reference's symmetric rule)"
    format = "awq"

    def quantize(self, weight: torch.Tensor, stats: LinearStatistics, options: LayerOptions) -> QuantizedLinear:
        return pack_uniform_layer(*round_to_grid(weight, options.group_size, UniformGrid(symmetric=True)))

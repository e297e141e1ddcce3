"""``rtn``: round-to-nearest onto the asymmetric uniform INT4 grid (min/max per group, a zero point)."""

import torch

from ..statistics import LinearStatistics
from ..uniform_grid import UniformGrid, round_to_grid
from .registry import LayerOptions, Method, QuantizedLinear, pack_uniform_layer, register


@register
class RoundToNearest(Method):
    name = "rtn"
    help = "uniform INT4, min/max per group, zero point (AutoAWQ's rule); the yardstick of every report"
    format = "awq"

    def quantize(self, weight: torch.Tensor, stats: LinearStatistics, options: LayerOptions) -> QuantizedLinear:
        return pack_uniform_layer(*round_to_grid(weight, options.group_size, UniformGrid()))

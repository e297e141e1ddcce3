"""``gptq``: GPTQ's error compensation onto the asymmetric uniform INT4 grid, optionally in act order."""

import torch

from ..gptq import gptq
from ..statistics import LinearStatistics
from ..uniform_grid import UniformGrid
from .registry import Flag, LayerOptions, Method, QuantizedLinear, pack_uniform_layer, register

ACT_ORDER = Flag("act-order", "act-order", "visit columns by decreasing activation energy (static groups)")


@register
class GPTQ(Method):
    name = "gptq"
    help = "uniform INT4 (asymmetric) with GPTQ error compensation (gptq.py, after the reference code)"
    format = "awq"
    flags = (ACT_ORDER,)
    compared = (frozenset(), frozenset({ACT_ORDER.name}))

    def needs_second_moment(self, flags: frozenset[str]) -> bool:
        return True

    def quantize(self, weight: torch.Tensor, stats: LinearStatistics, options: LayerOptions) -> QuantizedLinear:
        act_order = ACT_ORDER.name in options.flags
        codes, (scale, zero), _ = gptq(weight, stats.second_moment, options.group_size, UniformGrid(), act_order)
        return pack_uniform_layer(codes, scale.squeeze(-1), zero.squeeze(-1))

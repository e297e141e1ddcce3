"""``awq``: AWQ's channel scaling (folded into the previous operation) and clip search, then the
asymmetric uniform INT4 grid."""

import torch

from ..awq_search import NO_CLIP, search_clip
from ..statistics import LinearStatistics
from ..uniform_grid import UniformGrid, round_to_grid
from .registry import LayerOptions, Method, QuantizedLinear, pack_uniform_layer, register


@register
class AWQ(Method):
    name = "awq"
    help = "AWQ channel scaling and clip search (awq_search.py), then uniform INT4 (asymmetric)"
    format = "awq"

    def needs_second_moment(self, flags: frozenset[str]) -> bool:
        return True

    def scales_channels(self, flags: frozenset[str]) -> bool:
        return True

    def quantize(self, weight: torch.Tensor, stats: LinearStatistics, options: LayerOptions) -> QuantizedLinear:
        grid = UniformGrid()
        if not options.name.endswith(NO_CLIP):
            weight = search_clip(weight, stats.second_moment, options.group_size, grid)
        return pack_uniform_layer(*round_to_grid(weight, options.group_size, grid))

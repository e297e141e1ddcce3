"""``nf4``: QLoRA's NormalFloat4 table as both codebooks, absmax scales, written in the AAAC format."""

import torch

from aaac_kernels.format.layout import encode_scales

from ..codebooks import nf4_grid
from ..statistics import LinearStatistics
from .registry import LayerOptions, Method, QuantizedLinear, pack_codebook_layer, register


@register
class NormalFloat4(Method):
    name = "nf4"
    help = "the NF4 table (QLoRA) as both codebooks, absmax scales: AAAC's kernels with a fixed codebook"
    format = "aaac"

    def quantize(self, weight: torch.Tensor, stats: LinearStatistics, options: LayerOptions) -> QuantizedLinear:
        n, k = weight.shape
        group_size = options.group_size
        groups = weight.reshape(n, k // group_size, group_size)
        grid = nf4_grid()
        scale, choice = grid.fit(groups, stats.mean_square.reshape(k // group_size, group_size))
        codes = grid.quantize(groups, (scale, choice))[0].reshape(n, k)
        scales = encode_scales(scale.squeeze(-1), choice.squeeze(-1))
        return pack_codebook_layer(codes, scales, grid.codebooks, group_size)

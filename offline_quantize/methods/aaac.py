"""``aaac``: two codebooks learned per layer, each group on the one with the lower activation-weighted
error (codebooks.py); optionally after AWQ channel scaling, with least-squares group scales, and with
GPTQ's error compensation on the learned codebooks."""

from dataclasses import replace

import torch

from aaac_kernels.format.layout import encode_scales

from ..codebooks import CodebookGrid, quantize_layer
from ..gptq import gptq
from ..statistics import LinearStatistics
from .registry import Flag, LayerOptions, Method, QuantizedLinear, pack_codebook_layer, register

AWQ_SCALE = Flag("awq-scale", "awq", "AWQ channel scaling before learning codebooks")
COMPENSATE = Flag("compensate", "compensate", "GPTQ-style error compensation with the learned codebooks as the grid")
REFIT_SCALES = Flag(
    "refit-scales", "refit", "after the scale search, 2 rounds of least-squares group scales and Lloyd (docs/method.md)"
)
REFIT_ROUNDS = 2


@register
class AAAC(Method):
    name = "aaac"
    help = "two codebooks learned per layer by activation-weighted Lloyd; each group picks one (the default)"
    format = "aaac"
    flags = (AWQ_SCALE, REFIT_SCALES, COMPENSATE)
    compared = tuple(
        frozenset(s)
        for s in ((), {AWQ_SCALE.name}, {REFIT_SCALES.name}, {COMPENSATE.name}, {AWQ_SCALE.name, COMPENSATE.name})
    )

    def needs_second_moment(self, flags: frozenset[str]) -> bool:
        return bool(flags & {AWQ_SCALE.name, COMPENSATE.name})

    def scales_channels(self, flags: frozenset[str]) -> bool:
        return AWQ_SCALE.name in flags

    def quantize(self, weight: torch.Tensor, stats: LinearStatistics, options: LayerOptions) -> QuantizedLinear:
        codebook_options = options.codebooks
        if REFIT_SCALES.name in options.flags:
            codebook_options = replace(codebook_options, refit_rounds=REFIT_ROUNDS)
        learned = quantize_layer(weight, stats.mean_square, options.group_size, codebook_options, seed=options.seed)
        if COMPENSATE.name not in options.flags:
            return pack_codebook_layer(learned.indices, learned.scales, learned.codebooks, options.group_size)
        grid = CodebookGrid(learned.codebooks, options.codebooks.scale_grid)
        codes, (scale, choice), _ = gptq(weight, stats.second_moment, options.group_size, grid)
        scales = encode_scales(scale.squeeze(-1), choice.squeeze(-1))
        return pack_codebook_layer(codes, scales, learned.codebooks, options.group_size)

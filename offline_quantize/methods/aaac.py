"""``aaac``: two codebooks learned per layer, each group on the one with the lower activation-weighted
error (codebooks.py); optionally after AWQ channel scaling, and with GPTQ's error compensation on the
learned codebooks and scales."""

from dataclasses import replace

import torch

from aaac_kernels.format.layout import decode_scales

from ..codebooks import CodebookGrid, quantize_layer
from ..gptq import gptq
from ..statistics import LinearStatistics
from .registry import Flag, LayerOptions, Method, QuantizedLinear, pack_codebook_layer, register

AWQ_SCALE = Flag("awq-scale", "awq", "AWQ channel scaling before learning codebooks")
COMPENSATE = Flag(
    "compensate",
    "compensate",
    "GPTQ-style error compensation: every weight re-rounded on its group's learned scale and codebook (docs/method.md)",
)


@register
class AAAC(Method):
    name = "aaac"
    help = "two codebooks learned per layer by activation-weighted Lloyd; each group picks one (the default)"
    format = "aaac"
    flags = (AWQ_SCALE, COMPENSATE)
    compared = tuple(frozenset(s) for s in ((), {AWQ_SCALE.name}, {COMPENSATE.name}, {AWQ_SCALE.name, COMPENSATE.name}))

    def needs_second_moment(self, flags: frozenset[str]) -> bool:
        return bool(flags & {AWQ_SCALE.name, COMPENSATE.name})

    def scales_channels(self, flags: frozenset[str]) -> bool:
        return AWQ_SCALE.name in flags

    def quantize(self, weight: torch.Tensor, stats: LinearStatistics, options: LayerOptions) -> QuantizedLinear:
        if COMPENSATE.name not in options.flags:
            learned = quantize_layer(
                weight,
                stats.mean_square,
                options.group_size,
                options.codebooks,
                options.seed,
                stats.mean,
                stats.second_moment,
            )
            return pack_codebook_layer(learned.indices, learned.scales, learned.codebooks, options.group_size)
        # Compensation's sweep sees the full second moment, the means' cross terms included; it re-rounds onto
        # scales and codebooks fitted to the mean squares as they are (with the channel floor it lost 0.04 of
        # the gap on Python docs: docs/method.md).
        codebooks = replace(options.codebooks, channel_floor=0.0, mean_weight=0.0)
        learned = quantize_layer(weight, stats.mean_square, options.group_size, codebooks, options.seed)
        # Each group keeps its learned scale and codebook, fixed before the sweep so that columns can be
        # visited in act order: compensation only re-rounds the weights onto them. (Refitting them on the
        # partly compensated weights, GPTQ's own rule, loses to this on both evaluation texts.)
        magnitude, choice = decode_scales(learned.scales)
        static = (magnitude.float().unsqueeze(-1), choice.bool().unsqueeze(-1))
        grid = CodebookGrid(learned.codebooks)
        codes, _, _ = gptq(weight, stats.second_moment, options.group_size, grid, act_order=True, static=static)
        return pack_codebook_layer(codes, learned.scales, learned.codebooks, options.group_size)

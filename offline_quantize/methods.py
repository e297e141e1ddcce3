"""The quantization methods, all on one block-by-block pipeline, so they see the same calibration data.

  aaac     two learned codebooks per layer (codebooks.quantize_layer); AAAC format
           --awq-scale: AWQ channel scaling first; --compensate: GPTQ with the learned codebooks as grid
  nf4      the NF4 table as both codebooks, absmax scales; AAAC format
  rtn      uniform INT4, min/max per group, zero point; AWQ format
  rtn-sym  uniform INT4, zero point fixed at 8; AWQ format
  gptq     uniform INT4 (asymmetric) with GPTQ error compensation, optionally --act-order; AWQ format
  awq      AWQ channel scaling and clip search, then uniform INT4 (asymmetric); AWQ format
"""

from dataclasses import dataclass

import torch
from torch import nn

from aaac_kernels.format import encode_scales, pack_indices
from aaac_kernels.reference import dequantize

from . import awq, awq_format
from .codebooks import CodebookGrid, CodebookOptions, nf4_grid, quantize_layer, weighted_error
from .errors import AAACError
from .gptq import gptq
from .rtn import UniformGrid, rtn_dequantized

METHODS = ("aaac", "rtn", "rtn-sym", "nf4", "gptq", "awq")
AWQ_FORMAT = ("rtn", "rtn-sym", "gptq", "awq")


@dataclass(frozen=True)
class MethodOptions:
    method: str = "aaac"
    awq_scale: bool = False
    compensate: bool = False
    act_order: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise AAACError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.awq_scale or self.compensate) and self.method != "aaac":
            flag = "--awq-scale" if self.awq_scale else "--compensate"
            raise AAACError(f"{flag} applies to --method aaac, not {self.method}")
        if self.act_order and self.method != "gptq":
            raise AAACError(f"--act-order applies to --method gptq, not {self.method}")

    @property
    def format(self) -> str:
        return "awq" if self.method in AWQ_FORMAT else "aaac"

    @property
    def scales_channels(self) -> bool:
        return self.awq_scale or self.method == "awq"

    @property
    def needs_second_moment(self) -> bool:
        return self.scales_channels or self.compensate or self.method == "gptq"

    @property
    def label(self) -> str:
        extras = [flag for flag, on in (("awq", self.awq_scale), ("compensate", self.compensate),
                                        ("act-order", self.act_order)) if on]
        return "+".join([self.method, *extras])


@dataclass
class LinearInputs:
    """What one linear's quantization sees: h = mean(x^2), H = mean(x x^T) (or None), mean |x|."""

    h: torch.Tensor
    second_moment: torch.Tensor | None
    activation: torch.Tensor


@dataclass
class QuantizedLinear:
    tensors: dict[str, torch.Tensor]  # suffix -> stored tensor
    dense: torch.Tensor  # [N, K] fp32: exactly what a dequantizer makes of the stored tensors
    details: dict


def scale_block(block: nn.Module, index: int, linears: dict[str, nn.Linear], inputs: dict[str, LinearInputs],
                group_size: int) -> dict[str, dict]:
    """AWQ channel scaling of one block, in place: weights, the previous operations, and the statistics.

    Returns {previous operation's name: {"alpha": searched alpha, "linears": the linears it feeds}}.
    """
    names = {module: name for name, module in block.named_modules()}
    record = {}
    for group in awq.scaling_groups(block, index):
        first = inputs[group.linears[0]]
        weights = [linears[name].weight.float() for name in group.linears]
        s, alpha = awq.search_scale(weights, first.second_moment, first.activation, group_size, UniformGrid())
        awq.fold(group, linears, s.to(linears[group.linears[0]].weight.dtype))
        for name in group.linears:
            stats = inputs[name]
            stats.h = stats.h / (s * s)
            stats.second_moment = stats.second_moment / torch.outer(s, s)
            stats.activation = stats.activation / s
        record[names[group.previous]] = {"alpha": alpha, "linears": group.linears}
    return record


def quantize_linear(name: str, weight: torch.Tensor, stats: LinearInputs, group_size: int, options: MethodOptions,
                    codebook_options: CodebookOptions, seed: int) -> QuantizedLinear:
    """One linear by ``options.method``: the stored tensors and what inference will compute from them."""
    n, k = weight.shape
    w = weight.float()
    groups = w.reshape(n, k // group_size, group_size)
    h3 = stats.h.reshape(k // group_size, group_size)
    method = options.method
    details: dict = {}
    if method in AWQ_FORMAT:
        grid = UniformGrid(symmetric=method == "rtn-sym")
        if method == "gptq":
            codes, (scale, zero), _ = gptq(w, stats.second_moment, group_size, grid, options.act_order)
        else:
            if method == "awq" and not name.endswith(awq.NO_CLIP):
                groups = awq.search_clip(w, stats.second_moment, group_size, grid).reshape(groups.shape)
            scale, zero = grid.fit(groups)
            codes = grid.quantize(groups, (scale, zero))[0].reshape(n, k)
        tensors = awq_format.pack(codes, scale.squeeze(-1), zero.squeeze(-1))
        dense = awq_format.dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], torch.float32)
    else:
        if method == "nf4":
            grid = nf4_grid()
            scale, choice = grid.fit(groups, h3)
            codes = grid.quantize(groups, (scale, choice))[0].reshape(n, k)
            codebooks = grid.codebooks
        else:
            result = quantize_layer(w, stats.h, group_size, codebook_options, seed=seed)
            codebooks = result.codebooks
            if options.compensate:
                grid = CodebookGrid(codebooks, codebook_options.scale_grid)
                codes, (scale, choice), _ = gptq(w, stats.second_moment, group_size, grid)
            else:
                codes, scale, choice = result.indices, None, None
        encoded = result.scales if scale is None else encode_scales(scale.squeeze(-1), choice.squeeze(-1))
        tensors = {"qweight": pack_indices(codes), "scales": encoded.t().contiguous(), "codebooks": codebooks}
        dense = dequantize(tensors["qweight"], tensors["scales"], codebooks, group_size).float()
        details = {
            "codebook1_share": (tensors["scales"].view(torch.int16) < 0).float().mean().item(),
            "codebooks": codebooks.float().tolist(),
        }
    details["weighted_error"] = weighted_error(w, dense, stats.h)
    if stats.second_moment is not None:  # the full objective GPTQ and AWQ minimise, relative to the output energy
        energy = awq.output_error(w, torch.zeros_like(w), stats.second_moment).clamp_min(1e-30)
        details["output_error"] = (awq.output_error(w, dense, stats.second_moment) / energy).item()
    return QuantizedLinear(tensors, dense, details)


def rtn_reference_error(weight: torch.Tensor, h: torch.Tensor, group_size: int) -> float:
    """Asymmetric round-to-nearest's weighted error on the unscaled weight: every report's yardstick."""
    return weighted_error(weight, rtn_dequantized(weight, group_size), h)

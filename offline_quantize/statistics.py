"""Activation statistics of every linear's input: mean(x[k]^2), mean(x[k]), mean |x[k]|, optionally mean(x x^T).

AAAC needs only the mean squares (the diagonal of the second moment) and the means. GPTQ, AWQ's search and error
compensation need the full second-moment matrix H (GPTQ's Hessian up to a factor of 2), which costs a [K, K] matmul
per batch; it is collected only when asked for.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from aaac_kernels.format.experts import expert_of

# An expert part fed fewer calibration tokens than this is quantized with the statistics of its layer's
# experts pooled: a few tokens say little about which input channels matter.
MIN_EXPERT_TOKENS = 64
# Input channels per slice of a batch's float64 sums (BatchSums.of).
STATISTICS_COLUMNS = 64


@dataclass(frozen=True)
class LinearStatistics:
    """What one linear's quantization sees of its inputs x (fp32)."""

    mean_square: torch.Tensor  # [K]: mean(x[k]^2), the weight of an error on input channel k
    mean: torch.Tensor  # [K]: mean(x[k]); errors on channels with a mean add up in every output
    mean_abs: torch.Tensor  # [K]: mean |x[k]|, AWQ's measure of a channel's salience
    second_moment: torch.Tensor | None  # [K, K]: mean(x x^T), where the method asked for it

    def scaled(self, s: torch.Tensor) -> "LinearStatistics":
        """The statistics of x / s: the inputs after AWQ folds a channel scale s [K] into the previous operation."""
        second_moment = None if self.second_moment is None else self.second_moment / torch.outer(s, s)
        return LinearStatistics(self.mean_square / (s * s), self.mean / s, self.mean_abs / s, second_moment)


class ChannelStatistics:
    """Running sums of x[k]^2, x[k], |x[k]| (and of x x^T when ``full``), fed by a forward hook."""

    def __init__(self, features: int, device: torch.device, full: bool = False):
        self.square_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.value_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device) if full else None
        self.tokens = 0

    def add(self, sums: "BatchSums") -> None:
        self.square_sum += sums.square
        self.value_sum += sums.total
        self.abs_sum += sums.absolute
        if self.gram is not None:
            self.gram += sums.gram
        self.tokens += sums.tokens

    @staticmethod
    def pooled(parts: list["ChannelStatistics"]) -> "ChannelStatistics":
        """The sums of several linears fed inputs of the same width, as if one linear had seen them all."""
        total = ChannelStatistics.__new__(ChannelStatistics)
        total.square_sum = sum(p.square_sum for p in parts)
        total.value_sum = sum(p.value_sum for p in parts)
        total.abs_sum = sum(p.abs_sum for p in parts)
        total.gram = None if parts[0].gram is None else sum(p.gram for p in parts)
        total.tokens = sum(p.tokens for p in parts)
        return total

    def result(self) -> LinearStatistics:
        """The means so far, in fp32."""
        tokens = max(self.tokens, 1)
        second_moment = None if self.gram is None else (self.gram / tokens).float()
        means = (self.square_sum / tokens, self.value_sum / tokens, self.abs_sum / tokens)
        return LinearStatistics(*(m.float() for m in means), second_moment)


@dataclass(frozen=True)
class BatchSums:
    """One batch's contribution to the statistics of the linears it feeds."""

    square: torch.Tensor  # [K] float64
    total: torch.Tensor  # [K] float64
    absolute: torch.Tensor  # [K] float64
    gram: torch.Tensor | None  # [K, K] float64
    tokens: int

    @staticmethod
    def of(x: torch.Tensor, full: bool) -> "BatchSums":
        flat = x.reshape(-1, x.shape[-1])
        square, total, absolute = (
            torch.empty(flat.shape[1], dtype=torch.float64, device=flat.device) for _ in range(3)
        )
        # On CPU in float64 a slice of columns at a time: a batch's float64 copy stays in cache (the whole
        # one, 4096 tokens x 1536 channels, took 6-8x as long). Each column's sums are the whole tensor's,
        # bit for bit: torch reduces every column over the rows alike, in vectors of columns (a slice
        # width of a multiple of 16 keeps those vectors; 8 does not). A GPU takes the whole tensor.
        step = STATISTICS_COLUMNS if flat.device.type == "cpu" else flat.shape[1]
        for start in range(0, flat.shape[1], step):
            wide = flat[:, start : start + step].double()
            columns = slice(start, start + wide.shape[1])
            total[columns] = wide.sum(dim=0)
            absolute[columns] = wide.abs().sum(dim=0)
            square[columns] = wide.pow_(2).sum(dim=0)
        gram = (flat.float().t() @ flat.float()).double() if full else None
        return BatchSums(square, total, absolute, gram, flat.shape[0])


@contextmanager
def collect(linears: dict[str, nn.Module], full: bool = False):
    """Within the block, record the statistics of every listed linear's input (or router's: any module with
    a weight [out, in] applied to its first argument).

    Linears fed the same tensor (q, k and v; gate and up) share one batch's sums (and its Gram matmul):
    the last input's sums are reused when the next hook sees the very same tensor.
    """
    stats = {name: ChannelStatistics(m.weight.shape[1], m.weight.device, full) for name, m in linears.items()}
    last: list = [None, None]  # (input tensor, its BatchSums)

    def hook(stat: ChannelStatistics, x: torch.Tensor) -> None:
        if last[0] is not x:
            last[:] = [x, BatchSums.of(x, full)]
        stat.add(last[1])

    handles = [
        module.register_forward_hook(lambda _m, args, _out, s=stats[name]: hook(s, args[0]))
        for name, module in linears.items()
    ]
    try:
        yield stats
    finally:
        last.clear()
        for handle in handles:
            handle.remove()


def expert_statistics(accumulators: dict[str, ChannelStatistics]) -> tuple[dict[str, LinearStatistics], list[str]]:
    """Every linear's statistics, where each expert part fed fewer than MIN_EXPERT_TOKENS tokens takes its
    layer's pooled statistics (the same part of every expert of the layer); also the names of those parts."""
    layers: dict[tuple[str, str], list[ChannelStatistics]] = {}
    for name, acc in accumulators.items():
        expert = expert_of(name)
        if expert is not None:
            layers.setdefault((expert[0], expert[2]), []).append(acc)
    stats, pooled = {}, []
    for name, acc in accumulators.items():
        expert = expert_of(name)
        if expert is not None and acc.tokens < MIN_EXPERT_TOKENS:
            acc = ChannelStatistics.pooled(layers[expert[0], expert[2]])
            pooled.append(name)
        stats[name] = acc.result()
    return stats, pooled

"""The AAAC linear layer as a torch custom op, ``torch.ops.aaac.linear``.

The op is registered with a fake implementation, so torch.compile traces through
it and CUDA graphs capture it. On CUDA it runs the Triton kernels of
``triton_gemm``; elsewhere (vLLM's CPU build, where Triton is disabled) the
plain-torch path below.

Both run on a layout made once at load time by ``prepare``: indices as bytes
[N, K // 2] in the nn.Linear orientation (low nibble = even k), scales [N, K // G]
still carrying the codebook in the sign bit, and a lookup table that maps
(codebook pair, codebook, byte) to the two values the byte encodes. One
embedding lookup then dequantizes two weights at a time, with no unpacking; a merged
layer's parts are dequantized one after the other, each with its own table.
"""

import torch
import torch.nn.functional as F

from . import triton_gemm
from .format import NUM_CODEBOOKS, unpack_indices

_BYTE_VALUES = 1 << 8


def prepare(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint layout -> (qbytes, scales, lut) for ``linear``.

    ``codebooks`` is [parts, 2, 16]: a merged layer (QKV, gate_up) keeps one pair
    per part; ``lut`` is [parts, 2 * 256, 2].
    """
    indices = unpack_indices(qweight).t()  # [N, K]
    qbytes = (indices[:, 0::2] | (indices[:, 1::2] << 4)).contiguous()
    byte = torch.arange(_BYTE_VALUES, device=codebooks.device)
    table = codebooks.float()
    # Products of two fp16 numbers are exact in fp32, so the table is kept in fp32 and the
    # result is rounded once, as in the reference dequantizer.
    lut = torch.stack([table[..., byte & 0xF], table[..., byte >> 4]], dim=-1)
    return qbytes, scales.t().contiguous(), lut.reshape(len(codebooks), NUM_CODEBOOKS * _BYTE_VALUES, 2).contiguous()


@torch.library.custom_op("aaac::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    lut: torch.Tensor,
    part_sizes: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ Wᵀ (+ bias) for a layer in the ``prepare`` layout; W is rebuilt in x.dtype.

    ``part_sizes`` gives the output columns of each part of a merged layer, in order.
    """
    return F.linear(x, dequantize(qbytes, scales, lut, part_sizes, x.dtype), bias)


linear.register_kernel("cuda")(triton_gemm.linear)


@linear.register_fake
def _(x, qbytes, scales, lut, part_sizes, bias):
    return x.new_empty((*x.shape[:-1], qbytes.shape[0]))


def dequantize(
    qbytes: torch.Tensor, scales: torch.Tensor, lut: torch.Tensor, part_sizes: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype``, equal to ``reference.dequantize`` of the checkpoint tensors."""
    n, half = qbytes.shape
    groups = scales.shape[1]
    weight = torch.empty((n, 2 * half), dtype=dtype, device=qbytes.device)
    start = 0
    for part, size in enumerate(part_sizes):
        rows = slice(start, start + size)
        bits = scales[rows].view(torch.int16)
        index = qbytes[rows].view(size, groups, -1) + ((bits < 0).to(torch.int32) * _BYTE_VALUES)[:, :, None]
        values = F.embedding(index, lut[part]).view(size, groups, -1)
        magnitude = (bits & 0x7FFF).view(torch.float16)
        torch.mul(values, magnitude[:, :, None], out=weight[rows].view(size, groups, -1))
        start += size
    return weight

"""The AAAC linear layer as a torch custom op, ``torch.ops.aaac.linear``, on its plain-torch path.

The op is registered with a fake implementation, so torch.compile traces through
it and CUDA graphs capture it. This path serves vLLM's CPU build (where Triton
is disabled) and CUDA until the Triton kernels land.

It runs on a layout made once at load time by ``prepare``: indices as bytes
[N, K // 2] in the nn.Linear orientation (low nibble = even k), scales [N, K // G]
still carrying the codebook in the sign bit, and a lookup table that maps
(codebook pair, codebook, byte) to the two values the byte encodes. One
embedding lookup then dequantizes two weights at a time, with no unpacking.
"""

import torch
import torch.nn.functional as F

from .format import CODEBOOK_SIZE, NUM_CODEBOOKS, unpack_indices

_BYTE_VALUES = 1 << 8


def prepare(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor, part_sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint layout -> (qbytes, scales, lut, column_base) for ``linear``.

    ``codebooks`` is [parts, 2, 16]: a merged layer (QKV, gate_up) keeps one pair
    per part, and ``part_sizes`` says how many output columns each part owns.
    """
    indices = unpack_indices(qweight).t()  # [N, K]
    qbytes = (indices[:, 0::2] | (indices[:, 1::2] << 4)).contiguous()
    byte = torch.arange(_BYTE_VALUES, device=codebooks.device)
    table = codebooks.float().reshape(-1, CODEBOOK_SIZE)  # [parts * 2, 16]
    # Products of two fp16 numbers are exact in fp32, so the table is kept in fp32 and the
    # result is rounded once, as in the reference dequantizer.
    lut = torch.stack([table[:, byte & 0xF], table[:, byte >> 4]], dim=-1).reshape(-1, 2)
    part = torch.repeat_interleave(
        torch.arange(len(part_sizes), device=qweight.device), torch.tensor(part_sizes, device=qweight.device)
    )
    column_base = (part * NUM_CODEBOOKS * _BYTE_VALUES).to(torch.int32)
    return qbytes, scales.t().contiguous(), lut.contiguous(), column_base


@torch.library.custom_op("aaac::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    lut: torch.Tensor,
    column_base: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ Wᵀ (+ bias) for a layer in the ``prepare`` layout; W is rebuilt in x.dtype."""
    return F.linear(x, dequantize(qbytes, scales, lut, column_base, x.dtype), bias)


@linear.register_fake
def _(x, qbytes, scales, lut, column_base, bias):
    return x.new_empty((*x.shape[:-1], qbytes.shape[0]))


def dequantize(
    qbytes: torch.Tensor, scales: torch.Tensor, lut: torch.Tensor, column_base: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype``, equal to ``reference.dequantize`` of the checkpoint tensors."""
    n, half = qbytes.shape
    groups = scales.shape[1]
    bits = scales.view(torch.int16)
    table_row = column_base[:, None] + (bits < 0).to(torch.int32) * _BYTE_VALUES  # [N, K // G]
    index = qbytes.view(n, groups, -1) + table_row[:, :, None]  # int32 [N, K // G, G // 2]
    values = F.embedding(index, lut).view(n, groups, -1)
    magnitude = (bits & 0x7FFF).view(torch.float16)
    weight = torch.empty((n, groups, 2 * half // groups), dtype=dtype, device=qbytes.device)
    torch.mul(values, magnitude[:, :, None], out=weight)
    return weight.view(n, 2 * half)

"""The serving layouts: what each device's kernels read, made once at load time from a checkpoint's
tensors (``qweight`` [K / 8, N], ``scales`` [K / G, N], ``codebooks`` [parts, 2, 16]); docs/kernels.md
describes both.

* CPU (``cpu_layout``): ``qbytes`` uint8 [N, K / 2]: per column, per chunk of C consecutive k (C = 64
  when the group size is a multiple of 64, else 32 when it is a multiple of 32, else the group size),
  C / 2 bytes whose low nibbles hold the first half of the chunk and whose high nibbles the second half:
  one load, a widening and one shift give the indices of C consecutive k. ``scales`` fp16 [N, K / G]
  (signed, transposed so a column's groups are contiguous); ``codebooks`` fp16 [parts, 2, 16] as stored.
* CUDA (``cuda_layout``): ``qbytes`` uint8 [N, K / 2], which the kernels read as int32 [N, K / 8]: word
  ``w`` of row ``n`` holds the indices of k = 8w .. 8w + 7 in nibbles 0 .. 7 (little-endian bytes, low
  nibble = even k); ``scales`` fp16 [N, K / G], read as int16 (bit 15 selects the codebook, bits 0-14
  are |scale|); ``lut`` fp32 [parts, 512, 2]: a byte-pair table (row ``s * 256 + b`` of a part holds the
  values of byte b's two nibbles under codebook s). Row ``s * 256 + v`` (v < 16) holds entry v of
  codebook s in its first column, so ``lut[part * 1024 + s * 512 + 2 * v]`` is the codebook itself:
  16 entries 8 bytes apart, one 128-byte cache line per codebook.
"""

import torch

from .layout import NUM_CODEBOOKS, unpack_indices

BYTE_VALUES = 1 << 8


def prepare(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors -> the layout of their device's kernels: the ``qweight, scales, codebooks``
    arguments of ``aaac::linear``."""
    layout = cuda_layout if qweight.device.type == "cuda" else cpu_layout
    return layout(qweight, scales, codebooks)


def chunk_size(group_size: int) -> int:
    """The chunk of the CPU layout for a group size (the C++ side's ``chunk_size`` too)."""
    return 64 if group_size % 64 == 0 else 32 if group_size % 32 == 0 else group_size


def cpu_layout(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors -> (qbytes, scales, codebooks) for the C++ kernels and the CPU torch path."""
    indices = unpack_indices(qweight).t()  # [N, K]
    n, k = indices.shape
    chunk = chunk_size(k // scales.shape[0])
    halves = indices.reshape(n, k // chunk, 2, chunk // 2)
    qbytes = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return qbytes, scales.t().contiguous(), codebooks.to(torch.float16).contiguous()


def cuda_layout(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors -> (qbytes, scales, lut) for the Triton kernels."""
    indices = unpack_indices(qweight).t()  # [N, K]
    qbytes = (indices[:, 0::2] | (indices[:, 1::2] << 4)).contiguous()
    byte = torch.arange(BYTE_VALUES, device=codebooks.device)
    table = codebooks.float()
    # Products of two fp16 numbers are exact in fp32, so the table is kept in fp32 and the
    # result is rounded once, as in the reference dequantizer.
    lut = torch.stack([table[..., byte & 0xF], table[..., byte >> 4]], dim=-1)
    return qbytes, scales.t().contiguous(), lut.reshape(len(codebooks), NUM_CODEBOOKS * BYTE_VALUES, 2).contiguous()

"""The serving layouts: what each device's kernels read, made once at load time from a checkpoint's
tensors (``qweight`` [K / 8, N], ``scales`` [K / G, N], ``codebooks`` [parts, 2, 16]); docs/kernels.md
describes both.

* CPU (``cpu_layout``): ``qbytes`` uint8 [N, K / 2]: per column, per chunk of C consecutive k (C = 64
  when the group size is a multiple of 64, else 32 when it is a multiple of 32, else the group size),
  C / 2 bytes whose low nibbles hold the first half of the chunk and whose high nibbles the second half:
  one load, a widening and one shift give the indices of C consecutive k. ``scales`` fp16 [N, K / G]
  (signed, transposed so a column's groups are contiguous); ``codebooks`` fp16 [parts, 2, 16] as stored.
* CUDA (``cuda_layout``): ``qbytes`` uint8 [N, K / 2], which the kernels read as int32 [N, K / 8], in
  blocks of B consecutive k (B = ``cuda_block(G)``: the largest power of two that divides G, at most
  256): word ``v`` of a block holds k = j * B / 8 + v in nibble j (little-endian bytes, low nibble
  first). Nibble j of a tile of words then meets a contiguous run of x, and the 8 weights of a word
  share a group. ``scales`` fp16 [N, K / G], read as int16 (bit 15 selects the codebook, bits 0-14 are
  |scale|); ``codebooks`` fp32 [parts, 2, 16]: a part's pair is 32 entries, one 128-byte cache line.
"""

import torch

from .layout import unpack_indices


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


def cuda_block(group_size: int) -> int:
    """The k-block of the CUDA layout for a group size (a multiple of 8): the largest power of two
    dividing it, at most 256."""
    return min(256, group_size & -group_size)


def cuda_layout(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors -> (qbytes, scales, codebooks) for the Triton kernels."""
    indices = unpack_indices(qweight).t()  # [N, K]
    n, k = indices.shape
    block = cuda_block(k // scales.shape[0])
    # [N, blocks, nibble j, word v] -> [N, blocks, v, j]: nibble j of word v is k = j * block / 8 + v.
    ordered = indices.reshape(n, k // block, 8, block // 8).transpose(2, 3).reshape(n, k)
    qbytes = (ordered[:, 0::2] | (ordered[:, 1::2] << 4)).contiguous()
    # fp32 entries: an fp16 entry times an fp16 |scale| is exact in fp32, rounded once as in the reference.
    return qbytes, scales.t().contiguous(), codebooks.float().contiguous()

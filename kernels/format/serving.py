"""The serving layouts: what each device's kernels read, made once at load time from a checkpoint's
tensors (``qweight`` [K / 8, N], ``scales`` [K / G, N], ``codebooks`` [parts, 2, 16]); docs/kernels.md
describes both.

* CPU (``cpu_layout``): ``qbytes`` uint8 [N, K / 2]: per column, blocks of 128 k, each 64 bytes read as
  32 little-endian 16-bit words, word w holding k = w + 32 j in nibble j; then the rest of K (K mod 128)
  in blocks of 64, 32, 16 and 8 (its binary digits), byte w of a block of B holding k = w in its low
  nibble and k = w + B / 2 in its high one (``cpu_nibble_order``). One 64-byte load and a shift give the
  indices of 32 consecutive k in 16-bit lanes, or of 16 even and 16 odd k in 32-bit lanes. ``scales``
  fp16 [N, K / G] (signed, transposed so a column's groups are contiguous); ``codebooks`` fp16
  [parts, 2, 16] as stored.
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


def cpu_nibble_order(k: int) -> torch.Tensor:
    """The k held by each nibble of a column in the CPU layout, in memory order (nibble i is byte i // 2,
    low nibble first); K a multiple of 8."""
    full = k // 128 * 128
    i = torch.arange(128)
    block = 32 * (i % 4) + i // 4  # nibble i of a block: word i // 4, nibble i % 4 of that word
    pieces = [(torch.arange(0, full, 128)[:, None] + block).reshape(-1)]
    start = full
    for size in (64, 32, 16, 8):
        if (k - full) & size:
            i = torch.arange(size)
            pieces.append(start + i // 2 + (i % 2) * (size // 2))
            start += size
    return torch.cat(pieces)


def cpu_layout(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors -> (qbytes, scales, codebooks) for the C++ kernels and the CPU torch path."""
    nibbles = unpack_indices(qweight).t()[:, cpu_nibble_order(qweight.shape[0] * 8)]  # [N, K], memory order
    qbytes = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
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

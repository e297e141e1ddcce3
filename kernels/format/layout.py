"""The AAAC tensor layout (format version 1); docs/format.md is its description.

For a linear layer with weight W of shape [N, K] (out, in) and group size G:

* ``qweight``  int32 [K // 8, N]: eight 4-bit codebook indices per int32, packed
  along K; index k = 8 * r + j sits in bits 4j..4j+3 of ``qweight[r, n]``.
* ``scales``   fp16  [K // G, N]: |scale| of group (k // G, n); the fp16 sign bit
  selects the codebook (1 means C1).
* ``codebooks`` fp16 [2, 16]: C0 and C1 in normalized units (weight / scale).

K-major packing with N contiguous is the GPTQ layout: a GEMM tile reads
coalesced rows of N, and tensor-parallel splits stay plain slices (columns
split N, rows split K on group boundaries).
"""

import torch

FORMAT_VERSION = 1
BITS = 4
PACK_FACTOR = 32 // BITS
NUM_CODEBOOKS = 2
CODEBOOK_SIZE = 1 << BITS

_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)
_SIGN_BIT = -32768  # 0x8000 as int16


def pack_indices(indices: torch.Tensor) -> torch.Tensor:
    """[N, K] integer indices in 0..15 -> int32 [K // 8, N]."""
    n, k = indices.shape
    if k % PACK_FACTOR:
        raise ValueError(f"in_features {k} is not a multiple of {PACK_FACTOR}")
    nibbles = indices.t().to(torch.int32).reshape(k // PACK_FACTOR, PACK_FACTOR, n)
    shifted = nibbles << _SHIFTS.to(indices.device).view(1, -1, 1)
    # The nibbles occupy disjoint bits, so the sum is a bitwise OR; int32
    # overflow of the top nibble wraps to the right bit pattern.
    return shifted.sum(dim=1, dtype=torch.int32)


def unpack_indices(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K // 8, N] -> uint8 [K, N] indices (K-major, like qweight)."""
    rows, n = qweight.shape
    shifts = _SHIFTS.to(qweight.device).view(1, -1, 1)
    nibbles = (qweight.unsqueeze(1) >> shifts) & 0xF
    return nibbles.reshape(rows * PACK_FACTOR, n).to(torch.uint8)


def encode_scales(scales: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Positive scales and a boolean codebook choice -> fp16 scales carrying the choice in the sign bit."""
    bits = scales.to(torch.float16).abs().view(torch.int16)
    return torch.where(choice, bits | _SIGN_BIT, bits).view(torch.float16)


def decode_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales -> (|scale| as fp16, codebook id as int64).

    Reads the bit, not ``scale < 0``: a zero scale that selects C1 is -0.0.
    """
    bits = scales.view(torch.int16)
    codebook = (bits < 0).to(torch.int64)
    return (bits & 0x7FFF).view(torch.float16), codebook

"""The AutoAWQ "gemm" checkpoint format, in which the uniform-grid methods (rtn, rtn-sym, gptq, awq)
are written, so that vLLM's built-in ``awq`` method (and AutoAWQ, and transformers with it) serves them.

Per linear, with K inputs, N outputs and group size G:
  qweight int32 [K, N / 8]: eight 4-bit codes along N per word, in the order 0, 2, 4, 6, 1, 3, 5, 7
  qzeros  int32 [K / G, N / 8]: the zero points, packed the same way
  scales  fp16  [K / G, N]
and w[n, k] = (code - zero) * scale.
"""

import torch

from .errors import AAACError

PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column PACK_ORDER[i] of its 8
AWQ_SUFFIXES = ("qweight", "qzeros", "scales")


def quantization_config(group_size: int, modules_to_not_convert: list[str]) -> dict:
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert,
    }


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, C] (C a multiple of 8) -> int32 [R, C / 8]."""
    r, c = codes.shape
    nibbles = codes.to(torch.int64).reshape(r, c // 8, 8)[:, :, list(PACK_ORDER)]
    words = (nibbles << (4 * torch.arange(8, device=codes.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> int64 codes [R, C]."""
    r, c8 = words.shape
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8, device=words.device))) & 15
    out = torch.empty_like(nibbles)
    out[:, :, list(PACK_ORDER)] = nibbles
    return out.reshape(r, c8 * 8)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """codes uint8 [N, K], scale and zero [N, K / G] -> the three stored tensors."""
    if codes.shape[0] % 8:
        raise AAACError(f"the AWQ format needs out_features divisible by 8, this layer has {codes.shape[0]}")
    return {
        "qweight": _pack(codes.t().contiguous()),
        "qzeros": _pack(zero.round().to(torch.uint8).t().contiguous()),
        "scales": scale.t().to(torch.float16).contiguous(),
    }


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stored tensors of one linear -> its dense weight [N, K]."""
    k, groups = qweight.shape[0], scales.shape[0]
    if qweight.shape[1] * 8 != scales.shape[1] or qzeros.shape != (groups, qweight.shape[1]) or k % groups:
        raise AAACError(
            f"AWQ tensors disagree: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
            f"scales {list(scales.shape)}"
        )
    group_size = k // groups
    codes = _unpack(qweight).float()
    zeros = _unpack(qzeros).float().repeat_interleave(group_size, 0)
    return ((codes - zeros) * scales.float().repeat_interleave(group_size, 0)).t().to(dtype)

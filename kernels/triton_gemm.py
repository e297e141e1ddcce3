"""Triton kernels for AAAC layers on NVIDIA GPUs: a fused dequant-GEMM and a dequantizer.

Both read the layout that ``aaac_kernels.format.serving.cuda_layout`` makes once at load time.

The fused kernel dequantizes W tile by tile in registers (table lookup, times |scale|, one rounding
to the activation dtype, exactly as the reference dequantizer) and feeds ``tl.dot`` with fp32
accumulation, one dot per nibble position so that indices never move between lanes. Small batches
split K over several programs (decoding is bound by reading the weights, and a few hundred programs
are needed to keep every SM streaming); larger ones use the grouped tile order of Triton's matmul
tutorial so that weight tiles are reused from L2.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # a power of two >= 128: each of the 8 nibble dots spans block_k / 8 >= 16 (tl.dot's least K)
    split_k: int  # 0: choose from the shape so that the grid fills the GPU
    group_m: int
    num_warps: int
    num_stages: int


# Chosen for H100-class GPUs from the memory-bound arithmetic (4.125 bits a weight moves the ridge
# point to M of about 70), not yet from measurements: benchmarks/kernels.py times them against cuBLAS.
# Keyed by the largest M each serves.
CONFIGS: tuple[tuple[float, TileConfig], ...] = (
    (16, TileConfig(block_m=16, block_n=64, block_k=128, split_k=0, group_m=1, num_warps=4, num_stages=4)),
    (64, TileConfig(block_m=64, block_n=64, block_k=128, split_k=0, group_m=1, num_warps=4, num_stages=4)),
    (float("inf"), TileConfig(block_m=128, block_n=128, block_k=128, split_k=1, group_m=8, num_warps=8, num_stages=3)),
)
# Above this M the weight is dequantized once and multiplied by cuBLAS: at large M the GEMM is
# compute-bound and the one extra pass over W costs little (vLLM's AWQ method switches at 256 too).
DEQUANT_MATMUL_MIN_M = 256
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 128
# Split K until about this many programs per SM are running, keeping at least two K tiles each.
_PROGRAMS_PER_SM = 2
_MIN_K_TILES_PER_SPLIT = 2


@triton.jit
def _gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    lut_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    GROUP_SIZE: tl.constexpr,
    PART_STARTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the same column blocks while their weight tiles are in L2.
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # Each column's two codebooks (its part's pair), kept in registers: pair[n, s * 16 + v] = C_s[v].
    part = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i in tl.static_range(len(PART_STARTS)):
        part += (offs_n >= PART_STARTS[i]).to(tl.int32)
    entries = tl.arange(0, 32)
    pair = tl.load(lut_ptr + part[:, None] * 1024 + ((entries // 16) * 512 + (entries % 16) * 2)[None, :])

    words_k = K // 8
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first_tile = pid_k * tiles_per_split
    last_tile = min(first_tile + tiles_per_split, k_tiles)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(first_tile, last_tile):
        word = tile * (BLOCK_K // 8) + offs_w
        mask_w = mask_n[:, None] if EVEN_K else mask_n[:, None] & (word < words_k)[None, :]
        mask_x = mask_m[:, None] if EVEN_K else mask_m[:, None] & (word < words_k)[None, :]
        words = tl.load(w_ptr + offs_n[:, None] * words_k + word[None, :], mask=mask_w, other=0)
        if GROUP_SIZE % BLOCK_K == 0:
            group = (tile * BLOCK_K) // GROUP_SIZE
            bits = tl.load(s_ptr + offs_n * (K // GROUP_SIZE) + group, mask=mask_n, other=0)[:, None]
        else:  # groups narrower than the tile: the 8 weights of a word share a group
            bits = tl.load(
                s_ptr + offs_n[:, None] * (K // GROUP_SIZE) + (word * 8 // GROUP_SIZE)[None, :], mask=mask_w, other=0
            )
        # The codebook is bit 15 of the scale (a -0.0 scale selects C1 too); bits 0-14 are |scale|.
        codebook = ((bits >> 15) & 1).to(tl.int32) * 16
        magnitude = (bits & 0x7FFF).to(tl.float16, bitcast=True).to(tl.float32)
        # Nibble j of every word is k = 8 * word + j: one dot per nibble, over the matching
        # (stride-8) columns of x, so the 4-bit indices are never shuffled between lanes.
        for j in tl.static_range(8):
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (word * 8 + j)[None, :], mask=mask_x, other=0.0)
            entry = tl.gather(pair, ((words >> (4 * j)) & 0xF) + codebook, axis=1)
            # fp16 entry times fp16 |scale| is exact in fp32: one rounding, as in the reference.
            w = (entry * magnitude).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    out_ptrs = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequant_kernel(
    w_ptr,
    s_ptr,
    lut_ptr,
    out_ptr,
    N,
    K,
    GROUP_SIZE: tl.constexpr,
    PART_STARTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_w = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k < K)[None, :]

    part = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i in tl.static_range(len(PART_STARTS)):
        part += (offs_n >= PART_STARTS[i]).to(tl.int32)

    words = tl.load(
        w_ptr + offs_n[:, None] * (K // 8) + offs_w[None, :], mask=mask_n[:, None] & (offs_w < K // 8)[None, :], other=0
    )
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    index = (words >> ((offs_k % 8) * 4)[None, :]) & 0xF
    # Groups may be narrower than the tile here, so each weight reads its own group's scale.
    bits = tl.load(s_ptr + offs_n[:, None] * (K // GROUP_SIZE) + (offs_k // GROUP_SIZE)[None, :], mask=mask, other=0)
    table = part[:, None] * 1024 + ((bits >> 15) & 1).to(tl.int32) * 512
    magnitude = (bits & 0x7FFF).to(tl.float16, bitcast=True).to(tl.float32)
    entry = tl.load(lut_ptr + table + 2 * index)
    tl.store(
        out_ptr + offs_n[:, None] * K + offs_k[None, :], (entry * magnitude).to(out_ptr.dtype.element_ty), mask=mask
    )


def _part_starts(part_sizes: list[int]) -> tuple[int, ...]:
    """First output column of every part after the first (a compile-time constant of the kernels)."""
    starts, total = [], 0
    for size in part_sizes[:-1]:
        total += size
        starts.append(total)
    return tuple(starts)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(m: int) -> TileConfig:
    """The stored tile configuration for a batch of ``m`` rows."""
    return next(config for limit, config in CONFIGS if m <= limit)


def gemm(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    lut: torch.Tensor,
    part_sizes: list[int],
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (unit stride along K) @ Wᵀ with the fused kernel; returns [M, N] in x.dtype."""
    m, k = x.shape
    n = qbytes.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    config = config or pick_config(m)
    k_tiles = triton.cdiv(k, config.block_k)
    grid_mn = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    split_k = config.split_k
    if not split_k:
        programs = _PROGRAMS_PER_SM * (_sm_count(x.device) if x.is_cuda else 1)
        split_k = max(1, min(triton.cdiv(programs, grid_mn), k_tiles // _MIN_K_TILES_PER_SPLIT))
    out = torch.empty(
        (split_k, m, n) if split_k > 1 else (m, n), dtype=torch.float32 if split_k > 1 else x.dtype, device=x.device
    )
    _gemm_kernel[(grid_mn, split_k)](
        x,
        qbytes.view(torch.int32),
        scales.view(torch.int16),
        lut,
        out,
        m,
        n,
        k,
        x.stride(0),
        GROUP_SIZE=k // scales.shape[1],
        PART_STARTS=_part_starts(part_sizes),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split_k,
        GROUP_M=config.group_m,
        EVEN_K=k % config.block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    # A separate sum keeps the result deterministic, unlike atomic adds of the partial tiles.
    return out.sum(0).to(x.dtype) if split_k > 1 else out


def dequantize(
    qbytes: torch.Tensor, scales: torch.Tensor, lut: torch.Tensor, part_sizes: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype``, equal to the reference dequantizer."""
    n, k = qbytes.shape[0], 2 * qbytes.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=qbytes.device)
    _dequant_kernel[(triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(k, DEQUANT_BLOCK_K))](
        qbytes.view(torch.int32),
        scales.view(torch.int16),
        lut,
        out,
        n,
        k,
        GROUP_SIZE=k // scales.shape[1],
        PART_STARTS=_part_starts(part_sizes),
        BLOCK_N=DEQUANT_BLOCK_N,
        BLOCK_K=DEQUANT_BLOCK_K,
    )
    return out


def linear(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    lut: torch.Tensor,
    part_sizes: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``aaac::linear`` on CUDA: the fused kernel for small and medium batches, dequantize and cuBLAS for large."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if x2d.shape[0] >= DEQUANT_MATMUL_MIN_M:
        y = torch.nn.functional.linear(x2d, dequantize(qbytes, scales, lut, part_sizes, x.dtype), bias)
    else:
        y = gemm(x2d, qbytes, scales, lut, part_sizes)
        if bias is not None:
            y += bias
    return y.view(*x.shape[:-1], y.shape[-1])

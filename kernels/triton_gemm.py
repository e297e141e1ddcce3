"""Triton kernels for AAAC layers on NVIDIA GPUs: a decode GEMV, a tensor-core GEMM and a dequantizer.

All three read the layout that ``aaac_kernels.format.serving.cuda_layout`` makes once at load time.
A tile of ``BLOCK_K / 8`` words per output column is loaded with 16-byte loads; nibble ``j`` of those
words holds a contiguous run of k (the layout's order), so it meets a plain slice of x and the indices
never move between lanes. The 32 lanes of a warp hold the 32 entries of the part's codebook pair
(fp32), and each index becomes one lane shuffle (``_SHUFFLE_WORD``); Triton's interpreter, which has no
lanes, and programs whose columns straddle two parts read the entries from memory instead.
docs/kernels.md has the design and the H200 measurements behind every constant here.

* ``_gemv_kernel`` (M <= GEMV_MAX_M, decoding): fp32 FMAs on the CUDA cores, every row of x against
  each weight once; the 8 products of a word are summed before the group's scale multiplies them.
* ``_gemm_kernel`` (larger M): the weight tile times |scale|, rounded once to the activation dtype as
  in the reference, is the A operand of ``tl.dot`` against xᵀ (out[n, m], so small M is the dot's N).
* ``_dequant_kernel``: slabs of the dense weight for ``dequantize_matmul``, the path for M > 64.

Both product kernels split K over several programs when the output alone cannot fill the GPU; the
last program of each column block to finish sums the fp32 partials in split order (deterministic).
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .format.serving import cuda_block


class TileConfig(NamedTuple):
    block_m: int  # rows of x per program (the GEMV takes all M rows at once)
    block_n: int
    block_k: int  # k per step: 8 nibble slices of block_k / 8 words (>= 16 for tl.dot)
    split_k: int  # 0: chosen from the shape so that the grid fills the GPU
    group_m: int  # GEMM tile order: row blocks that sweep the same columns while they are in L2
    num_warps: int
    num_stages: int


# Measured on an H200 (docs/benchmarks.md, benchmarks/kernels.py --sweep), keyed by the largest M each
# serves. The GEMV issues M FMAs per weight where the GEMM's tensor cores issue none: it takes M <= 4.
# Its K step is at most the layout's block (``cuda_block``), so that one scale per column serves a step.
GEMV_CONFIGS: tuple[tuple[float, TileConfig], ...] = (
    (2, TileConfig(block_m=0, block_n=64, block_k=128, split_k=0, group_m=1, num_warps=4, num_stages=1)),
    (4, TileConfig(block_m=0, block_n=128, block_k=128, split_k=0, group_m=1, num_warps=4, num_stages=1)),
)
GEMV_MAX_M = 4
GEMM_CONFIGS: tuple[tuple[float, TileConfig], ...] = (
    (16, TileConfig(block_m=16, block_n=128, block_k=128, split_k=0, group_m=1, num_warps=4, num_stages=3)),
    (float("inf"), TileConfig(block_m=64, block_n=128, block_k=128, split_k=0, group_m=8, num_warps=8, num_stages=3)),
)
# Beyond 64 rows the weight is dequantized slab by slab and each slab multiplied by cuBLAS (0.41x of
# bf16 at M = 128 against the GEMM's 0.30x; 0.84x at M = 2048). Slabs of 64 MiB ran within 5% of one
# whole dense weight from M = 512 (0.49x against 0.55x at 256) and 1.05-1.35x faster than 16 MiB ones,
# with a buffer that does not grow with the layer (a 70B gate_up weight is 940 MB in bf16).
DEQUANT_MATMUL_MIN_M = 65
DEQUANT_SLAB_BYTES = 64 << 20
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K, DEQUANT_WARPS = 32, 256, 8
# Split K until about this many programs per SM are running, keeping at least two K steps each.
_PROGRAMS_PER_SM = 4
_MIN_K_STEPS_PER_SPLIT = 2


@triton.jit
def _codebook_offsets(offs_n, PART_STARTS: tl.constexpr):
    """Each column's first entry in the [parts, 2, 16] table: 32 * its part (PART_STARTS is compile-time)."""
    part = tl.zeros_like(offs_n)
    for i in tl.static_range(len(PART_STARTS)):
        part += (offs_n >= PART_STARTS[i]).to(tl.int32)
    return part * 32


# One word's 8 entries by shuffles. Each lane loads entry ``lane`` of the codebook pair at $9 (an L1
# hit, once per word: the lane id cannot leave the asm, since Triton may move values between lanes).
# A shuffle takes its source lane from bits 0-4 of its index: the bytes of ``even`` hold nibbles 0, 2,
# 4, 6 with the codebook offset ($10 = 16 * 0x01010101 for C1) in bit 4, those of ``odd`` nibbles 1,
# 3, 5, 7, so nibble j's index is one byte shift away. All columns of a program must share one part:
# a lane serves every column its neighbours hold.
_SHUFFLE_WORD = tl.constexpr(
    "{ .reg .u32 lane, entry, even, odd, index; .reg .u64 address; "
    "mov.u32 lane, %laneid; mad.wide.u32 address, lane, 4, $9; ld.global.nc.b32 entry, [address]; "
    "and.b32 even, $8, 0x0F0F0F0F; or.b32 even, even, $10; "
    "shr.b32 odd, $8, 4; and.b32 odd, odd, 0x0F0F0F0F; or.b32 odd, odd, $10; "
    "shfl.sync.idx.b32 $0, entry, even, 31, -1; shfl.sync.idx.b32 $1, entry, odd, 31, -1; "
    "shr.b32 index, even, 8; shfl.sync.idx.b32 $2, entry, index, 31, -1; "
    "shr.b32 index, odd, 8; shfl.sync.idx.b32 $3, entry, index, 31, -1; "
    "shr.b32 index, even, 16; shfl.sync.idx.b32 $4, entry, index, 31, -1; "
    "shr.b32 index, odd, 16; shfl.sync.idx.b32 $5, entry, index, 31, -1; "
    "shr.b32 index, even, 24; shfl.sync.idx.b32 $6, entry, index, 31, -1; "
    "shr.b32 index, odd, 24; shfl.sync.idx.b32 $7, entry, index, 31, -1; }"
)


@triton.jit
def _word_entries(pair_ptrs, words, codebook, LOOKUP: tl.constexpr):
    """The codebook entries (fp32) of nibbles 0..7 of each word, given each column's codebook pair
    (``pair_ptrs``, 32 entries) and the codebook offset of the word's group (0 or 16). ``shfl`` runs
    ``_SHUFFLE_WORD`` (the GPU path); ``load`` reads each entry through L1 (Triton's interpreter runs it)."""
    if LOOKUP == "shfl":
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            _SHUFFLE_WORD,
            "=r,=r,=r,=r,=r,=r,=r,=r,r,l,r",
            [words, pair_ptrs.to(tl.int64, bitcast=True), codebook * 0x01010101],
            dtype=(tl.int32,) * 8,
            is_pure=True,
            pack=1,
        )
        return (
            e0.to(tl.float32, bitcast=True),
            e1.to(tl.float32, bitcast=True),
            e2.to(tl.float32, bitcast=True),
            e3.to(tl.float32, bitcast=True),
            e4.to(tl.float32, bitcast=True),
            e5.to(tl.float32, bitcast=True),
            e6.to(tl.float32, bitcast=True),
            e7.to(tl.float32, bitcast=True),
        )
    else:
        entries = pair_ptrs + codebook
        return (
            tl.load(entries + (words & 0xF)),
            tl.load(entries + ((words >> 4) & 0xF)),
            tl.load(entries + ((words >> 8) & 0xF)),
            tl.load(entries + ((words >> 12) & 0xF)),
            tl.load(entries + ((words >> 16) & 0xF)),
            tl.load(entries + ((words >> 20) & 0xF)),
            tl.load(entries + ((words >> 24) & 0xF)),
            tl.load(entries + ((words >> 28) & 0xF)),
        )


@triton.jit
def _load_scales(
    s_ptr,
    offs_n,
    mask_n,
    first_k,
    word,
    mask_w,
    stride_sn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The codebook offset (0 or 16) and |scale| of each word's group: one per column when a group
    spans the whole K step of BLOCK_K from ``first_k``, else one per word (only the GEMM with groups
    under 128: loading them per word made the GEMV 2.5x slower on an H200)."""
    if GROUP_SIZE % BLOCK_K == 0:
        group = first_k // GROUP_SIZE
        bits = tl.load(s_ptr + offs_n * stride_sn + group, mask=mask_n, other=0)[:, None]
    else:  # the 8 weights of a word share a group (the layout's blocks divide the group)
        bits = tl.load(s_ptr + offs_n[:, None] * stride_sn + (word * 8 // GROUP_SIZE)[None, :], mask=mask_w, other=0)
    # Bit 15 (read as a bit: a -0.0 scale selects C1 too) moved to bit 4: C1's offset in the pair.
    codebook = ((bits >> 11) & 16).to(tl.int32)
    magnitude = (bits & 0x7FFF).to(tl.float16, bitcast=True).to(tl.float32)
    return codebook, magnitude


@triton.jit
def _load_step(
    w_ptr,
    s_ptr,
    offs_n,
    mask_n,
    step,
    offs_w,
    words_k,
    stride_wn,
    stride_sn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """A step's [BLOCK_N, BLOCK_K / 8] words, and the codebook offset and |scale| of their groups."""
    word = step * (BLOCK_K // 8) + offs_w
    mask_w = mask_n[:, None] if EVEN_K else mask_n[:, None] & (word < words_k)[None, :]
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + word[None, :], mask=mask_w, other=0)
    codebook, magnitude = _load_scales(
        s_ptr, offs_n, mask_n, step * BLOCK_K, word, mask_w, stride_sn, GROUP_SIZE, BLOCK_K
    )
    return words, codebook, magnitude


@triton.jit
def _split_steps(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K steps [first, last) of this program's split: ceil(steps / SPLIT_K) each, the last ones fewer."""
    k_steps = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(k_steps, SPLIT_K)
    first_step = tl.program_id(1) * steps_per_split
    return first_step, min(first_step + steps_per_split, k_steps)


@triton.jit
def _x_columns(word, BLOCK_WORDS: tl.constexpr):
    """k of nibble 0 of each word (nibble j is k + j * BLOCK_WORDS): the layout's blocks of 8 * BLOCK_WORDS."""
    return (word // BLOCK_WORDS) * (8 * BLOCK_WORDS) + word % BLOCK_WORDS


@triton.jit
def _sum_splits(part_ptr, out_ptr, count_ptr, offs_m, offs_n, mask, M, N, SPLIT_K: tl.constexpr):
    """After a program has stored its fp32 partials [SPLIT_K, M, N], the last of its column block's
    SPLIT_K programs to arrive adds them up in split order and writes the output."""
    tl.debug_barrier()  # every thread's partials are written before the count says so
    arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel")
    if arrived == SPLIT_K - 1:
        offsets = offs_m[:, None] * N + offs_n[None, :]
        total = tl.zeros(offsets.shape, dtype=tl.float32)
        for split in range(SPLIT_K):
            total += tl.load(part_ptr + split * M * N + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_row(out_ptr, part_ptr, acc, row, offs_n, mask_n, N, ROWS: tl.constexpr, SPLIT_K: tl.constexpr):
    """One row of the GEMV's output: y directly, or its fp32 partial when K is split."""
    total = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + row * N + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(part_ptr + (tl.program_id(1) * ROWS + row) * N + offs_n, total, mask=mask_n)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    cb_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    ROWS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    PART_STARTS: tl.constexpr,
    LOOKUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    mask_n = offs_n < N
    pair_ptrs = cb_ptr + _codebook_offsets(offs_n, PART_STARTS)[:, None]

    words_k = K // 8
    first_step, last_step = _split_steps(K, BLOCK_K, SPLIT_K)

    # Per row of x, fp32 sums per (column, word slot); reduced over the slots once, at the end.
    acc0 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    if ROWS > 1:
        acc1 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    if ROWS > 2:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    if ROWS > 3:
        acc3 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    # The next step's words and scales are loaded before this step's arithmetic: nothing waits on memory.
    words, codebook, magnitude = _load_step(
        w_ptr,
        s_ptr,
        offs_n,
        mask_n,
        min(first_step, last_step - 1),  # a split left without steps reads a valid one and adds nothing
        offs_w,
        words_k,
        stride_wn,
        stride_sn,
        GROUP_SIZE,
        BLOCK_K,
        EVEN_K,
    )
    for step in range(first_step, last_step):
        word = step * (BLOCK_K // 8) + offs_w
        mask_k = word < words_k
        # (the last step loads itself again rather than branch: one extra read from cache per program)
        next_words, next_codebook, next_magnitude = _load_step(
            w_ptr,
            s_ptr,
            offs_n,
            mask_n,
            min(step + 1, last_step - 1),
            offs_w,
            words_k,
            stride_wn,
            stride_sn,
            GROUP_SIZE,
            BLOCK_K,
            EVEN_K,
        )
        x_cols = _x_columns(word, BLOCK_WORDS)
        entries = _word_entries(pair_ptrs, words, codebook, LOOKUP)
        part0 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
        if ROWS > 1:
            part1 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
        if ROWS > 2:
            part2 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
        if ROWS > 3:
            part3 = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
        for j in tl.static_range(8):
            w = entries[j]
            x_ptrs = x_ptr + x_cols + j * BLOCK_WORDS
            part0 += w * tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            if ROWS > 1:
                part1 += w * tl.load(x_ptrs + stride_xm, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            if ROWS > 2:
                part2 += w * tl.load(x_ptrs + 2 * stride_xm, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            if ROWS > 3:
                part3 += w * tl.load(x_ptrs + 3 * stride_xm, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        # The group's scale multiplies the sum of a word's 8 products, not each weight.
        acc0 += part0 * magnitude
        if ROWS > 1:
            acc1 += part1 * magnitude
        if ROWS > 2:
            acc2 += part2 * magnitude
        if ROWS > 3:
            acc3 += part3 * magnitude
        words, codebook, magnitude = next_words, next_codebook, next_magnitude

    _store_row(out_ptr, part_ptr, acc0, 0, offs_n, mask_n, N, ROWS, SPLIT_K)
    if ROWS > 1:
        _store_row(out_ptr, part_ptr, acc1, 1, offs_n, mask_n, N, ROWS, SPLIT_K)
    if ROWS > 2:
        _store_row(out_ptr, part_ptr, acc2, 2, offs_n, mask_n, N, ROWS, SPLIT_K)
    if ROWS > 3:
        _store_row(out_ptr, part_ptr, acc3, 3, offs_n, mask_n, N, ROWS, SPLIT_K)
    if SPLIT_K > 1:
        offs_m = tl.arange(0, 4)
        mask = (offs_m < ROWS)[:, None] & mask_n[None, :]
        _sum_splits(part_ptr, out_ptr, count_ptr, offs_m, offs_n, mask, ROWS, N, SPLIT_K)


@triton.jit
def _dot_steps(
    acc,
    x_ptr,
    x_rows,
    mask_m,
    w_ptr,
    s_ptr,
    pair_ptrs,
    offs_n,
    mask_n,
    first_step,
    last_step,
    K,
    stride_wn,
    stride_sn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    LOOKUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc [BLOCK_N, BLOCK_M] plus the weight tile of columns ``offs_n`` over K steps [first, last) times
    the rows of x that start at element offsets ``x_rows`` (transposed: the rows are the dot's N)."""
    offs_w = tl.arange(0, BLOCK_K // 8)
    words_k = K // 8
    for step in range(first_step, last_step):
        word = step * (BLOCK_K // 8) + offs_w
        mask_k = word < words_k
        mask_w = mask_n[:, None] if EVEN_K else mask_n[:, None] & mask_k[None, :]
        mask_x = mask_m[None, :] if EVEN_K else mask_m[None, :] & mask_k[:, None]
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + word[None, :], mask=mask_w, other=0)
        codebook, magnitude = _load_scales(
            s_ptr, offs_n, mask_n, step * BLOCK_K, word, mask_w, stride_sn, GROUP_SIZE, BLOCK_K
        )
        x_cols = _x_columns(word, BLOCK_WORDS)
        entries = _word_entries(pair_ptrs, words, codebook, LOOKUP)
        for j in tl.static_range(8):
            # fp32 entry times fp32 |scale| is exact: one rounding to x's dtype, as in the reference.
            w = (entries[j] * magnitude).to(x_ptr.dtype.element_ty)
            xt = tl.load(x_ptr + x_rows[None, :] + (x_cols + j * BLOCK_WORDS)[:, None], mask=mask_x, other=0.0)
            acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    cb_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    PART_STARTS: tl.constexpr,
    LOOKUP: tl.constexpr,
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
    mask_m = offs_m < M
    mask_n = offs_n < N
    pair_ptrs = cb_ptr + _codebook_offsets(offs_n, PART_STARTS)[:, None]
    first_step, last_step = _split_steps(K, BLOCK_K, SPLIT_K)

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out[m, n] transposed: M is the dot's N
    acc = _dot_steps(
        acc,
        x_ptr,
        offs_m * stride_xm,
        mask_m,
        w_ptr,
        s_ptr,
        pair_ptrs,
        offs_n,
        mask_n,
        first_step,
        last_step,
        K,
        stride_wn,
        stride_sn,
        GROUP_SIZE,
        BLOCK_WORDS,
        LOOKUP,
        BLOCK_K,
        EVEN_K,
        DOT_PRECISION,
    )

    offsets = offs_m[None, :] * N + offs_n[:, None]
    mask = mask_m[None, :] & mask_n[:, None]
    if SPLIT_K == 1:
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid_k * M * N + offsets, acc, mask=mask)
        _sum_splits(part_ptr, out_ptr, count_ptr, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], M, N, SPLIT_K)


@triton.jit
def _dequant_kernel(
    w_ptr,
    s_ptr,
    cb_ptr,
    out_ptr,
    N,
    K,
    first_n,
    stride_wn,
    stride_sn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    PART_STARTS: tl.constexpr,
    LOOKUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows first_n .. N - 1 of the dense weight into out[0 : N - first_n, K]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = first_n + rows
    word = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    mask_n = offs_n < N
    mask_w = mask_n[:, None] & (word < K // 8)[None, :]
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + word[None, :], mask=mask_w, other=0)
    codebook, magnitude = _load_scales(
        s_ptr, offs_n, mask_n, tl.program_id(1) * BLOCK_K, word, mask_w, stride_sn, GROUP_SIZE, BLOCK_K
    )
    pair_ptrs = cb_ptr + _codebook_offsets(offs_n, PART_STARTS)[:, None]
    out_ptrs = out_ptr + rows[:, None] * K + _x_columns(word, BLOCK_WORDS)[None, :]
    entries = _word_entries(pair_ptrs, words, codebook, LOOKUP)
    for j in tl.static_range(8):
        w = entries[j] * magnitude
        tl.store(out_ptrs + j * BLOCK_WORDS, w.to(out_ptr.dtype.element_ty), mask=mask_w)


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


def _group_size(qbytes: torch.Tensor, scales: torch.Tensor) -> int:
    return 2 * qbytes.shape[1] // scales.shape[1]


def _layer_args(
    qbytes: torch.Tensor, scales: torch.Tensor, part_sizes: list[int], block_n: int, first_row: int = 0
) -> tuple[list, list, dict]:
    """The kernels' arguments describing a layer: (words, scale bits), their row strides, and constants
    (programs take ``block_n`` columns from ``first_row`` on)."""
    words = qbytes.view(torch.int32)
    group_size = _group_size(qbytes, scales)
    part_starts = _part_starts(part_sizes)
    # Shuffles need every program's columns in one part; Triton's interpreter has no lanes to shuffle.
    shuffle = qbytes.is_cuda and all((start - first_row) % block_n == 0 for start in part_starts)
    constants = dict(
        GROUP_SIZE=group_size,
        BLOCK_WORDS=cuda_block(group_size) // 8,
        PART_STARTS=part_starts,
        LOOKUP="shfl" if shuffle else "load",
    )
    return [words, scales.view(torch.int16)], [words.stride(0), scales.stride(0)], constants


def _split_k(config: TileConfig, programs: int, k: int, device: torch.device) -> int:
    """config.split_k, or (0) enough K splits for about _PROGRAMS_PER_SM programs per SM."""
    if config.split_k:
        return config.split_k
    wanted = _PROGRAMS_PER_SM * (_sm_count(device) if device.type == "cuda" else 1)
    k_steps = triton.cdiv(k, config.block_k)
    split_k = max(1, min(triton.cdiv(wanted, programs), k_steps // _MIN_K_STEPS_PER_SPLIT))
    return triton.cdiv(k_steps, triton.cdiv(k_steps, split_k))  # as many splits, none left without steps


def _split_buffers(split_k: int, m: int, n: int, programs: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """fp32 partials [split_k, M, N] and one arrival count per output block (zeroed: a memset per call)."""
    if split_k == 1:
        empty = torch.empty(0, device=device)
        return empty, empty.int()
    return (
        torch.empty((split_k, m, n), dtype=torch.float32, device=device),
        torch.zeros(programs, dtype=torch.int32, device=device),
    )


def gemv(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    part_sizes: list[int],
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= GEMV_MAX_M, unit stride along K) @ Wᵀ with the GEMV kernel; returns [M, N] in x.dtype."""
    m, k = x.shape
    n = qbytes.shape[0]
    if not 0 < m <= GEMV_MAX_M:
        raise ValueError(f"the GEMV takes 1 to {GEMV_MAX_M} rows, not {m}")
    config = _narrow_step(config or pick_gemv_config(m), _group_size(qbytes, scales))
    tensors, strides, constants = _layer_args(qbytes, scales, part_sizes, config.block_n)
    programs = triton.cdiv(n, config.block_n)
    split_k = _split_k(config, programs, k, x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(programs, split_k)](
        x,
        *tensors,
        codebooks,
        out,
        *_split_buffers(split_k, m, n, programs, x.device),
        n,
        k,
        x.stride(0),
        *strides,
        ROWS=m,
        **constants,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split_k,
        EVEN_K=k % config.block_k == 0,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def pick_gemv_config(m: int) -> TileConfig:
    """The stored GEMV configuration for a batch of ``m`` <= GEMV_MAX_M rows."""
    return next(config for limit, config in GEMV_CONFIGS if m <= limit)


def pick_config(m: int) -> TileConfig:
    """The stored GEMM tile configuration for a batch of ``m`` rows."""
    return next(config for limit, config in GEMM_CONFIGS if m <= limit)


def _narrow_step(config: TileConfig, group_size: int) -> TileConfig:
    """``config`` with its K step cut to the layout's block, which divides the group: one scale per column
    and step (the GEMV and the dequantizer; the GEMM's tl.dot needs steps of at least 128)."""
    return config._replace(block_k=min(config.block_k, cuda_block(group_size)))


def gemm(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    part_sizes: list[int],
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (unit stride along K) @ Wᵀ with the tensor-core kernel; returns [M, N] in x.dtype."""
    m, k = x.shape
    n = qbytes.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    config = config or pick_config(m)
    tensors, strides, constants = _layer_args(qbytes, scales, part_sizes, config.block_n)
    programs = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    split_k = _split_k(config, programs, k, x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemm_kernel[(programs, split_k)](
        x,
        *tensors,
        codebooks,
        out,
        *_split_buffers(split_k, m, n, programs, x.device),
        m,
        n,
        k,
        x.stride(0),
        *strides,
        **constants,
        **dot_options(config, x),
        SPLIT_K=split_k,
        GROUP_M=config.group_m,
    )
    return out


def dot_options(config: TileConfig, x: torch.Tensor) -> dict:
    """The tile constants and launch options of a kernel that runs ``_dot_steps`` on x [M, K]."""
    return dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        EVEN_K=x.shape[1] % config.block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def dequantize(
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    part_sizes: list[int],
    dtype: torch.dtype,
    rows: range | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``rows`` (default all) of the dense [N, K] weight in ``dtype``, equal to the reference
    dequantizer; written into ``out`` (at least that many rows, contiguous) when given."""
    n, k = qbytes.shape[0], 2 * qbytes.shape[1]
    rows = rows or range(n)
    if out is None:
        out = torch.empty((len(rows), k), dtype=dtype, device=qbytes.device)
    tensors, strides, constants = _layer_args(qbytes, scales, part_sizes, DEQUANT_BLOCK_N, rows.start)
    block_k = min(DEQUANT_BLOCK_K, cuda_block(constants["GROUP_SIZE"]))  # one scale per column and step
    _dequant_kernel[(triton.cdiv(len(rows), DEQUANT_BLOCK_N), triton.cdiv(k, block_k))](
        *tensors,
        codebooks,
        out,
        rows.stop,
        k,
        rows.start,
        *strides,
        **constants,
        BLOCK_N=DEQUANT_BLOCK_N,
        BLOCK_K=block_k,
        num_warps=DEQUANT_WARPS,
    )
    return out[: len(rows)]


def dequantize_matmul(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    part_sizes: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] @ Wᵀ (+ bias) for large M: slabs of W's rows dequantized into one L2-sized buffer, each
    multiplied by cuBLAS straight into its columns of the output; no dense copy of W is made."""
    m, k = x.shape
    n = qbytes.shape[0]
    slab = max(DEQUANT_BLOCK_N, DEQUANT_SLAB_BYTES // (k * x.element_size()) // DEQUANT_BLOCK_N * DEQUANT_BLOCK_N)
    buffer = torch.empty((min(slab, n), k), dtype=x.dtype, device=x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    for first in range(0, n, slab):
        rows = range(first, min(n, first + slab))
        weight = dequantize(qbytes, scales, codebooks, part_sizes, x.dtype, rows, buffer)
        columns = out[:, rows.start : rows.stop]
        if bias is None:
            torch.mm(x, weight.t(), out=columns)
        else:
            torch.addmm(bias[rows.start : rows.stop], x, weight.t(), out=columns)
    return out


def linear(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    part_sizes: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``aaac::linear`` on CUDA: the GEMV for decoding, the tensor-core kernel for medium batches,
    slabs of dequantized weight and cuBLAS for large ones."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    if m >= DEQUANT_MATMUL_MIN_M:
        y = dequantize_matmul(x2d, qbytes, scales, codebooks, part_sizes, bias)
    else:
        y = (gemv if 0 < m <= GEMV_MAX_M else gemm)(x2d, qbytes, scales, codebooks, part_sizes)
        if bias is not None:
            y += bias
    return y.view(*x.shape[:-1], y.shape[-1])

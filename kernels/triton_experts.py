"""``aaac::routed_experts`` on CUDA: every routed expert's gate_up and down as one grouped Triton kernel each.

The (token, expert) pairs are sorted by expert into slots, each expert's run of slots padded to a multiple
of the tile's rows (as vLLM's ``moe_align_block_size`` does), so that every row block of the kernel's grid
belongs to one expert. A program reads its block's expert and runs ``triton_gemm``'s GEMM main loop
(``_dot_steps``) on that expert's weights: rows of x gathered by token for gate_up, rows of the
intermediate in slot order for down, whose outputs go back to each pair's row. Nothing is read back to
the host: the sort is a handful of torch ops and the grid is sized from shapes alone (at most
``pairs + min(pairs, experts) * (BLOCK_M - 1)`` slots; blocks past the last expert's run exit at once),
so vLLM can capture the layer in a CUDA graph as it does the dense ``aaac::linear``.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_gemm import TileConfig, _codebook_offsets, _dot_steps, _layer_args, dot_options, pick_config


@triton.jit
def _experts_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    cb_ptr,
    out_ptr,
    slot_pairs_ptr,
    block_experts_ptr,
    N,
    K,
    PAIRS,
    EXPERTS,
    stride_xm,
    stride_om,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_ce,
    X_BY_TOKEN: tl.constexpr,
    TOP_K: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    PART_STARTS: tl.constexpr,
    LOOKUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out = x @ W_eᵀ for one block of BLOCK_M slots (all routed to expert e) and BLOCK_N columns.

    X_BY_TOKEN (gate_up): x row = token of the slot's pair (pair // TOP_K), out row = slot.
    Otherwise (down): x row = slot, out row = the slot's pair. Padding slots hold PAIRS."""
    # Row blocks vary fastest, so the blocks of one expert read each weight tile while it is in L2.
    pid_m = tl.program_id(0)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < EXPERTS:  # blocks past the last expert's run hold no pairs
        slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(slot_pairs_ptr + slots)
        mask_m = pairs < PAIRS
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        e = expert.to(tl.int64)
        pair_ptrs = cb_ptr + e * stride_ce + _codebook_offsets(offs_n, PART_STARTS)[:, None]
        # Row offsets in int64: the [slots, 2I] intermediate passes 2^31 elements (Mixtral: ~37k tokens a step).
        x_rows = (pairs // TOP_K if X_BY_TOKEN else slots).to(tl.int64) * stride_xm
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc = _dot_steps(
            acc,
            x_ptr,
            x_rows,
            mask_m,
            w_ptr + e * stride_we,
            s_ptr + e * stride_se,
            pair_ptrs,
            offs_n,
            mask_n,
            0,
            tl.cdiv(K, BLOCK_K),
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
        if X_BY_TOKEN:  # every slot of the block, padding included (its x rows were zeros)
            out_rows, mask = slots, mask_n[:, None]
        else:
            out_rows, mask = pairs, mask_m[None, :] & mask_n[:, None]
        out_ptrs = out_ptr + out_rows.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sort_pairs(local_experts: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of the (token, expert) pairs: each expert's pairs in a run of slots padded to a multiple
    of ``block_m``, runs in expert order; ``local_experts`` [pairs] holds each pair's local expert (-1:
    another expert-parallel rank's). Returns (the pair of each slot, ``pairs`` for padding; the expert of
    each block of ``block_m`` slots, ``experts`` for blocks past the last run). Torch ops only, no sync."""
    pairs = local_experts.numel()
    key = torch.where(local_experts < 0, experts, local_experts)  # other ranks' pairs sort last
    counts = torch.zeros(experts + 1, dtype=torch.int64, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:experts] + block_m - 1) // block_m * block_m
    run_ends = padded.cumsum(0)
    run_starts = torch.cat([run_ends - padded, run_ends[-1:]])  # other ranks' pairs after the last run
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank_in_run = torch.arange(pairs, device=key.device) - (counts.cumsum(0) - counts)[sorted_key]
    # At most min(pairs, experts) runs are padded, each by fewer than block_m slots.
    capacity = triton.cdiv(pairs + min(pairs, experts) * (block_m - 1), block_m) * block_m
    slot_pairs = torch.full((capacity,), pairs, dtype=torch.int32, device=key.device)
    slot_pairs.scatter_(0, run_starts[sorted_key] + rank_in_run, order.int())
    block_starts = torch.arange(0, capacity, block_m, device=key.device)
    block_experts = torch.searchsorted(run_ends, block_starts, right=True).int()
    return slot_pairs, block_experts


def _grouped(
    x: torch.Tensor,
    x_by_token: bool,
    top_k: int,
    pairs: int,
    slot_pairs: torch.Tensor,
    block_experts: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    part_sizes: list[int],
    out: torch.Tensor,
    config: TileConfig,
) -> torch.Tensor:
    """One launch of ``_experts_kernel`` on the experts' stacked layouts [experts, ...]."""
    experts, n = qbytes.shape[:2]
    k = x.shape[1]
    _, _, constants = _layer_args(qbytes[0], scales[0], part_sizes, config.block_n)
    words, scale_bits = qbytes.view(torch.int32), scales.view(torch.int16)
    _experts_kernel[(block_experts.numel(), triton.cdiv(n, config.block_n))](
        x,
        words,
        scale_bits,
        codebooks,
        out,
        slot_pairs,
        block_experts,
        n,
        k,
        pairs,
        experts,
        x.stride(0),
        out.stride(0),
        words.stride(0),
        words.stride(1),
        scale_bits.stride(0),
        scale_bits.stride(1),
        codebooks.stride(0),
        X_BY_TOKEN=x_by_token,
        TOP_K=top_k,
        **constants,
        **dot_options(config, x),
    )
    return out


def routed_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_qweight: torch.Tensor,
    w13_scales: torch.Tensor,
    w13_codebooks: torch.Tensor,
    w2_qweight: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_codebooks: torch.Tensor,
    intermediate: int,
    expert_map: torch.Tensor | None,
    weights_on_input: bool,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``aaac::routed_experts`` (its schema and meaning: ``routed_experts``) with two grouped launches;
    ``config`` (default: by the pairs an expert gets on average, as vLLM's fused_moe picks its tiles)
    sets both launches' tiles."""
    tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    pairs, experts = tokens * top_k, w13_qweight.shape[0]
    if pairs == 0:
        return torch.zeros_like(x)
    x = x if x.stride(1) == 1 else x.contiguous()
    local = (topk_ids if expert_map is None else expert_map[topk_ids.long()]).flatten().long()
    config = config or pick_config(triton.cdiv(pairs, experts))
    slot_pairs, block_experts = sort_pairs(local, experts, config.block_m)
    weights = topk_weights.flatten()[:, None].to(x.dtype)
    if weights_on_input:  # each pair's own input row, scaled as the loop scales it
        x, x_top_k = (x[:, None, :] * weights.view(tokens, top_k, 1)).view(pairs, hidden), 1
    else:
        x_top_k = top_k
    gate_up = x.new_empty((slot_pairs.numel(), 2 * intermediate))
    w13 = (w13_qweight, w13_scales, w13_codebooks, [intermediate] * 2)
    _grouped(x, True, x_top_k, pairs, slot_pairs, block_experts, *w13, gate_up, config)
    h = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
    y = x.new_zeros((pairs, hidden))  # other ranks' pairs stay zero
    w2 = (w2_qweight, w2_scales, w2_codebooks, [hidden])
    _grouped(h, False, 1, pairs, slot_pairs, block_experts, *w2, y, config)
    if not weights_on_input:
        y = y * weights
    return y.view(tokens, top_k, hidden).sum(1)

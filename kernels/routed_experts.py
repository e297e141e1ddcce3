"""``torch.ops.aaac.routed_experts``: a mixture-of-experts layer whose experts are AAAC linears, as one op.

The experts' ``aaac::linear`` tensors (in their device's layout: ``format.serving.prepare``) are stacked by
expert. On CPU the op loops over the experts that received tokens and runs each one's gate_up and down
through ``torch.ops.aaac.linear`` (the C++ kernels); the loop reads the routing on the host. On CUDA
``triton_experts`` runs all experts' gate_up, then all their down, as one grouped Triton kernel each,
without reading anything back to the host (so CUDA graphs can capture it). Either way the op has a fake
implementation: one opaque node to torch.compile (vLLM's compiled mode), which cannot trace a loop whose
length depends on the data. vLLM's ``AAACMoEMethod`` calls it; ``aaac_kernels.experts.ExpertLinears`` is
the CPU loop over modules (transformers runs it on every device).
"""

import itertools

import torch
import torch.nn.functional as F

from . import linear, triton_experts  # noqa: F401  linear registers torch.ops.aaac.linear

_LIBRARY = torch.library.Library("aaac", "FRAGMENT")
_LIBRARY.define(
    "routed_experts(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13_qweight, Tensor w13_scales, "
    "Tensor w13_codebooks, Tensor w2_qweight, Tensor w2_scales, Tensor w2_codebooks, int intermediate, "
    "Tensor? expert_map, bool weights_on_input) -> Tensor"
)


def routed_experts_loop(
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
) -> torch.Tensor:
    """sum over k of topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), one expert at a time: x [T, H];
    w13 (gate and up, merged) and w2 (down): the experts' ``aaac::linear`` tensors in their device's
    layout, stacked by local expert; expert_map global -> local expert (-1: another rank's), or None when
    every expert is local; weights_on_input scales the inputs by the routing weights instead of the outputs.

    The (token, expert) pairs are sorted by expert once, so each expert's tokens are one slice of a single
    gather, and the activation, the weighting and the sum run once for all experts: per expert there are
    only its two ``aaac::linear`` calls.
    """
    hidden, top_k = x.shape[-1], topk_ids.shape[-1]
    local = (topk_ids.long() if expert_map is None else expert_map[topk_ids.long()]).flatten()
    order = torch.argsort(local, stable=True)
    experts, counts = (t.tolist() for t in torch.unique_consecutive(local[order], return_counts=True))
    if experts and experts[0] < 0:  # pairs routed to other expert-parallel ranks sort first: not ours
        order, experts, counts = order[counts[0] :], experts[1:], counts[1:]
    if not experts:
        return torch.zeros_like(x)
    rows = list(zip(experts, itertools.accumulate(counts, initial=0), itertools.accumulate(counts)))
    tokens, weights = order // top_k, topk_weights.flatten()[order, None].to(x.dtype)
    inputs = x[tokens] * weights if weights_on_input else x[tokens]
    gate_up = torch.cat(
        [
            torch.ops.aaac.linear(
                inputs[a:b], w13_qweight[e], w13_scales[e], w13_codebooks[e], [intermediate] * 2, None
            )
            for e, a, b in rows
        ]
    )
    h = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
    y = torch.cat(
        [
            torch.ops.aaac.linear(h[a:b], w2_qweight[e], w2_scales[e], w2_codebooks[e], [hidden], None)
            for e, a, b in rows
        ]
    )
    return torch.zeros_like(x).index_add_(0, tokens, y if weights_on_input else y * weights)


_LIBRARY.impl("routed_experts", routed_experts_loop, "CPU")
_LIBRARY.impl("routed_experts", triton_experts.routed_experts, "CUDA")


@torch.library.register_fake("aaac::routed_experts")
def _(x, topk_weights, topk_ids, *weights_and_options):
    return torch.empty_like(x)

"""AWQ (Lin et al., 2024): activation-aware channel scaling, folded into the previous operation,
and a clip search; both judged on the linear outputs over all calibration tokens.

For the linears fed by one operation (q, k, v after the input norm; gate and up
after the post-attention norm; o after v; down after up), AWQ multiplies input
channel k of their weights by s[k] = mean|x[k]|^alpha (normalised) and divides
the previous operation's output by s[k], which leaves the float model unchanged
but gives salient channels finer steps on the grid. In a mixture-of-experts block
the post-attention norm feeds every expert's gate and up (and a shared expert's),
each judged with the statistics of the tokens routed to it, and the routers, whose
weights take s as well but stay unquantized; each expert's up feeds its own down.
alpha is searched on a grid of 20 in [0, 1) (alpha = 0 is no scaling). Clip
search then shrinks each group's range by up to 50% where that lowers the group's
output error (q and k excepted, as in AutoAWQ: their error goes through the softmax).

The objective is the paper's, ||X W^T - X Q(W diag(s))^T diag(s)^-1||^2 summed
over the group's linears, computed exactly from H = mean(x x^T) as
sum((D H) * D), D the weight error, so the search sees every calibration token
at the cost of [N, K] x [K, K] matmuls.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from aaac_kernels.experts import ExpertLinears
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.experts import PLAIN, ROUTER_NAMES

from .objectives import output_error
from .statistics import LinearStatistics
from .uniform_grid import UniformGrid, rtn_dequantized

SCALE_STEPS = 20
CLIP_STEPS, MAX_SHRINK = 20, 0.5
NO_CLIP = ("q_proj", "k_proj")


# What a Llama-style block must have; a mixture-of-experts block has experts (and routers) for its MLP.
ATTENTION = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DENSE_MLP = ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPERT_MLP = ("post_attention_layernorm", "mlp.experts", "mlp.gate")


@dataclass
class ScalingGroup:
    previous: str  # a norm (its weight) or a linear (its output rows), by its name within the block
    linears: list[str]  # the quantized linears it feeds, whose output error the search judges
    routers: list[str] = field(default_factory=list)  # unquantized modules it feeds: their weights take s
    salience: str = ""  # whose statistics' mean |x| makes s: the first linear's, or a router's (all tokens)

    def __post_init__(self):
        self.salience = self.salience or self.linears[0]


def scaling_groups(block: nn.Module, index: int) -> list[ScalingGroup]:
    """The foldable (previous op, linears) groups of a Llama-style decoder block, dense or with experts."""
    modules = dict(block.named_modules())
    experts = modules.get("mlp.experts")
    names = ATTENTION + (DENSE_MLP if experts is None else EXPERT_MLP)
    missing = [name for name in names if name not in modules]
    if missing:
        raise AAACError(
            f"AWQ scaling knows Llama-style blocks ({', '.join(ATTENTION + DENSE_MLP)}, or {', '.join(EXPERT_MLP)} "
            f"for the MLP); block {index} of this model has no {missing[0]}"
        )
    for norm in ("input_layernorm", "post_attention_layernorm"):
        if "Gemma" in type(modules[norm]).__name__:  # Gemma's norm multiplies by (1 + weight): dividing weight is wrong
            raise AAACError(f"AWQ scaling cannot fold into {type(modules[norm]).__name__} (block {index}.{norm})")
    groups = [ScalingGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    # v's output rows are o's input channels only without grouped-query attention.
    if modules["self_attn.v_proj"].out_features == modules["self_attn.o_proj"].in_features:
        groups.append(ScalingGroup("self_attn.v_proj", ["self_attn.o_proj"]))
    if experts is None:
        groups.append(ScalingGroup("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]))
        groups.append(ScalingGroup("mlp.up_proj", ["mlp.down_proj"]))
        return groups
    if not isinstance(experts, ExpertLinears):
        raise AAACError(f"AWQ scaling cannot fold into {type(experts).__name__} (block {index}.mlp.experts)")
    mlps = [(f"mlp.experts.{e}", getattr(experts, str(e)).naming) for e in range(experts.num_experts)]
    if "mlp.shared_expert" in modules:  # Qwen2-MoE: a dense MLP beside the experts, and its router
        mlps.append(("mlp.shared_expert", PLAIN))
    routers = [name for name in ROUTER_NAMES if f"mlp.{name}" in modules]
    fed = [f"{mlp}.{part}" for mlp, naming in mlps for part in (naming.gate, naming.up)]
    groups.append(ScalingGroup("post_attention_layernorm", fed, [f"mlp.{r}" for r in routers], salience="mlp.gate"))
    groups += [ScalingGroup(f"{mlp}.{naming.up}", [f"{mlp}.{naming.down}"]) for mlp, naming in mlps]
    return groups


def search_scale(
    weights: list[torch.Tensor],
    second_moments: list[torch.Tensor],
    mean_abs: torch.Tensor,
    group_size: int,
    grid: UniformGrid,
) -> tuple[torch.Tensor, float]:
    """The per-channel scale s [K] with the lowest output error of the weights, each under its own inputs'
    second moment; returns (s, alpha)."""
    best = (float("inf"), torch.ones_like(mean_abs), 0.0)
    for step in range(SCALE_STEPS):
        alpha = step / SCALE_STEPS
        s = mean_abs.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(
            output_error(w, rtn_dequantized(w * s, group_size, grid.symmetric) / s, h)
            for w, h in zip(weights, second_moments, strict=True)
        ).item()
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def search_clip(weight: torch.Tensor, second_moment: torch.Tensor, group_size: int, grid: UniformGrid) -> torch.Tensor:
    """Weight [N, K] with every group clipped to the range (shrunk by up to 50%) of lowest output error.

    Each group's error is its own output contribution, d_g H_gg d_g^T, as AutoAWQ measures it.
    """
    n, k = weight.shape
    groups = k // group_size
    w = weight.reshape(n, groups, group_size)
    blocks = torch.stack(
        [
            second_moment[g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size]
            for g in range(groups)
        ]
    )
    absmax = w.abs().amax(-1, keepdim=True)
    best_error = torch.full((n, groups), float("inf"), device=w.device)
    best_max = absmax.clone()
    for step in range(int(MAX_SHRINK * CLIP_STEPS)):
        limit = absmax * (1 - step / CLIP_STEPS)
        clipped = torch.clamp(w, -limit, limit)
        d = w - grid.quantize(clipped, grid.fit(clipped))[1]
        error = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_max = torch.where(better.unsqueeze(-1), limit, best_max)
    return torch.clamp(w, -best_max, best_max).reshape(n, k)


@torch.no_grad()
def fold(block: nn.Module, group: ScalingGroup, s: torch.Tensor) -> None:
    """previous(x) / s feeds modules whose input channels are multiplied by s: the float model is unchanged."""
    previous = block.get_submodule(group.previous)
    if isinstance(previous, nn.Linear):
        previous.weight.div_(s.unsqueeze(1))
        if previous.bias is not None:
            previous.bias.div_(s)
    else:
        previous.weight.div_(s)
        if getattr(previous, "bias", None) is not None:
            previous.bias.div_(s)
    for name in group.linears + group.routers:  # a router's weight is [experts, K] as a linear's is
        block.get_submodule(name).weight.mul_(s)


def scale_block(
    block: nn.Module, index: int, linears: dict[str, nn.Linear], stats: dict[str, LinearStatistics], group_size: int
) -> dict[str, dict]:
    """AWQ channel scaling of one block, in place: weights, the previous operations, and the statistics.

    ``stats`` holds every linear's statistics and, for a mixture-of-experts block, its router's
    (``mlp.gate``: the mean |x| over all tokens). Returns {previous operation's name: {"alpha": searched
    alpha, "linears": the linears it feeds, "routers": the routers it feeds}}.
    """
    record = {}
    for group in scaling_groups(block, index):
        weights = [linears[name].weight.float() for name in group.linears]
        second_moments = [stats[name].second_moment for name in group.linears]
        s, alpha = search_scale(weights, second_moments, stats[group.salience].mean_abs, group_size, UniformGrid())
        fold(block, group, s.to(linears[group.linears[0]].weight.dtype))
        for name in group.linears + group.routers:
            stats[name] = stats[name].scaled(s)
        record[group.previous] = {"alpha": alpha, "linears": group.linears, "routers": group.routers}
    return record

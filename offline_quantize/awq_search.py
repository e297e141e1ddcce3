"""AWQ (Lin et al., 2024): activation-aware channel scaling, folded into the previous operation,
and a clip search; both judged on the linear outputs over all calibration tokens.

For the linears fed by one operation (q, k, v after the input norm; gate and up
after the post-attention norm; o after v; down after up), AWQ multiplies input
channel k of their weights by s[k] = mean|x[k]|^alpha (normalised) and divides
the previous operation's output by s[k], which leaves the float model unchanged
but gives salient channels finer steps on the grid. alpha is searched on a grid
of 20 in [0, 1) (alpha = 0 is no scaling). Clip search then shrinks each group's
range by up to 50% where that lowers the group's output error (q and k excepted,
as in AutoAWQ: their error goes through the softmax).

The objective is the paper's, ||X W^T - X Q(W diag(s))^T diag(s)^-1||^2 summed
over the group's linears, computed exactly from H = mean(x x^T) as
sum((D H) * D), D the weight error, so the search sees every calibration token
at the cost of [N, K] x [K, K] matmuls.
"""

from dataclasses import dataclass

import torch
from torch import nn

from aaac_kernels.format.errors import AAACError

from .objectives import output_error
from .statistics import LinearStatistics
from .uniform_grid import UniformGrid, rtn_dequantized

SCALE_STEPS = 20
CLIP_STEPS, MAX_SHRINK = 20, 0.5
NO_CLIP = ("q_proj", "k_proj")


@dataclass
class ScalingGroup:
    previous: nn.Module  # a norm (its weight) or a linear (its output rows)
    linears: list[str]  # names within the block


def scaling_groups(block: nn.Module, index: int) -> list[ScalingGroup]:
    """The foldable (previous op, linears) pairs of a Llama-style decoder block."""
    names = (
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    modules = dict(block.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise AAACError(
            f"AWQ scaling knows Llama-style blocks ({', '.join(names)}); "
            f"block {index} of this model has no {missing[0]}"
        )
    for norm in ("input_layernorm", "post_attention_layernorm"):
        if "Gemma" in type(modules[norm]).__name__:  # Gemma's norm multiplies by (1 + weight): dividing weight is wrong
            raise AAACError(f"AWQ scaling cannot fold into {type(modules[norm]).__name__} (block {index}.{norm})")
    groups = [
        ScalingGroup(modules["input_layernorm"], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ScalingGroup(modules["post_attention_layernorm"], ["mlp.gate_proj", "mlp.up_proj"]),
        ScalingGroup(modules["mlp.up_proj"], ["mlp.down_proj"]),
    ]
    # v's output rows are o's input channels only without grouped-query attention.
    if modules["self_attn.v_proj"].out_features == modules["self_attn.o_proj"].in_features:
        groups.insert(1, ScalingGroup(modules["self_attn.v_proj"], ["self_attn.o_proj"]))
    return groups


def search_scale(
    weights: list[torch.Tensor], second_moment: torch.Tensor, mean_abs: torch.Tensor, group_size: int, grid: UniformGrid
) -> tuple[torch.Tensor, float]:
    """The per-channel scale s [K] with the lowest output error; returns (s, alpha)."""
    best = (float("inf"), torch.ones_like(mean_abs), 0.0)
    for step in range(SCALE_STEPS):
        alpha = step / SCALE_STEPS
        s = mean_abs.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(
            output_error(w, rtn_dequantized(w * s, group_size, grid.symmetric) / s, second_moment) for w in weights
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
def fold(group: ScalingGroup, linears: dict[str, nn.Linear], s: torch.Tensor) -> None:
    """previous(x) / s feeds linears whose input channels are multiplied by s: the float model is unchanged."""
    previous = group.previous
    if isinstance(previous, nn.Linear):
        previous.weight.div_(s.unsqueeze(1))
        if previous.bias is not None:
            previous.bias.div_(s)
    else:
        previous.weight.div_(s)
        if getattr(previous, "bias", None) is not None:
            previous.bias.div_(s)
    for name in group.linears:
        linears[name].weight.mul_(s)


def scale_block(
    block: nn.Module, index: int, linears: dict[str, nn.Linear], stats: dict[str, LinearStatistics], group_size: int
) -> dict[str, dict]:
    """AWQ channel scaling of one block, in place: weights, the previous operations, and the statistics.

    Returns {previous operation's name: {"alpha": searched alpha, "linears": the linears it feeds}}.
    """
    names = {module: name for name, module in block.named_modules()}
    record = {}
    for group in scaling_groups(block, index):
        first = stats[group.linears[0]]
        weights = [linears[name].weight.float() for name in group.linears]
        s, alpha = search_scale(weights, first.second_moment, first.mean_abs, group_size, UniformGrid())
        fold(group, linears, s.to(linears[group.linears[0]].weight.dtype))
        for name in group.linears:
            stats[name] = stats[name].scaled(s)
        record[names[group.previous]] = {"alpha": alpha, "linears": group.linears}
    return record

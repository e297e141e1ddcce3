"""A mixture-of-experts layer as one linear per expert and part, run as a loop over the routed experts.

The same loop over stacked expert layouts is the op ``torch.ops.aaac.routed_experts`` (``routed_experts``),
which vLLM's ``AAACMoEMethod`` runs.

transformers 5 holds a layer's experts as fused 3-D parameters; the quantizer, the reference loader and
the AAAC loader in transformers replace that module with ``ExpertLinears``, whose children are the
experts as checkpoints store them (``experts.<e>.<gate|up|down>``, format.experts), so each is an
ordinary linear: an ``nn.Linear`` (quantizer, reference) or an ``AAACLinear`` (``aaac_kernels.hf``).
The forward is transformers' own: for each expert that received tokens, ``down(act(gate(x)) * up(x))``
on those tokens, weighted by their routing weights and summed.
"""

from collections.abc import Callable

import torch
from torch import nn

from .format.experts import ExpertNaming

# (in_features, out_features, device, dtype) -> the linear module of one part of one expert
LinearFactory = Callable[[int, int, torch.device, torch.dtype], nn.Module]


def dense_linear(in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)


class Expert(nn.Module):
    """One expert's gated MLP, its three linears named as the checkpoint names them."""

    def __init__(self, naming: ExpertNaming, hidden: int, intermediate: int, make: LinearFactory, device, dtype):
        super().__init__()
        self.naming = naming
        self.add_module(naming.gate, make(hidden, intermediate, device, dtype))
        self.add_module(naming.up, make(hidden, intermediate, device, dtype))
        self.add_module(naming.down, make(intermediate, hidden, device, dtype))

    def forward(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        gate, up, down = (getattr(self, part) for part in self.naming.parts)
        return down(act(gate(x)) * up(x))


class ExpertLinears(nn.Module):
    """Stands in for a transformers experts module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])
    with the same forward signature: (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])."""

    def __init__(self, fused: nn.Module, naming: ExpertNaming, make: LinearFactory = dense_linear):
        super().__init__()
        experts, twice_intermediate, hidden = fused.gate_up_proj.shape
        device, dtype = fused.gate_up_proj.device, fused.gate_up_proj.dtype
        self.num_experts = experts
        self.act_fn = fused.act_fn
        for e in range(experts):
            self.add_module(str(e), Expert(naming, hidden, twice_intermediate // 2, make, device, dtype))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts).nonzero().flatten().tolist()
        for e in hit:
            tokens, slot = torch.where(top_k_index == e)
            y = getattr(self, str(e))(hidden_states[tokens], self.act_fn)
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: fused 3-D ``gate_up_proj`` and ``down_proj`` parameters."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3


def unfuse_experts(model: nn.Module, naming: ExpertNaming, make: LinearFactory = dense_linear) -> None:
    """Replace every fused experts module of ``model`` with ``ExpertLinears`` (on the same device, weights
    uninitialized)."""
    fused = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    for name, module in fused:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ExpertLinears(module, naming, make))


def has_fused_experts(model: nn.Module) -> bool:
    return any(is_fused_experts(module) for module in model.modules())

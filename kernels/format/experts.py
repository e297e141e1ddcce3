"""How a mixture-of-experts layer is stored: one linear per expert and part, under the source's names.

transformers 5 holds a layer's experts fused (``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I]) and builds them from per-expert tensors as it loads a checkpoint;
checkpoints, and vLLM's loaders, keep one tensor per expert and part:
``<block>.<moe>.experts.<e>.<part>.weight``. An AAAC checkpoint stores each of those as a quantized
linear of its own (``qweight``, ``scales``, ``codebooks``; docs/format.md), so every expert and part
has its own codebook pair. The routers stay unquantized.
"""

import re
from dataclasses import dataclass

from .errors import AAACError


@dataclass(frozen=True)
class ExpertNaming:
    """The names a model type stores an expert's parts under, and the name fragments transformers renames
    as it loads (in transformers, in the checkpoint)."""

    gate: str
    up: str
    down: str
    renames: tuple[tuple[str, str], ...] = ()

    @property
    def parts(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down

    def stored_name(self, name: str) -> str:
        """A module or tensor name as transformers has it -> the name the checkpoint stores it under."""
        for in_model, in_checkpoint in self.renames:
            name = name.replace(in_model, in_checkpoint)
        return name

    def model_name(self, name: str) -> str:
        """A checkpoint's tensor name -> the name transformers gives it."""
        for in_model, in_checkpoint in self.renames:
            name = name.replace(in_checkpoint, in_model)
        return name


_QWEN = ExpertNaming("gate_proj", "up_proj", "down_proj")
NAMINGS = {
    "mixtral": ExpertNaming("w1", "w3", "w2", ((".mlp.", ".block_sparse_moe."),)),
    "qwen2_moe": _QWEN,
    "qwen3_moe": _QWEN,
    "olmoe": _QWEN,
}
PLAIN = ExpertNaming("gate_proj", "up_proj", "down_proj")  # for models without experts: renames nothing

# A router: the linear that scores the experts (and Qwen2-MoE's gate of its shared expert). It decides
# which weights run, so it keeps its precision; transformers 5 makes most routers modules of their own.
ROUTER_NAMES = ("gate", "shared_expert_gate")

_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.(?P<expert>\d+)\.(?P<part>[A-Za-z0-9_]+)$")


def naming_for(model_type: str, has_experts: bool) -> ExpertNaming:
    """The naming of a model type; a model with fused experts of an unknown type is refused."""
    if not has_experts:
        return NAMINGS.get(model_type, PLAIN)
    if model_type not in NAMINGS:
        raise AAACError(
            f"model type '{model_type}' has mixture-of-experts layers the quantizer does not know how to store; "
            f"supported: {', '.join(sorted(NAMINGS))}"
        )
    return NAMINGS[model_type]


def expert_of(name: str) -> tuple[str, int, str] | None:
    """``<layer>.experts.<e>.<part>`` -> (``<layer>.experts``, e, part); None for any other linear."""
    match = _EXPERT.match(name)
    return None if match is None else (match["layer"], int(match["expert"]), match["part"])

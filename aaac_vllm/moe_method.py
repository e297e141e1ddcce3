"""``AAACMoEMethod``: mixture-of-experts layers (vLLM's ``FusedMoE``) whose experts are AAAC linears.

The checkpoint stores each expert's gate, up and down as AAAC linears of their own (format.experts);
vLLM hands them to this method one at a time, by expert and part (``w1`` gate, ``w3`` up, ``w2`` down).
Each expert keeps its gate and up as one merged linear [2 I, H] with a codebook pair per part (as a dense
gate_up layer does), and its down [H, I]. Tensor parallel splits I: gate and up by output columns, down
by input rows (whole groups: I / tp must be a multiple of the group size), and the MoE runner sums the
ranks' outputs. Expert parallel gives each rank its own experts (the loader skips the others).

The forward is ``torch.ops.aaac.routed_experts`` (``aaac_kernels.routed_experts``): gate_up, the gated
activation and down of every expert that received tokens, weighted by the routing weights and summed into
the output, reading each active expert's weights once per step. On CPU it loops over those experts, two
``torch.ops.aaac.linear`` calls each (docs/vllm.md gives the measured cost); on CUDA it runs two grouped
Triton kernels with no host sync, so CUDA graphs can capture it.
"""

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.utils import set_weight_attrs

from aaac_kernels import routed_experts  # noqa: F401  registers torch.ops.aaac.routed_experts
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.layout import CODEBOOK_SIZE, NUM_CODEBOOKS, PACK_FACTOR
from aaac_kernels.format.serving import prepare

PARTS = {"w1": 0, "w3": 1, "w2": 0}  # vLLM's shard ids: gate and up share w13, down is w2
TENSORS = ("qweight", "scales", "codebooks")


class AAACMoEMethod(FusedMoEMethodBase):
    """Experts in the AAAC format, run by ``torch.ops.aaac.routed_experts``."""

    def __init__(self, group_size: int, moe: FusedMoEConfig) -> None:
        super().__init__(moe)
        self.group_size = group_size
        if moe.activation != MoEActivation.SILU:
            raise AAACError(f"AAAC experts run the SiLU-gated MLP; this model's experts use {moe.activation.value}")

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        g, intermediate = self.group_size, intermediate_size_per_partition
        if hidden_size % g or intermediate % g:
            raise AAACError(
                f"{getattr(layer, 'layer_name', 'an MoE layer')}: hidden size {hidden_size} and intermediate size "
                f"{intermediate} per tensor-parallel rank must be multiples of the group size {g}; use a "
                "tensor-parallel size that keeps whole groups"
            )
        shapes = {  # per expert, in the checkpoint's orientation: [K / 8, N], [K / G, N], [parts, 2, 16]
            "w13_qweight": ((hidden_size // PACK_FACTOR, 2 * intermediate), torch.int32),
            "w13_scales": ((hidden_size // g, 2 * intermediate), torch.float16),
            "w13_codebooks": ((2, NUM_CODEBOOKS, CODEBOOK_SIZE), torch.float16),
            "w2_qweight": ((intermediate // PACK_FACTOR, hidden_size), torch.int32),
            "w2_scales": ((intermediate // g, hidden_size), torch.float16),
            "w2_codebooks": ((1, NUM_CODEBOOKS, CODEBOOK_SIZE), torch.float16),
        }
        loader = self._weight_loader(layer)
        for name, (shape, dtype) in shapes.items():
            param = torch.nn.Parameter(torch.empty(num_experts, *shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": loader, "aaac_tensor": name.split("_")[1]})
        layer.aaac_intermediate = intermediate

    def _weight_loader(self, layer: torch.nn.Module):
        def load(
            param: torch.nn.Parameter,
            loaded_weight: torch.Tensor,
            weight_name: str,
            shard_id: str,
            expert_id: int,
            return_success: bool = False,
        ) -> bool | None:
            expert = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if expert == -1:  # another expert-parallel rank's expert
                return False if return_success else None
            target = param.data[expert]
            rank, ranks = layer.moe_config.tp_rank, layer.moe_config.tp_size
            if param.aaac_tensor == "codebooks":
                target, source = target[PARTS[shard_id]], loaded_weight
            elif shard_id == "w2":  # row parallel: this rank's rows of K (I)
                rows = target.shape[0]
                source = loaded_weight[rank * rows : (rank + 1) * rows]
            else:  # column parallel: this rank's columns of gate (w1) or up (w3)
                columns = target.shape[1] // 2
                target = target[:, PARTS[shard_id] * columns : (PARTS[shard_id] + 1) * columns]
                source = loaded_weight[:, rank * columns : (rank + 1) * columns]
            if source.shape != target.shape:
                raise AAACError(
                    f"{weight_name} of expert {expert_id} ({shard_id}): a tensor of shape "
                    f"{list(loaded_weight.shape)} gives {list(source.shape)} on tensor-parallel rank {rank} of "
                    f"{ranks}, expected {list(target.shape)}"
                )
            target.copy_(source)
            return True if return_success else None

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        name = getattr(layer, "layer_name", "MoE layer")
        for stem in ("w13", "w2"):
            for tensor in ("scales", "codebooks"):
                if not torch.isfinite(getattr(layer, f"{stem}_{tensor}")).all():
                    raise AAACError(f"{name}: {stem}_{tensor} holds NaN or Inf values")
            # Each expert's tensors -> the layout of this device's kernels (docs/kernels.md), stacked by expert.
            per_expert = [
                prepare(*(getattr(layer, f"{stem}_{t}").data[e] for t in TENSORS))
                for e in range(getattr(layer, f"{stem}_qweight").shape[0])
            ]
            for i, tensor in enumerate(TENSORS):
                delattr(layer, f"{stem}_{tensor}")
                stacked = torch.stack([layout[i] for layout in per_expert])
                layer.register_parameter(f"{stem}_{tensor}", torch.nn.Parameter(stacked, requires_grad=False))

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> FusedMoEQuantConfig | None:
        return None  # no vLLM kernel reads it: the experts run through aaac::routed_experts

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return torch.ops.aaac.routed_experts(
            x,
            topk_weights,
            topk_ids,
            *(getattr(layer, f"w13_{t}") for t in TENSORS),
            *(getattr(layer, f"w2_{t}") for t in TENSORS),
            layer.aaac_intermediate,
            layer.expert_map,
            layer.apply_router_weight_on_input,
        )

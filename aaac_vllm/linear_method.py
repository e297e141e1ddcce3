"""``AAACLinearMethod``: parameters, loading (merged layers, tensor-parallel shards) and the forward pass."""

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import BasevLLMParameter, GroupQuantScaleParameter, PackedvLLMParameter

from aaac_kernels import linear as aaac_linear  # registers torch.ops.aaac.linear
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.layout import CODEBOOK_SIZE, NUM_CODEBOOKS, PACK_FACTOR
from aaac_kernels.format.serving import prepare

logger = init_logger(__name__)


def cpu_kernel_path(model: torch.nn.Module) -> str:
    """The AAAC CPU kernels a worker runs (``amx_bf16``, ``avx2``, ..., ``torch``), for
    ``LLM.apply_model(cpu_kernel_path)``: vLLM pickles the function, so it lives at module level."""
    return aaac_linear.cpu_kernel_path()


class CodebookParameter(BasevLLMParameter):
    """Codebooks [parts, 2, 16]: one pair per logical matrix of a merged layer (q, k, v or gate, up).

    Codebooks are per layer, not per column, so every tensor-parallel rank keeps
    the whole pair of each part.
    """

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load_part(0, loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load_part(0, loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_part(self._shard_id_as_int(kwargs["shard_id"]), loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_part(self._shard_id_as_int(kwargs["shard_id"]), loaded_weight)

    def _load_part(self, part: int, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape != self.data.shape[1:]:
            raise AAACError(f"codebooks of shape {list(loaded_weight.shape)}, expected {list(self.data.shape[1:])}")
        self.data[part].copy_(loaded_weight)


@register_weight_loader_v2_supported_method
class AAACLinearMethod(LinearMethodBase):
    """Linear method for AAAC checkpoints: 4-bit codebook indices, signed fp16 group scales, two codebooks."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        group_size = self.group_size
        if input_size_per_partition % group_size:
            raise AAACError(
                f"{getattr(layer, 'prefix', 'a linear layer')}: {input_size} input features split over tensor-parallel "
                f"ranks gives {input_size_per_partition} per rank, which cuts a group of {group_size}; "
                f"use a tensor-parallel size that divides {input_size // group_size}"
            )
        weight_loader = extra_weight_attrs["weight_loader"]
        output_size_per_partition = sum(output_partition_sizes)
        qweight = PackedvLLMParameter(
            data=torch.empty(input_size_per_partition // PACK_FACTOR, output_size_per_partition, dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            packed_factor=PACK_FACTOR,
            weight_loader=weight_loader,
        )
        scales = GroupQuantScaleParameter(
            data=torch.empty(input_size_per_partition // group_size, output_size_per_partition, dtype=torch.float16),
            input_dim=0,
            output_dim=1,
            weight_loader=weight_loader,
        )
        codebooks = CodebookParameter(
            data=torch.empty(len(output_partition_sizes), NUM_CODEBOOKS, CODEBOOK_SIZE, dtype=torch.float16),
            weight_loader=weight_loader,
        )
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("scales", scales)
        layer.register_parameter("codebooks", codebooks)
        layer.aaac_part_sizes = list(output_partition_sizes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        name = getattr(layer, "prefix", "layer")
        if not torch.isfinite(layer.codebooks).all():
            raise AAACError(f"{name}.codebooks holds NaN or Inf values")
        if not torch.isfinite(layer.scales).all():
            raise AAACError(f"{name}.scales holds NaN or Inf values")
        if layer.qweight.device.type == "cpu":
            logger.info_once("AAAC CPU kernels: %s (AAAC_CPU_ISA forces a path)", aaac_linear.cpu_kernel_path())
        # The layout of this device's kernels (docs/kernels.md) replaces the checkpoint's tensors.
        layout = prepare(layer.qweight.data, layer.scales.data, layer.codebooks.data)
        del layer.qweight, layer.scales, layer.codebooks
        for key, value in zip(("qweight", "scales", "codebooks"), layout):
            layer.register_parameter(key, torch.nn.Parameter(value, requires_grad=False))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.aaac.linear(x, layer.qweight, layer.scales, layer.codebooks, layer.aaac_part_sizes, bias)

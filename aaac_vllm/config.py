"""``AAACConfig``: the ``aaac`` quantization method as vLLM sees it."""

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

from aaac_kernels.format.config import check_quant_config
from aaac_kernels.format.verify import verify_checkpoint

from .linear_method import AAACLinearMethod
from .moe_method import AAACMoEMethod


@register_quantization_config("aaac")
class AAACConfig(QuantizationConfig):
    """Reads ``quantization_config`` of an AAAC checkpoint (docs/format.md) and hands out the linear method
    and, for mixture-of-experts layers, the experts' method."""

    def __init__(self, group_size: int, modules_to_not_convert: list[str]) -> None:
        super().__init__()
        self.group_size = group_size
        self.modules_to_not_convert = modules_to_not_convert

    def __repr__(self) -> str:
        return f"AAACConfig(group_size={self.group_size}, modules_to_not_convert={self.modules_to_not_convert})"

    @classmethod
    def get_name(cls) -> str:
        return "aaac"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Ampere: bf16 tensor-core dots; the Triton kernels are compiled and checked for sm_80 and sm_90.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AAACConfig":
        check_quant_config(config, "config.json")
        return cls(config["group_size"], list(config.get("modules_to_not_convert", [])))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        skip = self.modules_to_not_convert
        skipped = is_layer_skipped(prefix, skip, self.packed_modules_mapping, match_mode="suffix")
        if isinstance(layer, RoutedExperts):  # a mixture-of-experts layer's experts
            return None if skipped else AAACMoEMethod(self.group_size, layer.moe_config)
        if not isinstance(layer, LinearBase):
            return None  # embeddings and lm_head stay in the model dtype
        return UnquantizedLinearMethod() if skipped else AAACLinearMethod(self.group_size)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        # Runs in the front-end process before any worker starts: a damaged or inconsistent local
        # checkpoint is refused here with the file and tensor named, not by an assert deep in a worker.
        if Path(model_name).is_dir():
            verify_checkpoint(Path(model_name), self.group_size)

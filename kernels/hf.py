"""AAAC checkpoints in transformers, kept packed.

``import aaac_kernels.hf`` registers the ``aaac`` quantization method with transformers (its public
``register_quantization_config`` / ``register_quantizer``). After that,
``AutoModelForCausalLM.from_pretrained(aaac_checkpoint)`` loads every quantized linear (each expert's
too, as ``aaac_kernels.experts`` unfuses them) as an ``AAACLinear`` that keeps the checkpoint's 4-bit
tensors, turns them into the layout of its device's kernels once the weights are loaded, and computes
through ``torch.ops.aaac.linear``: the same op and kernels as in vLLM, with no dense copy of the weight kept.
The layout is made for the device the model is loaded on (``device_map``); moving the model afterwards is
not supported. Such a model runs inference; it cannot be trained or saved again.
"""

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import linear  # noqa: F401  registers torch.ops.aaac.linear
from .experts import has_fused_experts, unfuse_experts
from .format.config import QUANT_METHOD, check_quant_config
from .format.experts import naming_for
from .format.layout import BITS, CODEBOOK_SIZE, FORMAT_VERSION, NUM_CODEBOOKS, PACK_FACTOR
from .format.serving import prepare


@register_quantization_config(QUANT_METHOD)
class AAACTransformersConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an AAAC checkpoint (docs/format.md), checked as the vLLM backend does."""

    def __init__(
        self,
        group_size: int,
        modules_to_not_convert: list[str] | None = None,
        bits: int = BITS,
        num_codebooks: int = NUM_CODEBOOKS,
        codebook_size: int = CODEBOOK_SIZE,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.format_version = bits, group_size, format_version
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        check_quant_config(self.to_dict(), "quantization_config")


class AAACLinear(nn.Module):
    """A linear layer in the AAAC format: ``qweight``, ``scales`` and ``codebooks`` as the checkpoint
    stores them until ``prepare`` replaces them with the layout of their device's kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, device, dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(
            torch.empty(in_features // PACK_FACTOR, out_features, dtype=torch.int32, device=device), False
        )
        self.scales = nn.Parameter(
            torch.empty(in_features // group_size, out_features, dtype=torch.float16, device=device), False
        )
        self.codebooks = nn.Parameter(
            torch.empty(NUM_CODEBOOKS, CODEBOOK_SIZE, dtype=torch.float16, device=device), False
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None
        self.prepared = False

    def prepare(self) -> None:
        """Checkpoint tensors -> the kernels' layout (docs/kernels.md), which replaces them."""
        layout = prepare(self.qweight.data, self.scales.data, self.codebooks.data.unsqueeze(0))
        del self.qweight, self.scales, self.codebooks
        for name, tensor in zip(("qweight", "scales", "codebooks"), layout):
            self.register_buffer(name, tensor, persistent=False)
        self.prepared = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepared:
            raise RuntimeError("AAACLinear.prepare() was not called after its tensors were loaded")
        return torch.ops.aaac.linear(x, self.qweight, self.scales, self.codebooks, [self.out_features], self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _skipped(name: str, modules_to_not_convert: list[str]) -> bool:
    """As vLLM matches ``modules_to_not_convert``: a full name or a trailing dotted component."""
    return any(name == skip or name.endswith(f".{skip}") for skip in modules_to_not_convert)


@register_quantizer(QUANT_METHOD)
class AAACHfQuantizer(HfQuantizer):
    """Loads pre-quantized AAAC checkpoints (``aaac-quantize`` makes them); it does not quantize."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        pass

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        config = self.quantization_config

        def aaac_linear(in_features: int, out_features: int, device, dtype) -> AAACLinear:
            return AAACLinear(in_features, out_features, False, config.group_size, device, dtype)

        # Fused experts become one AAACLinear per expert and part, as the checkpoint stores them.
        unfuse_experts(model, naming_for(model.config.model_type, has_fused_experts(model)), aaac_linear)
        linears = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not _skipped(name, config.modules_to_not_convert)
        ]
        for name, module in linears:
            parent, _, child = name.rpartition(".")
            replacement = AAACLinear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                config.group_size,
                module.weight.device,
                module.weight.dtype,
            )
            setattr(model.get_submodule(parent) if parent else model, child, replacement)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> None:
        for module in model.modules():
            if isinstance(module, AAACLinear):
                module.prepare()
        # transformers loads a pre-quantized checkpoint's renamed tensors (Mixtral's block_sparse_moe.* ->
        # mlp.*) in their stored dtype; the unquantized ones among them (the router) take the model's.
        dtype = model.config.dtype
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False

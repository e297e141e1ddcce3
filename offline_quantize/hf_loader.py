"""Run a checkpoint in transformers: a plain one as it is, an AAAC one packed, an AWQ-format one made dense.

``load_causal_lm`` is what ``aaac-eval`` runs: an AAAC checkpoint loads through ``aaac_kernels.hf``
(its 4-bit tensors kept, every quantized linear computed by ``torch.ops.aaac.linear``, as in vLLM).
``load_reference`` is the ground truth every faster path is tested against: every quantized linear gets
the dense weight ``aaac_kernels.format.reference.dequantize`` defines. AWQ-format checkpoints (the
uniform-grid baselines) get the dense weight ``aaac_kernels.format.awq.dequantize`` defines in both, so
comparing methods needs neither AutoAWQ nor a GPU.
"""

from pathlib import Path

import torch
from torch import nn

from aaac_kernels.experts import has_fused_experts, unfuse_experts
from aaac_kernels.format import awq as awq_format
from aaac_kernels.format.config import read_quant_config
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.experts import naming_for
from aaac_kernels.format.files import read_tensors
from aaac_kernels.format.manifest import verify_manifest
from aaac_kernels.format.reference import dequantize
from aaac_kernels.format.verify import verify_checkpoint

from .source import check_remote_code


def load_causal_lm(
    path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> nn.Module:
    """The model at ``path`` for inference, after the checks a loader makes (docs/reliability.md)."""
    path = Path(path)
    config_json, quant = read_quant_config(path)
    if not quant:
        return load_reference(path, dtype, device, trust_remote_code)
    check_remote_code(path, config_json, trust_remote_code)
    verify_checkpoint(path, quant["group_size"])  # names the damaged file or tensor before any work is done
    import aaac_kernels.hf  # noqa: F401  registers the aaac method with transformers

    return _from_pretrained(path, dtype, device, trust_remote_code)


def load_reference(
    path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
) -> nn.Module:
    """The model at ``path`` with every quantized linear made dense by its format's reference dequantizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config_json, quant = read_quant_config(path)
    check_remote_code(path, config_json, trust_remote_code)
    awq = config_json.get("quantization_config", {}).get("quant_method") == "awq"
    if not quant and not awq:
        return _from_pretrained(path, dtype, device, trust_remote_code)

    if awq:
        verify_manifest(path)
    else:
        verify_checkpoint(path, quant["group_size"])  # names the damaged file or tensor before any work is done
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are made dense here, with no quantization library
    # Parameters on the meta device (no random init of weights about to be replaced); buffers such as
    # rotary tables stay real.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    # Experts as the checkpoint stores them: one dense linear per expert and part.
    naming = naming_for(config.model_type, has_fused_experts(model))
    unfuse_experts(model, naming)
    stored = dense_state_dict(path, None if awq else quant["group_size"], dtype)
    state = {naming.model_name(name): tensor for name, tensor in stored.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise AAACError(f"{path}: tensors the model does not have: {', '.join(result.unexpected_keys[:3])}")
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise AAACError(f"{path}: tensors missing from the checkpoint: {', '.join(missing[:3])}")
    return model.to(device).eval()


def _from_pretrained(path: Path, dtype: torch.dtype, device: str, trust_remote_code: bool) -> nn.Module:
    """A plain or AAAC checkpoint as transformers loads it (AAAC through ``aaac_kernels.hf``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.eval()


def dense_state_dict(path: Path, group_size: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every quantized layer replaced by a dense weight.

    AAAC layers are (qweight, scales, codebooks) triples at ``group_size``; with ``group_size`` None the
    layers are AWQ-format (qweight, qzeros, scales) triples, whose shapes carry the group size.
    """
    tensors = read_tensors(path)
    parts = (".scales", ".codebooks") if group_size else (".qzeros", ".scales")
    state = {}
    for key, tensor in tensors.items():
        if key.endswith(".qweight"):
            prefix = key[: -len(".qweight")]
            try:
                first, second = (tensors[f"{prefix}{part}"] for part in parts)
            except KeyError as exc:
                raise AAACError(f"{path}: tensor {exc.args[0]} is missing for quantized layer {prefix}") from None
            if group_size:
                state[f"{prefix}.weight"] = dequantize(tensor, first, second, group_size, dtype)
            else:
                state[f"{prefix}.weight"] = awq_format.dequantize(tensor, first, second, dtype)
        elif not key.endswith(parts):
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state

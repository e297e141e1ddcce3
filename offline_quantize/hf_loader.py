"""Run a checkpoint in transformers: a plain one as it is, an AAAC one through the reference dequantizer.

This is the ground-truth execution of an AAAC checkpoint: every quantized
linear gets the dense weight ``aaac_kernels.reference.dequantize`` defines.
"""

from pathlib import Path

import torch
from torch import nn

from aaac_kernels.reference import dequantize

from .checkpoint import read_quant_config, read_tensors, verify_checkpoint
from .errors import AAACError


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    _, quant = read_quant_config(path)
    if not quant:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, use_safetensors=True)
        return model.eval()

    verify_checkpoint(path, quant["group_size"])  # names the damaged file or tensor before any work is done
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers does not know "aaac"; the weights are made dense here
    # Parameters on the meta device (no random init of weights about to be replaced); buffers such as
    # rotary tables stay real.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dense_state_dict(path, quant["group_size"], dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise AAACError(f"{path}: tensors the model does not have: {', '.join(result.unexpected_keys[:3])}")
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise AAACError(f"{path}: tensors missing from the checkpoint: {', '.join(missing[:3])}")
    return model.to(device).eval()


def dense_state_dict(path: Path, group_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with every (qweight, scales, codebooks) triple replaced by a dense weight."""
    tensors = read_tensors(path)
    state = {}
    for key, tensor in tensors.items():
        if key.endswith(".qweight"):
            prefix = key[: -len(".qweight")]
            state[f"{prefix}.weight"] = dequantize(
                tensor, tensors[f"{prefix}.scales"], tensors[f"{prefix}.codebooks"], group_size, dtype
            )
        elif not key.endswith((".scales", ".codebooks")):
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state

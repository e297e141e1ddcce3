"""The source model: checks on the folder, and finding the decoder blocks and their linears (streaming.py loads it)."""

from pathlib import Path

import torch
from torch import nn

from aaac_kernels.format.config import read_config
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.experts import ROUTER_NAMES


def check_source(path: Path, trust_remote_code: bool = False) -> dict:
    """Validate an HF model folder with safetensors weights; return its config.json."""
    if not path.is_dir():
        if not path.exists() and _looks_like_a_hub_name(str(path)):
            raise AAACError(
                f"source model folder {path} does not exist; hub names are not downloaded (the quantizer reads "
                f"local folders): fetch it first, e.g. `huggingface-cli download {path} --local-dir DIR`, and pass DIR"
            )
        raise AAACError(f"source model folder {path} does not exist")
    config = read_config(path)
    check_remote_code(path, config, trust_remote_code)
    if not weight_files(path):
        raise AAACError(
            f"{path} has no safetensors weights (model.safetensors or model-*.safetensors); "
            "convert the model with save_pretrained(..., safe_serialization=True)"
        )
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "unknown")
        raise AAACError(
            f"{path / 'config.json'} describes a model already quantized with '{method}'; "
            "start from the unquantized model"
        )
    return config


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def check_remote_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    """Refuse a model whose config names its own Python code (``auto_map``) unless the user trusts it."""
    if config.get("auto_map") and not trust_remote_code:
        raise AAACError(
            f"{path / 'config.json'} names the model's own Python code (auto_map); "
            "pass --trust-remote-code to run it, if you trust it"
        )


def _looks_like_a_hub_name(text: str) -> bool:
    """``org/name`` as the Hugging Face hub spells repositories (not ./x, /x, x/y/z or a file name)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith(".") and "\\" not in text


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (model.layers, transformer.h, ... whatever the architecture calls it)."""
    count = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise AAACError(f"no list of {count} decoder blocks found in {type(model).__name__}")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside one decoder block but the routers of its experts, by its name relative to the block."""
    modules = dict(block.named_modules())
    return {
        name: module
        for name, module in modules.items()
        if isinstance(module, nn.Linear) and not _is_router(name, modules)
    }


def block_routers(block: nn.Module) -> dict[str, nn.Module]:
    """The routers of a block's experts (modules of their own or linears), by their names within the block."""
    modules = dict(block.named_modules())
    return {name: module for name, module in modules.items() if _is_router(name, modules)}


def unquantized_modules(model: nn.Module, linears: dict[str, nn.Linear]) -> list[str]:
    """The full names of the model's linears left out of ``linears`` and of its experts' routers (which
    transformers may hold as modules of their own): the checkpoint's ``modules_to_not_convert``."""
    modules = dict(model.named_modules())
    return sorted(
        name
        for name, module in modules.items()
        if (isinstance(module, nn.Linear) and name not in linears) or _is_router(name, modules)
    )


def _is_router(name: str, modules: dict[str, nn.Module]) -> bool:
    """A linear named as a router (format.experts.ROUTER_NAMES) beside an experts module."""
    parent, _, child = name.rpartition(".")
    return child in ROUTER_NAMES and f"{parent}.experts" in modules


def blocks_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise AAACError("decoder blocks are not a submodule of the model")


def check_linears(model: nn.Module, group_size: int) -> dict[str, nn.Linear]:
    """All quantizable linears by full name; errors name the layer at fault."""
    blocks = decoder_blocks(model)
    prefix = blocks_prefix(model, blocks)
    linears = {
        f"{prefix}.{i}.{name}": module
        for i, block in enumerate(blocks)
        for name, module in block_linears(block).items()
    }
    if not linears:
        raise AAACError(f"no quantizable linear layers found in the decoder blocks of {type(model).__name__}")
    for name, module in linears.items():
        k = module.in_features
        if k % group_size:
            fits = [g for g in (128, 64, 32) if k % g == 0]
            hint = f"use --group-size {fits[0]}" if fits else "no group size of 32 or more divides it"
            raise AAACError(f"layer {name}: in_features {k} is not divisible by group size {group_size}; {hint}")
    return linears


def check_finite(linears: dict[str, nn.Linear], prefix: str) -> None:
    """Refuse a block whose linears hold NaN or Inf, naming the first such layer."""
    for name, module in linears.items():
        if not torch.isfinite(module.weight).all():
            raise AAACError(f"layer {prefix}.{name}: weight contains NaN or Inf; the source checkpoint is damaged")

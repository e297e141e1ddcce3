"""The source model with its weights left in the safetensors shards until a step needs them.

The model is built from its config with every parameter on the meta device (buffers, such as the rotary
frequencies, are computed on the CPU as the model's own ``__init__`` computes them). ``load`` then reads
one module's tensors from the shards (memory-mapped reads of just those tensors) and ``release`` puts them
back on the meta device, so the pipeline holds one decoder block at a time, plus the input embedding while
it captures the first block's inputs: peak memory does not grow with the number of blocks.

A mixture-of-experts layer, which transformers holds as fused 3-D parameters, is replaced in the skeleton by
one linear per expert and part (``aaac_kernels.experts``), named as the shards store them, so the pipeline
quantizes experts as it does every other linear; ``stored_name`` maps a module's name to the name its
tensors have in the shards.

Weights are cast to the dtype ``from_pretrained(dtype="auto")`` would give them (config.json's ``dtype``,
else the checkpoint's first floating tensor), so each block holds the same values a fully loaded model
holds, and the quantizer writes the same bytes.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from aaac_kernels.experts import has_fused_experts, unfuse_experts
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.experts import naming_for

from . import source

_FLOATING = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class StreamedModel:
    """A causal LM skeleton (``module``) whose parameters live on the meta device until ``load``-ed."""

    def __init__(self, path: Path, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = path
        self.files = _tensor_files(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        dtype = config.dtype or self._first_floating_dtype()
        with _parameters_on_meta():
            self.module = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        self.module.eval()
        self.module.config.use_cache = False
        self.naming = naming_for(config.model_type, has_fused_experts(self.module))
        unfuse_experts(self.module, self.naming)
        self._skeleton: dict[tuple[int, str], torch.Tensor] = {}  # what load replaced, by (owner, attribute)

    def load(self, module: nn.Module) -> None:
        """Read ``module``'s parameters (and the persistent buffers the shards hold) from the shards."""
        prefix = self._name_of(module)
        by_file: dict[Path, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}
        for owner, attribute, local, tensor in _tensors(module):
            name = self.stored_name(f"{prefix}{local}")
            if name in self.files:
                by_file.setdefault(self.files[name], []).append((owner, attribute, name, tensor))
            elif attribute in owner._parameters:  # a buffer the shards lack keeps what __init__ computed
                missing = f"the model has a parameter {name}, but the safetensors files hold no such tensor"
                raise AAACError(f"{self.path}: {missing}")
        for file, entries in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for owner, attribute, name, skeleton in entries:
                    stored = f.get_tensor(name)
                    if stored.shape != skeleton.shape:
                        shapes = f"{list(stored.shape)}, the model expects {list(skeleton.shape)}"
                        raise AAACError(f"{file}: tensor {name} has shape {shapes}")
                    self._skeleton[(id(owner), attribute)] = skeleton
                    _set(owner, attribute, stored.to(skeleton.dtype))

    def stored_name(self, name: str) -> str:
        """A module's or tensor's name in the skeleton -> its name in the shards."""
        return self.naming.stored_name(name)

    def release(self, module: nn.Module) -> None:
        """Put back what ``load`` replaced under ``module`` (whatever was done to it since), freeing the memory."""
        for owner, attribute, _, _ in list(_tensors(module)):
            skeleton = self._skeleton.pop((id(owner), attribute), None)
            if skeleton is not None:
                _set(owner, attribute, skeleton)

    @contextmanager
    def loaded(self, modules: list[nn.Module]) -> Iterator[None]:
        for module in modules:
            self.load(module)
        try:
            yield
        finally:
            for module in modules:
                self.release(module)

    def outside_blocks(self, blocks: nn.ModuleList) -> list[nn.Module]:
        """The modules with parameters that are neither a decoder block nor the output embedding (which the
        calibration never reaches): the embeddings and norms the model runs before its first block."""
        head = self.module.get_output_embeddings()
        skipped = {id(blocks), id(head)}
        found: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if id(child) in skipped:
                    continue
                if any(True for _ in child.parameters(recurse=False)):
                    found.append(child)
                visit(child)

        if any(True for _ in self.module.parameters(recurse=False)):
            raise AAACError(f"{type(self.module).__name__} holds parameters of its own; streaming reads submodules")
        visit(self.module)
        return found

    def _name_of(self, module: nn.Module) -> str:
        for name, candidate in self.module.named_modules():
            if candidate is module:
                return f"{name}." if name else ""
        raise AAACError("module is not part of the streamed model")

    def _first_floating_dtype(self) -> torch.dtype:
        """What from_pretrained(dtype="auto") falls back to without a dtype in config.json."""
        with safe_open(str(source.weight_files(self.path)[0]), framework="pt") as f:
            for key in f.keys():
                dtype = _FLOATING.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
        return torch.float32


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the shard that holds it (every shard's header is read: an index may be stale)."""
    files = {}
    for file in source.weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), file))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise AAACError(f"{file}: cannot read safetensors header ({exc})") from None
    return files


def _tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owning module, attribute, name relative to ``module``, tensor) for every parameter and persistent
    buffer under ``module``."""
    for owner_name, owner in module.named_modules():
        dot = f"{owner_name}." if owner_name else ""
        for attribute, param in owner.named_parameters(recurse=False):
            yield owner, attribute, f"{dot}{attribute}", param
        for attribute, buffer in owner.named_buffers(recurse=False):
            if attribute not in owner._non_persistent_buffers_set:
                yield owner, attribute, f"{dot}{attribute}", buffer


def _set(owner: nn.Module, attribute: str, tensor: torch.Tensor) -> None:
    if attribute in owner._parameters:
        owner._parameters[attribute] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
    else:
        owner._buffers[attribute] = tensor


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the context moves to the meta device as it is registered (before
    any initialization runs on it); buffers stay on the CPU with the values ``__init__`` gives them."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a tied weight is registered again: keep it shared
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register

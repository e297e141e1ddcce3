"""The table of quantization methods, and what a method is: a name, its help, its flags, the checkpoint
format it writes, and ``quantize(weight, stats, options)`` for one linear layer.

A method registers itself with ``@register`` in its own module (``methods/<name>.py``); the CLI's
choices and flags, ``aaac-compare``'s list and the table in docs/method.md are read from ``METHODS``.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from aaac_kernels.format import awq as awq_format
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.layout import pack_indices
from aaac_kernels.format.reference import dequantize

from ..codebooks import CodebookOptions
from ..statistics import LinearStatistics

FORMATS = {"aaac": "vLLM `--quantization aaac`", "awq": "vLLM built-in `awq`"}  # format -> what serves it


@dataclass(frozen=True)
class Flag:
    """A switch of one method: ``--<name>`` on the command line, ``<label>`` in run labels (``aaac+awq``)."""

    name: str
    label: str
    help: str


@dataclass(frozen=True)
class LayerOptions:
    """What a method is told about the layer it quantizes, besides its weight and statistics."""

    name: str  # within its block, e.g. "self_attn.q_proj"
    group_size: int
    flags: frozenset[str] = frozenset()
    codebooks: CodebookOptions = field(default_factory=CodebookOptions)
    seed: int = 0


@dataclass
class QuantizedLinear:
    """One quantized linear: the tensors stored for it and the weight inference will compute from them."""

    tensors: dict[str, torch.Tensor]  # suffix ("qweight", "scales", ...) -> stored tensor
    dense: torch.Tensor  # [N, K] fp32: exactly what the format's dequantizer makes of ``tensors``
    details: dict = field(default_factory=dict)  # for the report


class Method(ABC):
    """One quantization method. Subclasses set the class attributes and implement ``quantize``."""

    name: ClassVar[str]
    help: ClassVar[str]
    format: ClassVar[str]  # a key of FORMATS
    flags: ClassVar[tuple[Flag, ...]] = ()
    # The flag sets aaac-compare runs, in order.
    compared: ClassVar[tuple[frozenset[str], ...]] = (frozenset(),)

    def needs_second_moment(self, flags: frozenset[str]) -> bool:
        """Whether ``quantize`` (or channel scaling) reads ``stats.second_moment``: a [K, K] matmul per batch."""
        return False

    def scales_channels(self, flags: frozenset[str]) -> bool:
        """Whether AWQ channel scaling runs on each block before its linears are quantized."""
        return False

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LinearStatistics, options: LayerOptions) -> QuantizedLinear:
        """weight [N, K] (fp32) -> its stored tensors and their dequantized weight."""


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls()
    return cls


@dataclass(frozen=True)
class MethodOptions:
    """A method and the flags a run turned on: ``MethodOptions("aaac", {"awq-scale"})``."""

    method: str = "aaac"
    flags: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "flags", frozenset(self.flags))

    def check(self) -> None:
        if self.method not in METHODS:
            raise AAACError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        own = {flag.name for flag in self.handler.flags}
        for name in sorted(self.flags - own):
            owners = [m.name for m in METHODS.values() if name in {f.name for f in m.flags}]
            if not owners:
                raise AAACError(f"unknown flag --{name}")
            raise AAACError(f"--{name} applies to --method {' or '.join(owners)}, not {self.method}")

    @property
    def handler(self) -> Method:
        return METHODS[self.method]

    @property
    def format(self) -> str:
        return self.handler.format

    @property
    def label(self) -> str:
        """``aaac``, ``aaac+awq``, ``gptq+act-order``: the method and its flags in declaration order."""
        return "+".join([self.method, *(f.label for f in self.handler.flags if f.name in self.flags)])

    @property
    def arguments(self) -> list[str]:
        """The aaac-quantize options that select this method and its flags."""
        return ["--method", self.method, *(f"--{f.name}" for f in self.handler.flags if f.name in self.flags)]

    @property
    def needs_second_moment(self) -> bool:
        return self.handler.needs_second_moment(self.flags)

    @property
    def scales_channels(self) -> bool:
        return self.handler.scales_channels(self.flags)


def compared_variants() -> list[MethodOptions]:
    """Every method with every flag set it names for aaac-compare, in registration order."""
    return [MethodOptions(method.name, flags) for method in METHODS.values() for flags in method.compared]


def markdown_table() -> str:
    """The methods table of docs/method.md (a test keeps the two equal)."""
    lines = ["| method | what it does | flags | format (served by) |", "|---|---|---|---|"]
    for method in METHODS.values():
        flags = "<br>".join(f"`--{f.name}`: {f.help}" for f in method.flags)
        lines.append(f"| `{method.name}` | {method.help} | {flags} | {method.format} ({FORMATS[method.format]}) |")
    return "\n".join(lines) + "\n"


def pack_codebook_layer(
    codes: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor, group_size: int
) -> QuantizedLinear:
    """AAAC format: codes uint8 [N, K], signed fp16 scales [N, K / G], codebooks [2, 16] -> a QuantizedLinear."""
    tensors = {"qweight": pack_indices(codes), "scales": scales.t().contiguous(), "codebooks": codebooks}
    dense = dequantize(tensors["qweight"], tensors["scales"], codebooks, group_size).float()
    details = {
        "codebook1_share": (tensors["scales"].view(torch.int16) < 0).float().mean().item(),
        "codebooks": codebooks.float().tolist(),
    }
    return QuantizedLinear(tensors, dense, details)


def pack_uniform_layer(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> QuantizedLinear:
    """AutoAWQ format: codes uint8 [N, K], scale and zero [N, K / G] -> a QuantizedLinear."""
    tensors = awq_format.pack(codes, scale, zero)
    dense = awq_format.dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], torch.float32)
    return QuantizedLinear(tensors, dense)

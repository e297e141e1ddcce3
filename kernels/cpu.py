"""The CPU side of ``aaac::linear``: the instruction-set choice of the C++ kernels, and the plain-torch
path that runs where they were not built. Both read ``aaac_kernels.format.serving.cpu_layout``.

The C++ extension ``aaac_kernels._C`` (kernels/csrc, built by ``pip install --no-build-isolation``)
registers the op's CPU kernel. It holds one path per instruction set and picks the fastest the CPU
reports; ``AAAC_CPU_ISA`` forces one (``scalar``, ``avx2``, ``avx512``, ``avx512_bf16``, ``amx_bf16``)
or, with ``torch``, the plain-torch path.
"""

import importlib
import os
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F

from .format.serving import cpu_nibble_order

ISA_VARIABLE = "AAAC_CPU_ISA"
TORCH_PATH = "torch"


def dequantize_torch(
    qbytes: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor, part_sizes: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype`` from the CPU layout, in plain torch: equal to the reference."""
    n, k = qbytes.shape[0], 2 * qbytes.shape[1]
    group = k // scales.shape[1]
    indices = torch.empty(n, k, dtype=torch.long)
    indices[:, cpu_nibble_order(k)] = torch.stack([qbytes & 0xF, qbytes >> 4], dim=2).view(n, k).long()
    bits = scales.view(torch.int16)
    part = torch.repeat_interleave(torch.arange(len(part_sizes)), torch.tensor(part_sizes))
    table = (2 * part[:, None] + (bits < 0)).repeat_interleave(group, dim=1)  # row of codebooks.view(-1, 16)
    magnitude = (bits & 0x7FFF).view(torch.float16).float().repeat_interleave(group, dim=1)
    values = codebooks.float().view(-1)[table * codebooks.shape[-1] + indices]
    return (values * magnitude).to(dtype)


def linear_torch(
    x: torch.Tensor,
    qbytes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    part_sizes: list[int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``aaac::linear`` on CPU without the C++ kernels: the dense weight rebuilt at every call."""
    return F.linear(x, dequantize_torch(qbytes, scales, codebooks, part_sizes, x.dtype), bias)


def load_native() -> ModuleType | None:
    """Import the C++ kernels (registering the op's CPU kernel) on the path ``AAAC_CPU_ISA`` names.

    Returns None, with a warning, where the extension was not built; None also when the variable asks
    for the torch path. An unknown or unsupported path is an error: it was asked for by name.
    """
    wanted = os.environ.get(ISA_VARIABLE, "").strip().lower()
    if wanted == TORCH_PATH:
        return None
    try:
        native = importlib.import_module(f"{__package__}._C")
    except ImportError as error:
        warnings.warn(
            f"aaac: the C++ CPU kernels are not built ({error}); aaac::linear runs its much slower torch path "
            f"on CPU. Reinstall with a C++ compiler and `pip install --no-build-isolation -e .` (README).",
            stacklevel=2,
        )
        return None
    if wanted:
        try:
            native.set_isa(wanted)
        except ValueError as error:
            raise ValueError(f"{ISA_VARIABLE}={wanted}: {error}") from None
    return native

"""The AAAC linear layer as a torch custom op, ``torch.ops.aaac.linear``.

One schema for every device, with a fake implementation so that torch.compile traces through the
op and CUDA graphs capture it. Each device runs its own kernels on a layout that ``prepare`` makes
once at load time:

* CUDA: the Triton kernels of ``triton_gemm``, on ``triton_gemm.prepare``'s layout;
* CPU: the C++ kernels of kernels/csrc (``cpu``), registered by the extension when it is built;
  where it is not, the plain-torch path ``cpu.linear_torch`` on the same layout.
"""

import torch

from . import cpu, triton_gemm

_LIBRARY = torch.library.Library("aaac", "FRAGMENT")
_LIBRARY.define(
    "linear(Tensor x, Tensor qweight, Tensor scales, Tensor codebooks, int[] part_sizes, Tensor? bias) -> Tensor"
)
_LIBRARY.impl("linear", triton_gemm.linear, "CUDA")
# The extension registers its own CPU kernel when it loads.
native = cpu.load_native()
if native is None:
    _LIBRARY.impl("linear", cpu.linear_torch, "CPU")


@torch.library.register_fake("aaac::linear")
def _(x, qweight, scales, codebooks, part_sizes, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def cpu_kernel_path() -> str:
    """What aaac::linear runs on CPU: a path of the C++ kernels (``amx_bf16``, ``avx2``, ...) or ``torch``."""
    return native.isa() if native is not None else cpu.TORCH_PATH


def prepare(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors (``codebooks`` [parts, 2, 16]) -> the layout of their device's kernels:
    the arguments ``qweight, scales, codebooks`` of ``aaac::linear``."""
    if qweight.device.type == "cuda":
        return triton_gemm.prepare(qweight, scales, codebooks)
    return cpu.prepare(qweight, scales, codebooks)

"""The AAAC linear layer as a torch custom op, ``torch.ops.aaac.linear``.

One schema for every device, with a fake implementation so that torch.compile traces through the
op and CUDA graphs capture it. Each device runs its own kernels on the layout that
``aaac_kernels.format.serving.prepare`` makes once at load time:

* CUDA: the Triton kernels of ``triton_gemm``;
* CPU: the C++ kernels of kernels/csrc (``cpu``), registered by the extension when it is built;
  where it is not, the plain-torch path ``cpu.linear_torch``.
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

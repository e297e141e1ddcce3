"""Builds the C++ CPU kernels (aaac_kernels._C) against the torch already installed.

Metadata lives in pyproject.toml; this file only adds the extension. Install with
``pip install --no-build-isolation -e .`` (the Makefile does) so that the build sees the installed
torch instead of pulling a second one into an isolated build environment. Without a C++ compiler the
package still installs: the build says so in one line, and aaac::linear runs its torch path on CPU.
"""

import os
import shutil
import sys

from setuptools import setup

SOURCES = [
    "ops.cpp",
    "kernel_scalar.cpp",
    "kernel_avx2.cpp",
    "kernel_avx512.cpp",
    "kernel_avx512_bf16.cpp",
    "kernel_amx.cpp",
    "nearest.cpp",
    "encode_avx2.cpp",
]


def _skip(reason: str) -> dict:
    print(
        f"aaac-vllm: not building the C++ CPU kernels ({reason}); aaac::linear will use its torch path on CPU",
        file=sys.stderr,
    )
    return {}


def _extension() -> dict:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return _skip(f"no C++ compiler: '{compiler}' is not on PATH; install g++ or set CXX")
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return _skip(
            "torch is not importable in the build environment; install torch first and use "
            "pip install --no-build-isolation"
        )
    # Each ISA's kernels select their own target with `#pragma GCC target`; the baseline stays generic
    # x86-64 so the library loads on any machine (no flag for the build machine's own CPU: build and
    # run machines differ).
    extension = CppExtension(
        "aaac_kernels._C",
        [os.path.join("kernels", "csrc", name) for name in SOURCES],
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":  # as setuptools' build backend runs it; tests import _extension
    setup(**_extension())

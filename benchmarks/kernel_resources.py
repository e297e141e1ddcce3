"""Compile the Triton kernels for NVIDIA GPUs (no GPU needed) and print their registers, spills and shared memory.

    python benchmarks/kernel_resources.py [--arch 80 90]

Every stored tile configuration of the fused kernel is compiled for each activation dtype and
both scale paths (a group as wide as the K tile or wider, and narrower groups), plus the dequantizer.
Triton's bundled ptxas does the compiling, so this runs on any Linux machine; a kernel that fails to
compile fails the run. Spilled registers (stack bytes) cost memory traffic on the hot path.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: the interpreter only runs on CPU tensors

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aaac_kernels import triton_gemm  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
PART_STARTS = (4096, 5120)  # a Llama-3-8B QKV layer: q 4096, k 1024, v 1024 columns
POINTERS = {"w_ptr": "*i32", "s_ptr": "*i16", "lut_ptr": "*fp32"}


def _resources(kernel, signature: dict, constants: dict, arch: int, num_warps: int, num_stages: int) -> dict:
    source = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    return {
        "registers": int(found["REG"]),
        "spill_bytes": int(found["STACK"]),
        "shared_bytes": compiled.metadata.shared,
    }


def fused_rows(arch: int):
    low = 1
    for high, config in triton_gemm.CONFIGS:
        rows = f"fused, M {low}-{high}" if high < float("inf") else f"fused, M >= {low}"
        low = int(high) + 1 if high < float("inf") else low
        split_k = config.split_k or 2  # 0 means "chosen per shape": compile the split path
        for dtype in ("fp16", "bf16"):
            for group_size in (128, 64):
                signature = {
                    "x_ptr": f"*{dtype}",
                    **POINTERS,
                    "out_ptr": "*fp32" if split_k > 1 else f"*{dtype}",
                    "M": "i32",
                    "N": "i32",
                    "K": "i32",
                    "stride_xm": "i32",
                }
                constants = dict(
                    GROUP_SIZE=group_size,
                    PART_STARTS=PART_STARTS,
                    BLOCK_M=config.block_m,
                    BLOCK_N=config.block_n,
                    BLOCK_K=config.block_k,
                    SPLIT_K=split_k,
                    GROUP_M=config.group_m,
                    EVEN_K=True,
                    DOT_PRECISION="tf32",
                )
                tiles = f"{config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}"
                yield (
                    rows,
                    tiles,
                    f"split {split_k}",
                    dtype,
                    group_size,
                    _resources(
                        triton_gemm._gemm_kernel, signature, constants, arch, config.num_warps, config.num_stages
                    ),
                )


def dequant_rows(arch: int):
    for dtype in ("fp16", "bf16"):
        signature = {**POINTERS, "out_ptr": f"*{dtype}", "N": "i32", "K": "i32"}
        constants = dict(
            GROUP_SIZE=128,
            PART_STARTS=PART_STARTS,
            BLOCK_N=triton_gemm.DEQUANT_BLOCK_N,
            BLOCK_K=triton_gemm.DEQUANT_BLOCK_K,
        )
        tiles = f"{triton_gemm.DEQUANT_BLOCK_N}x{triton_gemm.DEQUANT_BLOCK_K} w4"
        yield (
            "dequantize",
            tiles,
            "",
            dtype,
            128,
            _resources(triton_gemm._dequant_kernel, signature, constants, arch, 4, 1),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 A100, 90 H100)")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}")
    print(
        "| sm | kernel | tiles (MxNxK, warps, stages) | split-K | act | group | registers | spill bytes | shared KiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        for name, tiles, split, dtype, group_size, used in (*fused_rows(arch), *dequant_rows(arch)):
            print(
                f"| {arch} | {name} | {tiles} | {split} | {dtype} | {group_size} | {used['registers']} "
                f"| {used['spill_bytes']} | {used['shared_bytes'] / 1024:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the Triton kernels for NVIDIA GPUs (no GPU needed): registers, spills, shared memory, and
what the decode kernels' main loop issues per weight.

    python benchmarks/kernel_resources.py [--arch 80 90] [--json]

Every kernel the ops launch (the GEMV for each M it takes, every stored GEMM configuration, the
dequantizer; the grouped experts kernel for gate_up and down with each GEMM configuration) is compiled
with the signature of a real call: bf16 and fp16 activations, group sizes 128 and 64, a Llama-3-8B QKV
layer (three parts) or a Mixtral expert's gate_up (two), and the divisibility-by-16 attributes that
Triton gives real shapes' pointers and sizes. Triton's bundled ``ptxas`` and ``cuobjdump`` do the work, so this runs
on any Linux machine; a kernel that fails to compile fails the run.

For the GEMV and the GEMMs it also reads the SASS of the main loop (the largest backward
branch): instructions per weight (warp instructions: one instruction of a warp handles 32 lanes),
shuffles per weight, barriers and shared-memory stores inside the loop, and the widest global load.
docs/kernels.md explains what these counts predict and what the GPU measured.
"""

import argparse
import json
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

from aaac_kernels import triton_experts, triton_gemm  # noqa: E402
from aaac_kernels.format.serving import cuda_block  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
PART_STARTS = (4096, 5120)  # a Llama-3-8B QKV layer: q 4096, k 1024, v 1024 columns
LAYER = {"w_ptr": "*i32", "s_ptr": "*i16", "cb_ptr": "*fp32"}
SPLIT = {"part_ptr": "*fp32", "count_ptr": "*i32"}
# Arguments a real call passes that Triton specializes as multiples of 16 (pointers from torch's
# allocator; N, K, strides of Llama shapes).
DIVISIBLE = ("x_ptr", "w_ptr", "s_ptr", "cb_ptr", "out_ptr", "part_ptr", "count_ptr", "M", "N", "K")
DIVISIBLE = (*DIVISIBLE, "slot_pairs_ptr", "block_experts_ptr")
DIVISIBLE_STRIDES = ("stride_xm", "stride_wn", "stride_om", "stride_we", "stride_se", "stride_sn")


def _product_signature(dtype: str, sizes: tuple[str, ...]) -> dict:
    """The argument types of the GEMV and the GEMM (the GEMV takes M as a compile-time constant)."""
    return {
        "x_ptr": f"*{dtype}",
        **LAYER,
        "out_ptr": f"*{dtype}",
        **SPLIT,
        **dict.fromkeys(sizes, "i32"),
        "stride_xm": "i32",
        "stride_wn": "i32",
        "stride_sn": "i32",
    }


def _compile(kernel, signature: dict, constants: dict, num_warps: int, num_stages: int, arch: int):
    attrs = {
        (kernel.arg_names.index(name),): [["tt.divisibility", 16]]
        for name in (*DIVISIBLE, *DIVISIBLE_STRIDES)
        if name in signature
    }
    source = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants, attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def _cuobjdump(compiled, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([CUOBJDUMP, flag, cubin.name], capture_output=True, text=True, check=True).stdout


def resources(compiled) -> dict:
    found = dict(re.findall(r"(REG|STACK):(\d+)", _cuobjdump(compiled, "-res-usage")))
    return {
        "registers": int(found["REG"]),
        "spill_bytes": int(found["STACK"]),
        "shared_bytes": compiled.metadata.shared,
    }


def main_loop(sass: str) -> list[str]:
    """The opcodes of the largest loop body: the instructions between a backward branch and its target."""
    code = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)
    lines = [(int(address, 16), text) for address, text in code]
    best: list[str] = []
    for address, text in lines:
        branch = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            body = [t for a, t in lines if int(branch.group(1), 16) <= a <= address]
            best = max(best, body, key=len)
    return [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for text in best]


def loop_counts(compiled, weights_per_iteration: int, threads: int) -> dict:
    """Warp instructions per weight in the main loop, and what the issue's static check looks at."""
    opcodes = main_loop(_cuobjdump(compiled, "-sass"))
    per_weight = threads / 32 / weights_per_iteration
    count = lambda prefix: sum(op.split(".")[0] == prefix for op in opcodes)  # noqa: E731
    widths = [int(w) for op in opcodes if op.startswith("LDG") for w in re.findall(r"\.(64|128)\b", op)]
    return {
        "instructions_per_weight": round(len(opcodes) * per_weight, 4),
        "shuffles_per_weight": round(count("SHFL") * per_weight, 4),
        "barriers": count("BAR"),
        "shared_stores": count("STS") + count("STSM"),
        "widest_global_load_bits": max(widths, default=32),
    }


def gemv_rows(arch: int, dtypes=("bf16", "fp16"), group_sizes=(128, 64)):
    for rows in range(1, triton_gemm.GEMV_MAX_M + 1):
        for dtype in dtypes:
            for group_size in group_sizes:
                config = triton_gemm._narrow_step(triton_gemm.pick_gemv_config(rows), group_size)
                signature = _product_signature(dtype, sizes=("N", "K"))
                constants = dict(
                    ROWS=rows,
                    GROUP_SIZE=group_size,
                    BLOCK_WORDS=cuda_block(group_size) // 8,
                    PART_STARTS=PART_STARTS,
                    LOOKUP="shfl",
                    BLOCK_N=config.block_n,
                    BLOCK_K=config.block_k,
                    SPLIT_K=1,
                    EVEN_K=True,
                )
                compiled = _compile(
                    triton_gemm._gemv_kernel, signature, constants, config.num_warps, config.num_stages, arch
                )
                loop = loop_counts(compiled, config.block_n * config.block_k, 32 * config.num_warps)
                yield f"gemv, M = {rows}", _tiles(config), dtype, group_size, resources(compiled), loop


def _compile_dot(kernel, signature: dict, constants: dict, config, group_size: int, part_starts, arch: int):
    """A kernel that runs ``triton_gemm._dot_steps`` compiled with a tile configuration (the constants of
    ``triton_gemm.dot_options`` on a real call) plus its own ``constants``, and its main loop's counts."""
    constants = dict(
        constants,
        GROUP_SIZE=group_size,
        BLOCK_WORDS=cuda_block(group_size) // 8,
        PART_STARTS=part_starts,
        LOOKUP="shfl",
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        EVEN_K=True,
        DOT_PRECISION="tf32",
    )
    compiled = _compile(kernel, signature, constants, config.num_warps, config.num_stages, arch)
    return compiled, loop_counts(compiled, config.block_n * config.block_k, 32 * config.num_warps)


def gemm_rows(arch: int, dtypes=("bf16", "fp16"), group_sizes=(128, 64)):
    low = triton_gemm.GEMV_MAX_M + 1
    for high, config in triton_gemm.GEMM_CONFIGS:
        name = f"gemm, M {low}-{high}" if high < float("inf") else f"gemm, M >= {low}"
        low = int(high) + 1 if high < float("inf") else low
        split_k = config.split_k or 2  # 0 means "chosen per shape": compile the split path
        for dtype in dtypes:
            for group_size in group_sizes:
                signature = _product_signature(dtype, sizes=("M", "N", "K"))
                constants = dict(SPLIT_K=split_k, GROUP_M=config.group_m)
                compiled, loop = _compile_dot(
                    triton_gemm._gemm_kernel, signature, constants, config, group_size, PART_STARTS, arch
                )
                yield name, _tiles(config, split_k), dtype, group_size, resources(compiled), loop


def dequant_rows(arch: int, dtypes=("bf16", "fp16")):
    for dtype in dtypes:
        signature = {**LAYER, "out_ptr": f"*{dtype}", "N": "i32", "K": "i32", "first_n": "i32"}
        signature |= {"stride_wn": "i32", "stride_sn": "i32"}
        constants = dict(
            GROUP_SIZE=128,
            BLOCK_WORDS=cuda_block(128) // 8,
            PART_STARTS=PART_STARTS,
            LOOKUP="shfl",
            BLOCK_N=triton_gemm.DEQUANT_BLOCK_N,
            BLOCK_K=min(triton_gemm.DEQUANT_BLOCK_K, cuda_block(128)),
        )
        compiled = _compile(triton_gemm._dequant_kernel, signature, constants, 4, 1, arch)
        tiles = f"{triton_gemm.DEQUANT_BLOCK_N}x{constants['BLOCK_K']} w4"
        yield "dequantize", tiles, dtype, 128, resources(compiled), None


def experts_rows(arch: int, dtypes=("bf16", "fp16"), group_sizes=(128, 64)):
    """The grouped kernel of ``aaac::routed_experts`` (gate_up: rows gathered by token; down: rows written
    back to their pairs) with each stored GEMM configuration, on a Mixtral-8x7B expert's gate_up shape."""
    for _, config in triton_gemm.GEMM_CONFIGS:
        for x_by_token, part_starts in ((True, (14336,)), (False, ())):
            name = f"experts {'gate_up' if x_by_token else 'down'}, {config.block_m}-row blocks"
            for dtype in dtypes:
                for group_size in group_sizes:
                    signature = {
                        "x_ptr": f"*{dtype}",
                        **LAYER,
                        "out_ptr": f"*{dtype}",
                        "slot_pairs_ptr": "*i32",
                        "block_experts_ptr": "*i32",
                        **dict.fromkeys(("N", "K", "PAIRS", "EXPERTS", "stride_xm", "stride_om"), "i32"),
                        **dict.fromkeys(("stride_we", "stride_wn", "stride_se", "stride_sn", "stride_ce"), "i32"),
                    }
                    constants = dict(X_BY_TOKEN=x_by_token, TOP_K=2)
                    compiled, loop = _compile_dot(
                        triton_experts._experts_kernel, signature, constants, config, group_size, part_starts, arch
                    )
                    yield name, _tiles(config), dtype, group_size, resources(compiled), loop


def _tiles(config: triton_gemm.TileConfig, split_k: int | None = None) -> str:
    m = f"{config.block_m}x" if config.block_m else ""
    split = f", split {split_k}" if split_k and split_k > 1 else ""
    return f"{m}{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}{split}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 A100, 90 H100)")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead of a table")
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16"], default=["bf16", "fp16"])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[128, 64])
    args = parser.parse_args(argv)
    if not args.json:
        print(f"triton {triton.__version__}")
        print(
            "| sm | kernel | tiles | act | group | registers | spill bytes | shared KiB "
            "| loop instr / weight | SHFL / weight | BAR, STS in loop | widest LDG |"
        )
        print("|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    for arch in args.arch:
        kernels = (
            *gemv_rows(arch, args.dtypes, args.group_sizes),
            *gemm_rows(arch, args.dtypes, args.group_sizes),
            *dequant_rows(arch, args.dtypes),
            *experts_rows(arch, args.dtypes, args.group_sizes),
        )
        for name, tiles, dtype, group_size, used, loop in kernels:
            if args.json:
                row = dict(arch=arch, kernel=name, tiles=tiles, dtype=dtype, group_size=group_size, **used)
                print(json.dumps(row | (loop or {})), flush=True)
                continue
            counts = (
                f"{loop['instructions_per_weight']:.3f} | {loop['shuffles_per_weight']:.3f} "
                f"| {loop['barriers']}, {loop['shared_stores']} | {loop['widest_global_load_bits']}"
                if loop
                else "| | |"
            )
            print(
                f"| {arch} | {name} | {tiles} | {dtype} | {group_size} | {used['registers']} "
                f"| {used['spill_bytes']} | {used['shared_bytes'] / 1024:.1f} | {counts} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

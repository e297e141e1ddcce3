"""AAAC kernels against cuBLAS bf16 on Llama-3 linear shapes, side by side in one run (needs an NVIDIA GPU).

    python benchmarks/kernels.py [--models 8b 70b] [--m 1 2 4 ...] [--group-size 128] [--docs docs/benchmarks.md]

For every shape (q/k/v merged, o, gate/up merged, down) and batch size M it times, with CUDA graphs
(as vLLM decodes) and Triton's ``do_bench_cudagraph``:
  bf16       torch.matmul on a bf16 weight (cuBLAS);
  aaac op    torch.ops.aaac.linear as vLLM calls it (fused kernel, or dequantize + cuBLAS from M = 256);
  fused      the fused dequant-GEMM kernel alone, at every M;
  deq+mm     the Triton dequantizer followed by cuBLAS, at every M;
and prints each as a speed-up over bf16 (bf16 time / its time), plus the weight bandwidth the op
reaches. Every kernel is first checked against dequantize + matmul on the same inputs. The table,
the GPU and the versions replace the kernel section of ``--docs``.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

from aaac_kernels import triton_gemm
from aaac_kernels.format.layout import encode_scales
from aaac_kernels.format.serving import prepare

# (hidden, intermediate, attention heads, KV heads, head dim)
MODELS = {"8b": (4096, 14336, 32, 8, 128), "70b": (8192, 28672, 64, 8, 128)}
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
BEGIN, END = "<!-- kernel-benchmark:begin -->", "<!-- kernel-benchmark:end -->"


def layer_shapes(model: str) -> list[tuple[str, list[int], int]]:
    """(name, output part sizes, in_features) of the four linear layers of a decoder block."""
    hidden, intermediate, heads, kv_heads, head_dim = MODELS[model]
    return [
        ("qkv", [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], hidden),
        ("o", [hidden], heads * head_dim),
        ("gate_up", [intermediate, intermediate], hidden),
        ("down", [hidden], intermediate),
    ]


def random_layer(parts: list[int], k: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """A layer in the ``prepare`` layout with random indices, scales, codebook choices and codebooks."""
    n = sum(parts)
    qweight = torch.randint(-(2**31), 2**31, (k // 8, n), dtype=torch.int32, device="cuda")
    magnitude = torch.rand(k // group_size, n, device="cuda") * 0.02
    scales = encode_scales(magnitude, torch.rand_like(magnitude) < 0.5)
    codebooks = torch.randn(len(parts), 2, 16, device="cuda").sort(dim=-1).values.half()
    return prepare(qweight, scales, codebooks)


def timed(fn) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def measure(parts: list[int], k: int, m_values: list[int], group_size: int) -> list[dict]:
    n = sum(parts)
    layout = random_layer(parts, k, group_size)
    dense = triton_gemm.dequantize(*layout, parts, torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    fused = triton_gemm.gemm
    rows = []
    for m in m_values:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = x @ dense.t()
        for name, got in (("op", torch.ops.aaac.linear(x, *layout, parts, None)), ("fused", fused(x, *layout, parts))):
            torch.testing.assert_close(
                got, want, rtol=2e-2, atol=2e-2, msg=lambda msg: f"{name} M={m} N={n} K={k}: {msg}"
            )
        times = {
            "bf16": timed(lambda: x @ weight.t()),
            "op": timed(lambda: torch.ops.aaac.linear(x, *layout, parts, None)),
            "fused": timed(lambda: fused(x, *layout, parts)),
            "deq+mm": timed(lambda: x @ triton_gemm.dequantize(*layout, parts, torch.bfloat16).t()),
        }
        weight_bytes = sum(t.numel() * t.element_size() for t in layout)
        rows.append({"m": m, "n": n, "k": k, **times, "op_gb_s": weight_bytes / times["op"] / 1e6})
    return rows


def table(results: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| layer | N × K | M | bf16 µs | aaac op µs | op speed-up | fused speed-up | deq+mm speed-up "
        "| op weight GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer, rows in results.items():
        for r in rows:
            lines.append(
                f"| {layer} | {r['n']} × {r['k']} | {r['m']} | {r['bf16'] * 1e3:.1f} | {r['op'] * 1e3:.1f} "
                f"| {r['bf16'] / r['op']:.2f}x | {r['bf16'] / r['fused']:.2f}x | {r['bf16'] / r['deq+mm']:.2f}x "
                f"| {r['op_gb_s']:.0f} |"
            )
    return lines


def summary(results: dict[str, list[dict]]) -> list[str]:
    """Geometric-mean speed-ups of the op over bf16 by M: the issue's targets are >= 3.0x for M <= 16 and
    >= 0.9x at M = 2048."""
    by_m: dict[int, list[float]] = {}
    for rows in results.values():
        for r in rows:
            by_m.setdefault(r["m"], []).append(r["bf16"] / r["op"])
    lines = ["| M | op speed-up over bf16 (geometric mean of the layers) |", "|---:|---:|"]
    for m, speedups in sorted(by_m.items()):
        mean = torch.tensor(speedups).log().mean().exp().item()
        lines.append(f"| {m} | {mean:.2f}x |")
    return lines


def write_docs(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["8b", "70b"])
    parser.add_argument("--m", type=int, nargs="+", default=M_VALUES, help="batch sizes (tokens)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--docs",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md",
        help="markdown file whose kernel section is replaced (use --no-docs to skip)",
    )
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU here; the kernel benchmark needs one", file=sys.stderr)
        return 2

    import triton

    gpu = torch.cuda.get_device_name()
    header = (
        f"GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; "
        f"group size {args.group_size}; times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph)."
    )
    print(header, flush=True)
    results = {}
    for model in args.models:
        for name, parts, k in layer_shapes(model):
            results[f"{model} {name}"] = measure(parts, k, args.m, args.group_size)
            print("\n".join(table({f"{model} {name}": results[f"{model} {name}"]})[2:]), flush=True)
    means = summary(results)
    print("\n".join(means))
    lines = [header, "", *table(results), "", *means]
    if not args.no_docs:
        command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(args.docs, "\n".join([f"```bash\n{command.strip()}\n```", "", *lines]))
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

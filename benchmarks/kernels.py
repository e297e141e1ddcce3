"""AAAC's CUDA kernels against cuBLAS bf16 and PyTorch's int4 tinygemm on Llama-3 layer shapes, side by
side in one run (needs an NVIDIA GPU).

    python benchmarks/kernels.py [--models 8b 70b] [--m 1 4 16 64 256 2048] [--sweep] [--json FILE]
                                 [--docs docs/benchmarks.md | --no-docs]

Each variant is timed as a decode step sees it: a CUDA graph of R calls that cycle through R copies of
the layer's weights, R chosen so the copies together exceed 4x the GPU's L2, so every call streams its
weights from HBM (a single weight replayed would be served from L2). Times are the median over graph
replays divided by R. Variants, for every layer (q/k/v merged, o, gate/up merged, down) and M:
  bf16       x @ Wᵀ with a bf16 weight (cuBLAS), what a user would run instead;
  aaac       torch.ops.aaac.linear as vLLM calls it (group size 128);
  tinygemm   torch._weight_int4pack_mm (uniform int4, group size 128), PyTorch's own 4-bit GEMM;
and with --sweep every stored and candidate tile configuration of the GEMV and GEMM kernels, and for
large M the tensor-core kernel against slabs of dequantized weight + cuBLAS. Every AAAC variant is
first checked against the dense weight. It prints speed-ups over bf16 (bf16 time / time), the weight
bandwidth of the op and its fraction of a measured device-to-device copy rate, and geometric means by M.
"""

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import torch

import aaac_kernels.linear  # noqa: F401  registers torch.ops.aaac.linear
from aaac_kernels import triton_gemm
from aaac_kernels.format.layout import encode_scales
from aaac_kernels.format.serving import prepare

# (hidden, intermediate, attention heads, KV heads, head dim)
MODELS = {"8b": (4096, 14336, 32, 8, 128), "70b": (8192, 28672, 64, 8, 128)}
M_VALUES = [1, 2, 4, 16, 64, 128, 256, 2048]
GROUP_SIZE = 128
BEGIN, END = "<!-- kernel-benchmark:begin -->", "<!-- kernel-benchmark:end -->"
# Candidates the sweep times beside the stored configurations.
GEMV_CANDIDATES = [
    triton_gemm.TileConfig(0, block_n, 128, 0, 1, warps, 1) for block_n, warps in [(32, 4), (64, 4), (128, 4), (128, 8)]
]
GEMM_CANDIDATES = {
    16: [triton_gemm.TileConfig(16, 128, 128, 0, 1, 4, 3), triton_gemm.TileConfig(16, 256, 128, 0, 1, 8, 3)],
    64: [triton_gemm.TileConfig(64, 128, 128, 0, 1, 8, 3), triton_gemm.TileConfig(32, 128, 128, 0, 1, 4, 3)],
    256: [triton_gemm.TileConfig(128, 128, 128, 1, 8, 8, 3), triton_gemm.TileConfig(64, 128, 128, 0, 8, 8, 3)],
}


def layer_shapes(model: str) -> list[tuple[str, list[int], int]]:
    """(name, output part sizes, in_features) of the four linear layers of a decoder block."""
    hidden, intermediate, heads, kv_heads, head_dim = MODELS[model]
    return [
        ("qkv", [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], hidden),
        ("o", [hidden], heads * head_dim),
        ("gate_up", [intermediate, intermediate], hidden),
        ("down", [hidden], intermediate),
    ]


def random_layer(parts: list[int], k: int) -> tuple[torch.Tensor, ...]:
    """A layer in the ``prepare`` layout with random indices, scales, codebook choices and codebooks."""
    n = sum(parts)
    qweight = torch.randint(-(2**31), 2**31, (k // 8, n), dtype=torch.int32, device="cuda")
    magnitude = torch.rand(k // GROUP_SIZE, n, device="cuda") * 0.02
    scales = encode_scales(magnitude, torch.rand_like(magnitude) < 0.5)
    codebooks = torch.randn(len(parts), 2, 16, device="cuda").sort(dim=-1).values.half()
    return prepare(qweight, scales, codebooks)


def copies_for(nbytes: int) -> int:
    """How many copies of a weight of ``nbytes`` together exceed 4x the L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, math.ceil(4 * l2 / nbytes))


def time_cycling(call, copies: int, replays: int = 7) -> float:
    """Median seconds per call of ``call(i)`` captured i = 0 .. copies - 1 in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):  # warm-up: compiles kernels, allocates outside the graph
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / copies)
    return statistics.median(times)


def copy_rate() -> float:
    """Bytes per second moved (read + write) by a 2 GiB device-to-device copy."""
    source = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    target = torch.empty_like(source)
    seconds = time_cycling(lambda _: target.copy_(source), 1)
    return 2 * source.numel() * 2 / seconds


def tinygemm(n: int, k: int):
    """PyTorch's int4 GEMM on a random uniform-grid weight, or None where this build lacks it."""
    try:
        indices = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        packed = ((indices[:, ::2] << 4) | indices[:, 1::2]).to(torch.uint8)
        weight = torch._convert_weight_to_int4pack(packed, 8)
        scales_zeros = torch.rand(k // GROUP_SIZE, n, 2, dtype=torch.bfloat16, device="cuda")
        run = lambda x: torch._weight_int4pack_mm(x, weight, GROUP_SIZE, scales_zeros)  # noqa: E731
        run(torch.randn(1, k, dtype=torch.bfloat16, device="cuda"))
        return weight, scales_zeros, run
    except (RuntimeError, AttributeError) as error:
        print(f"tinygemm unavailable: {str(error).splitlines()[0]}", file=sys.stderr)
        return None


def aaac_variants(m: int, sweep: bool) -> dict:
    """name -> function(x, qbytes, scales, codebooks, parts) of the AAAC paths timed at this M."""
    variants = {"aaac": lambda x, *layer: torch.ops.aaac.linear(x, *layer, None)}
    if not sweep:
        return variants
    if m <= triton_gemm.GEMV_MAX_M:
        for config in GEMV_CANDIDATES:
            name = f"gemv {config.block_n}x{config.block_k} w{config.num_warps}"
            variants[name] = lambda x, *layer, config=config: triton_gemm.gemv(x, *layer, config)
    bucket = min((b for b in GEMM_CANDIDATES if m <= b), default=256)
    for config in GEMM_CANDIDATES[bucket]:
        name = f"gemm {config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps}"
        variants[name] = lambda x, *layer, config=config: triton_gemm.gemm(x, *layer, config)
    if m >= 64:
        for slab_mib in (16, 64, 256):  # 256 MiB: one slab for every 8B layer
            name = f"deq+mm {slab_mib} MiB"
            variants[name] = lambda x, *layer, slab=slab_mib << 20: _with_slab(slab, x, *layer)
    return variants


def _with_slab(slab_bytes: int, x: torch.Tensor, *layer) -> torch.Tensor:
    saved, triton_gemm.DEQUANT_SLAB_BYTES = triton_gemm.DEQUANT_SLAB_BYTES, slab_bytes
    try:
        return triton_gemm.dequantize_matmul(x, *layer, None)
    finally:
        triton_gemm.DEQUANT_SLAB_BYTES = saved


def measure(layer: str, parts: list[int], k: int, m_values: list[int], sweep: bool) -> list[dict]:
    n = sum(parts)
    first = random_layer(parts, k)
    layer_bytes = sum(t.numel() * t.element_size() for t in first)
    layers = [first] + [random_layer(parts, k) for _ in range(copies_for(layer_bytes) - 1)]
    dense = triton_gemm.dequantize(*first, parts, torch.float32)
    bf16_weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
    peer = tinygemm(n, k)
    peers = [peer] + [tinygemm(n, k) for _ in range(copies_for(n * k // 2) - 1)] if peer else []
    rows = []
    for m in m_values:
        xs = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = xs.float() @ dense.t()
        row = {"layer": layer, "n": n, "k": k, "m": m, "weight_bytes": layer_bytes}
        row["bf16"] = time_cycling(lambda i: xs @ bf16_weights[i % len(bf16_weights)].t(), len(bf16_weights))
        if peers and m <= 256:  # beyond, tinygemm is far behind (0.04x at M = 256 on an H200)
            row["tinygemm"] = time_cycling(lambda i: peers[i][2](xs), len(peers))
        for name, run in aaac_variants(m, sweep).items():
            try:
                got = run(xs, *first, parts).float()
                error = ((got - want).abs().max() / want.abs().max()).item()
                if error > 2e-2:
                    row[name] = f"wrong: relative error {error:.3g}"
                    continue
                row[name] = time_cycling(lambda i: run(xs, *layers[i], parts), len(layers))
            except Exception as failure:  # a candidate that does not compile or launch is reported, not fatal
                row[name] = f"failed: {type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def report(results: list[dict], rate: float) -> list[str]:
    """Per layer and M: times, speed-ups over bf16, and the weight bandwidth of the AAAC op beside that of
    cuBLAS reading bf16 weights (at small M the practical limit; ``rate`` is the copy rate, for scale)."""
    lines = [
        "| layer | N × K | M | bf16 µs | aaac µs | aaac speed-up | tinygemm speed-up "
        f"| weight GB/s: aaac, bf16 (copy: {rate / 1e9:.0f}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        tiny = f"{r['bf16'] / r['tinygemm']:.2f}x" if isinstance(r.get("tinygemm"), float) else "–"
        aaac_gb_s, bf16_gb_s = r["weight_bytes"] / r["aaac"] / 1e9, 2 * r["n"] * r["k"] / r["bf16"] / 1e9
        lines.append(
            f"| {r['layer']} | {r['n']} × {r['k']} | {r['m']} | {r['bf16'] * 1e6:.1f} | {r['aaac'] * 1e6:.1f} "
            f"| {r['bf16'] / r['aaac']:.2f}x | {tiny} | {aaac_gb_s:.0f}, {bf16_gb_s:.0f} |"
        )
    lines += ["", "| M | aaac speed-up over bf16 | tinygemm speed-up over bf16 |", "|---:|---:|---:|"]
    for m in sorted({r["m"] for r in results}):
        at_m = [r for r in results if r["m"] == m]
        aaac = geometric_mean([r["bf16"] / r["aaac"] for r in at_m])
        tiny = [r["bf16"] / r["tinygemm"] for r in at_m if isinstance(r.get("tinygemm"), float)]
        lines.append(f"| {m} | {aaac:.2f}x | {f'{geometric_mean(tiny):.2f}x' if tiny else '–'} |")
    return lines


def sweep_report(results: list[dict]) -> list[str]:
    """Geometric-mean speed-up over bf16 of every timed variant, by M (variants that failed are named)."""
    lines = ["| M | variant | speed-up over bf16 (geometric mean) |", "|---:|---|---:|"]
    for m in sorted({r["m"] for r in results}):
        at_m = [r for r in results if r["m"] == m]
        names = [key for key in at_m[0] if key not in ("layer", "n", "k", "m", "weight_bytes", "bf16")]
        for name in names:
            values = [r.get(name) for r in at_m]
            if all(isinstance(v, float) for v in values):
                speedup = geometric_mean([r["bf16"] / r[name] for r in at_m])
                lines.append(f"| {m} | {name} | {speedup:.2f}x |")
            else:
                problem = next(v for v in values if not isinstance(v, float))
                lines.append(f"| {m} | {name} | {problem} |")
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
    parser.add_argument("--sweep", action="store_true", help="also time every candidate tile configuration")
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument(
        "--report", type=Path, help="no measuring: print (and write to --docs) the tables of a saved --json file"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md",
        help="markdown file whose kernel section is replaced",
    )
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        return publish(saved["header"], saved["rows"], saved["command"], args)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU here; the kernel benchmark needs one", file=sys.stderr)
        return 2

    import triton

    rate = copy_rate()
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}; group size {GROUP_SIZE}; device-to-device copy {rate / 1e12:.2f} TB/s "
        "(read + write); each time is a CUDA graph of calls cycling through weight copies > 4x the L2."
    )
    print(header, flush=True)
    results = []
    for model in args.models:
        for name, parts, k in layer_shapes(model):
            results += measure(f"{model} {name}", parts, k, args.m, args.sweep)
            if args.json:
                saved = {"header": header, "rate": rate, "command": command.strip(), "rows": results}
                args.json.write_text(json.dumps(saved, indent=1))
    return publish(header, results, command.strip(), args, rate)


def publish(header: str, results: list[dict], command: str, args, rate: float | None = None) -> int:
    """Print the tables, and write them to the docs unless --no-docs."""
    if rate is None:  # a saved run: its copy rate is in its JSON
        rate = json.loads(args.report.read_text())["rate"]
    lines = [header, "", *report(results, rate)]
    if any(key.startswith(("gemv ", "gemm ")) for row in results for key in row):
        lines += ["", *sweep_report(results)]
    print("\n".join(lines))
    if not args.no_docs:
        write_docs(args.docs, "\n".join([f"```bash\n{command}\n```", "", *lines]))
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

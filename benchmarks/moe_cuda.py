"""One mixture-of-experts layer on an NVIDIA GPU: AAAC's grouped experts kernels against bf16 experts
(``torch._grouped_mm``) and AAAC's per-expert loop, side by side in one run (needs a GPU).

    python benchmarks/moe_cuda.py [--shapes mixtral-8x7b qwen3-30b-a3b] [--tokens 1 4 16 64 256]

Variants, per shape and number of tokens, on random experts (each weight copy with its own random routing):
  bf16        the experts' bf16 weights through ``torch._grouped_mm`` (PyTorch's grouped GEMM; the pairs
              sorted by expert, the routing weights applied after down), what a user would run instead;
  aaac        ``torch.ops.aaac.routed_experts`` as vLLM calls it on CUDA (``triton_experts``: two grouped
              launches), group size 128;
  aaac loop   the CPU path's loop over the routed experts, each through ``aaac::linear`` (the Triton
              GEMV/GEMM): what the op ran on CUDA before the grouped kernel.
bf16 and aaac are timed as CUDA graphs cycling through weight copies (``kernels.time_cycling``; the loop
reads the routing on the host, so it is timed eagerly with events). The grouped AAAC output is first
checked against the loop's. It prints µs per layer and speed-ups over bf16.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aaac_kernels.routed_experts import routed_experts_loop  # noqa: E402
from kernels import copies_for, random_layer, time_cycling  # noqa: E402

SHAPES = {  # hidden, expert intermediate, experts, experts per token
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
TOKENS = [1, 4, 16, 64, 256]


def bf16_experts(x, weights, ids, w13, w2):
    """The layer with bf16 experts (w13 [E, 2I, H], w2 [E, H, I]) through PyTorch's grouped GEMM; no host sync."""
    experts, top_k, intermediate = w13.shape[0], ids.shape[1], w2.shape[2]
    order = torch.argsort(ids.flatten(), stable=True)
    tokens = order // top_k
    counts = torch.zeros(experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, ids.flatten().long(), torch.ones_like(ids.flatten(), dtype=torch.int32)
    )
    ends = counts.cumsum(0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x[tokens], w13.transpose(1, 2), offs=ends)
    h = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=ends) * weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def aaac_experts(hidden: int, intermediate: int, experts: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Random AAAC experts, each one's ``prepare`` layouts stacked: (w13 tensors, w2 tensors)."""
    w13 = [random_layer([intermediate] * 2, hidden) for _ in range(experts)]
    w2 = [random_layer([hidden], intermediate) for _ in range(experts)]
    return tuple(torch.stack(t) for t in zip(*w13)), tuple(torch.stack(t) for t in zip(*w2))


def routings(tokens: int, experts: int, top_k: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` random routings: (weights [tokens, top_k] fp32, distinct expert ids [tokens, top_k] int32)."""
    drawn = []
    for _ in range(count):
        ids = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=1).indices.int()
        drawn.append((torch.rand(tokens, top_k, device="cuda").softmax(1), ids))
    return drawn


def time_eager(call, copies: int, rounds: int = 7) -> float:
    """Median seconds per call of ``call(i)``, i = 0 .. copies - 1, launched eagerly."""
    for i in range(copies):
        call(i)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(copies):
            call(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / copies)
    return statistics.median(times)


def measure(shape: str, token_counts: list[int]) -> list[dict]:
    hidden, intermediate, experts, top_k = SHAPES[shape]
    active_bf16 = 2 * 3 * hidden * intermediate * min(experts, top_k)  # one token's experts, bf16 bytes
    copies = copies_for(active_bf16)
    bf16 = [
        (
            torch.randn(experts, 2 * intermediate, hidden, device="cuda", dtype=torch.bfloat16) * 0.02,
            torch.randn(experts, hidden, intermediate, device="cuda", dtype=torch.bfloat16) * 0.02,
        )
        for _ in range(copies)
    ]
    aaac = [aaac_experts(hidden, intermediate, experts) for _ in range(copies)]
    return [time_tokens(shape, tokens, bf16, aaac) for tokens in token_counts]


def time_tokens(shape: str, tokens: int, bf16: list, aaac: list) -> dict:
    """The three variants on ``tokens`` tokens, cycling through the weight copies; prints a table row."""
    hidden, intermediate, experts, top_k = SHAPES[shape]
    copies = len(bf16)
    xs = [torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    drawn = routings(tokens, experts, top_k, copies)
    args = lambda i: (xs[i], *drawn[i], *aaac[i][0], *aaac[i][1], intermediate, None, False)  # noqa: E731
    grouped, looped = torch.ops.aaac.routed_experts(*args(0)), routed_experts_loop(*args(0))
    torch.testing.assert_close(grouped.float(), looped.float(), rtol=2e-2, atol=2e-2 * looped.abs().max().item())
    row = dict(shape=shape, tokens=tokens)
    row["bf16"] = time_cycling(lambda i: bf16_experts(xs[i], *drawn[i], *bf16[i]), copies)
    row["aaac"] = time_cycling(lambda i: torch.ops.aaac.routed_experts(*args(i)), copies)
    row["aaac loop"] = time_eager(lambda i: routed_experts_loop(*args(i)), copies)
    print(
        f"| {shape} | {tokens} | {row['bf16'] * 1e6:.1f} | {row['aaac'] * 1e6:.1f} | {row['aaac loop'] * 1e6:.1f} "
        f"| {row['bf16'] / row['aaac']:.2f}x | {row['bf16'] / row['aaac loop']:.2f}x |",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/moe_cuda.py: no CUDA GPU here; this benchmark needs one", file=sys.stderr)
        return 2

    import triton

    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | tokens | bf16 µs | aaac µs | aaac loop µs | aaac speed-up | loop speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        measure(shape, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A mixture-of-experts layer on CPU: AAAC's loop over the routed experts against vLLM's bf16 fused MoE.

    python benchmarks/moe_cpu.py [--shape qwen3-30b-a3b olmoe] [--tokens 1 4 16 64] [--threads 1]

One layer of random experts per shape, its routing drawn at random for every call (top-k of random
scores: each call meets other experts, as decoding steps do), bf16 activations. Side by side, per call:

  bf16          vLLM's CPU MoE for unquantized experts, as ``CPUUnquantizedExperts`` runs it: weights
                prepacked by ``cpu_prepack_moe_weight`` at load (isa "amx" where the CPU has AMX tiles,
                else "vec"), ``cpu_fused_moe`` per call (grouped GEMMs over the routed experts in C++);
  AAAC          ``torch.ops.aaac.routed_experts`` (what ``AAACMoEMethod.apply`` runs; called here as its
                Python function) on the experts' layouts from ``format.serving.prepare``;
  AAAC kernels  the same ``aaac::linear`` calls alone (gate_up on each expert's tokens, down on their
                gated product), inputs gathered beforehand: AAAC minus this is what the Python loop adds
                (routing, gathers, the activation, weighting, the sum).

Weights stream from memory: each variant rotates through copies of the layer that together exceed twice
the last-level cache. AAAC is first checked against the reference dequantizer in an fp32 loop.
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernels import copies_for, cpu_description, llc_bytes, random_aaac, reference_weight  # noqa: E402

from aaac_kernels.format.serving import prepare  # noqa: E402
from aaac_kernels.routed_experts import routed_experts_loop  # noqa: E402

SHAPES = {  # hidden, expert intermediate, experts, experts per token
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
}
GROUP_SIZE = 64
ROUTINGS = 64  # routings drawn beforehand, cycled through


@dataclass
class Layer:
    """One MoE layer's experts, in copies that together exceed twice the last-level cache."""

    hidden: int
    intermediate: int
    top_k: int
    aaac: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]  # (w13, w2) layouts stacked by expert
    bf16: list[tuple[torch.Tensor, torch.Tensor]]  # w13 [E, 2I, H], w2 [E, H, I], prepacked for cpu_fused_moe
    dense: tuple[torch.Tensor, torch.Tensor]  # the reference's weights (bf16), for the check


def build_layer(shape: str, isa: str, llc: int) -> Layer:
    from vllm._custom_ops import cpu_prepack_moe_weight

    hidden, intermediate, experts, top_k = SHAPES[shape]
    w13_layouts, w2_layouts, w13_dense, w2_dense = [], [], [], []
    for _ in range(experts):
        w13 = random_aaac([intermediate, intermediate], hidden, GROUP_SIZE)
        w2 = random_aaac([hidden], intermediate, GROUP_SIZE)
        w13_layouts.append(prepare(*w13))
        w2_layouts.append(prepare(*w2))
        w13_dense.append(reference_weight(*w13, [intermediate, intermediate], GROUP_SIZE).bfloat16())
        w2_dense.append(reference_weight(*w2, [hidden], GROUP_SIZE).bfloat16())
    w13, w2 = (tuple(torch.stack(t) for t in zip(*layouts)) for layouts in (w13_layouts, w2_layouts))
    w13_bf16, w2_bf16 = torch.stack(w13_dense), torch.stack(w2_dense)
    aaac_bytes = sum(t.numel() * t.element_size() for t in (*w13, *w2))
    aaac = [(w13, w2)] + [
        (tuple(t.clone() for t in w13), tuple(t.clone() for t in w2)) for _ in range(copies_for(aaac_bytes, llc) - 1)
    ]
    bf16_bytes = (w13_bf16.numel() + w2_bf16.numel()) * 2
    bf16 = [
        (cpu_prepack_moe_weight(w13_bf16, isa), cpu_prepack_moe_weight(w2_bf16, isa))
        for _ in range(copies_for(bf16_bytes, llc))
    ]
    return Layer(hidden, intermediate, top_k, aaac, bf16, (w13_bf16, w2_bf16))


def routings(layer: Layer, tokens: int, experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ROUTINGS random (weights [T, k] fp32, expert ids [T, k] int32), as a softmax router's top-k."""
    drawn = []
    for _ in range(ROUTINGS):
        weights, ids = torch.rand(tokens, experts).softmax(-1).topk(layer.top_k, dim=-1)
        drawn.append((weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)))
    return drawn


def check(layer: Layer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> float:
    """Relative error of AAAC's output against an fp32 loop over the reference's (bf16) weights."""
    w13, w2 = layer.aaac[0]
    got = routed_experts_loop(x, weights, ids, *w13, *w2, layer.intermediate, None, False).float()
    want = torch.zeros_like(got)
    for t in range(x.shape[0]):
        for k in range(layer.top_k):
            e = int(ids[t, k])
            gate_up = x[t].float() @ layer.dense[0][e].float().t()
            h = F.silu(gate_up[: layer.intermediate]) * gate_up[layer.intermediate :]
            want[t] += weights[t, k] * (h.bfloat16().float() @ layer.dense[1][e].float().t())
    return ((got - want).norm() / want.norm()).item()


def measure(layer: Layer, x: torch.Tensor, drawn: list, isa: str) -> tuple[float, float, float]:
    """Seconds per call of bf16, AAAC and AAAC's kernels alone, routings and weight copies in rotation."""
    from vllm._custom_ops import cpu_fused_moe

    out = torch.empty_like(x)
    # The kernels alone: each routing's active experts with their inputs gathered beforehand.
    gathered = [
        [
            (e, x[torch.where(ids == e)[0]], torch.randn(int((ids == e).sum()), layer.intermediate).bfloat16())
            for e in torch.unique(ids).tolist()
        ]
        for _, ids in drawn
    ]

    def bf16(i: int) -> None:
        weights, ids = drawn[i % ROUTINGS]
        w13, w2 = layer.bf16[i % len(layer.bf16)]
        cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, "silu", isa)

    def aaac(i: int) -> None:
        weights, ids = drawn[i % ROUTINGS]
        w13, w2 = layer.aaac[i % len(layer.aaac)]
        routed_experts_loop(x, weights, ids, *w13, *w2, layer.intermediate, None, False)

    def kernels(i: int) -> None:
        w13, w2 = layer.aaac[i % len(layer.aaac)]
        for e, inputs, h in gathered[i % ROUTINGS]:
            torch.ops.aaac.linear(inputs, *(t[e] for t in w13), [layer.intermediate] * 2, None)
            torch.ops.aaac.linear(h, *(t[e] for t in w2), [layer.hidden], None)

    count = max(8, 256 // x.shape[0])
    return timed(bf16, count), timed(aaac, count), timed(kernels, count)


def timed(call, count: int, reps: int = 7) -> float:
    """Median seconds per call over reps loops of count calls (after one warm-up loop)."""
    for i in range(count):
        call(i)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(count):
            call(i)
        samples.append((time.perf_counter() - start) / count)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    isa = "amx" if torch.cpu._is_amx_tile_supported() else "vec"
    model, flags = cpu_description()
    llc = llc_bytes()
    print(f"CPU: {model} ({' '.join(flags)}), last-level cache {llc >> 20} MiB; {args.threads} thread(s)")
    print(f"torch {torch.__version__}; vLLM cpu_fused_moe isa '{isa}'; group size {GROUP_SIZE}; bf16 activations\n")
    print("| shape | tokens | bf16 µs | AAAC µs | AAAC kernels µs | AAAC / bf16 speed-up | loop's share of AAAC |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shape in args.shape:
        layer = build_layer(shape, isa, llc)
        for tokens in args.tokens:
            x = torch.randn(tokens, layer.hidden).bfloat16()
            drawn = routings(layer, tokens, SHAPES[shape][2])
            error = check(layer, x, *drawn[0])
            assert error < 0.02, f"{shape}: AAAC differs from the reference by {error:.3%}"
            t_bf16, t_aaac, t_kernels = measure(layer, x, drawn, isa)
            print(
                f"| {shape} | {tokens} | {t_bf16 * 1e6:.0f} | {t_aaac * 1e6:.0f} | {t_kernels * 1e6:.0f} "
                f"| {t_bf16 / t_aaac:.2f}x | {(t_aaac - t_kernels) / t_aaac:.0%} |"
            )
        del layer


if __name__ == "__main__":
    main()

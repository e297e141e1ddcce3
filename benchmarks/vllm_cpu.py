"""vLLM throughput and weight memory, bf16 against AAAC, in one run with the same prompts.

    python benchmarks/vllm_cpu.py --source MODEL --quantized MODEL-aaac --text held-out.txt

Prints output tokens per second (greedy, fixed output length) and the weight
bytes each engine holds, with AAAC/bf16 ratios. Runs on whatever vLLM build is
installed (the CPU build here); docs/benchmarks.md records the figures.
"""

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # to send weight_bytes to the worker
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from aaac_vllm.memory import weight_bytes  # noqa: E402


def prompts_from(text: Path, count: int) -> list[str]:
    """The first line of ``count`` articles (blank-line separated) of held-out text."""
    articles = [a.strip().splitlines()[0] for a in text.read_text(encoding="utf-8").split("\n\n") if a.strip()]
    return articles[:count]


def measure(model: Path, prompts: list[str], max_tokens: int, eager: bool) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=str(model), seed=0, max_model_len=1024, enforce_eager=eager)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    memory = llm.apply_model(weight_bytes)[0]
    llm.llm_engine.engine_core.shutdown()
    return {"startup": startup, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the bf16 model")
    parser.add_argument("--quantized", type=Path, required=True, help="its AAAC checkpoint")
    parser.add_argument("--text", type=Path, required=True, help="text whose lines become prompts")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (default: vLLM's default mode)")
    args = parser.parse_args()

    import torch
    import vllm

    prompts = prompts_from(args.text, args.prompts)
    results = {name: measure(path, prompts, args.max_tokens, args.enforce_eager)
               for name, path in (("bf16", args.source), ("AAAC", args.quantized))}
    bf16, aaac = results["bf16"], results["AAAC"]
    mode = "eager" if args.enforce_eager else "compiled (vLLM default)"
    print(f"\nvLLM {vllm.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {mode}; {len(prompts)} prompts x {args.max_tokens} output tokens, greedy")
    print(f"{'':6s} {'output tok/s':>13s} {'linear MiB':>11s} {'other MiB':>10s} {'start s':>8s}")
    for name, r in results.items():
        print(f"{name:6s} {r['tok_s']:13.1f} {r['linear'] / 2**20:11.1f} {r['other'] / 2**20:10.1f} {r['startup']:8.0f}")
    print(f"AAAC/bf16: throughput {aaac['tok_s'] / bf16['tok_s']:.3f}x, "
          f"linear-layer bytes {aaac['linear'] / bf16['linear']:.4f}x, "
          f"all weight bytes {(aaac['linear'] + aaac['other']) / (bf16['linear'] + bf16['other']):.4f}x")


if __name__ == "__main__":
    main()

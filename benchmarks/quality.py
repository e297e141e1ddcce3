"""Perplexity of bf16, round-to-nearest INT4 and AAAC side by side, in one run, on held-out text.

    python benchmarks/quality.py --source MODEL --quantized MODEL-aaac --text held-out.txt [--max-tokens N]

The round-to-nearest rows use the quantized checkpoint's group size. Prints a
Markdown table (perplexity, gap to bf16, gap as a fraction of RTN's) and the
quantization time and peak memory from the AAAC report.
"""

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from offline_quantize.evaluate import perplexity
from offline_quantize.hf_loader import load_causal_lm
from offline_quantize.rtn import apply_rtn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--quantized", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=None)
    args = parser.parse_args()

    report = json.loads((args.quantized / "quantization_report.json").read_text())
    group = report["settings"]["group_size"]
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    text = args.text.read_text(encoding="utf-8")
    candidates = {
        "bf16": lambda: load_causal_lm(args.source),
        f"RTN asymmetric g{group}": lambda: apply_rtn(load_causal_lm(args.source), group, symmetric=False),
        f"RTN symmetric g{group}": lambda: apply_rtn(load_causal_lm(args.source), group, symmetric=True),
        f"AAAC g{group}": lambda: load_causal_lm(args.quantized),
    }
    results = {}
    for name, build in candidates.items():
        results[name], tokens = perplexity(build(), tokenizer, text, args.seqlen, args.max_tokens)
        print(f"{name}: {results[name]:.3f}", flush=True)

    base, rtn = results["bf16"], results[f"RTN asymmetric g{group}"]
    print(f"\n{tokens} tokens of {args.text.name}, {args.seqlen}-token windows; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}\n")
    print("| method | perplexity | gap to bf16 | gap / RTN-asym gap |")
    print("|---|---|---|---|")
    for name, ppl in results.items():
        ratio = "" if name == "bf16" else f"{(ppl - base) / (rtn - base):.2f}"
        print(f"| {name} | {ppl:.3f} | {ppl - base:+.3f} | {ratio} |")
    s = report["settings"]
    print(f"\nAAAC quantization: {report['seconds']:.0f} s on {report['device']}, peak host memory "
          f"{report['memory']['host_peak_rss_mib']:.0f} MiB, {s['nsamples']} x {s['seqlen']} calibration tokens")


if __name__ == "__main__":
    main()

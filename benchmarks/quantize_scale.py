"""Quantization time and memory against model size: seconds per block and per billion parameters, peak RSS.

    python benchmarks/quantize_scale.py --workdir artifacts/bench/scale [--sizes 0.1b 0.5b 1.5b]
        [--methods rtn aaac] [--nsamples 16 --seqlen 512] [--group-size 128] [--device cpu]
    python benchmarks/quantize_scale.py --workdir artifacts/bench/smollm2 --source artifacts/SmolLM2-135M-Instruct \\
        --methods rtn gptq aaac aaac+awq --group-size 64 --nsamples 128 --seqlen 512

Without ``--source`` it writes synthetic Llama-shaped models (random bf16 weights, SmolLM2's tokenizer and
49152-token vocabulary, untied head) of the sizes asked for, one tensor at a time (``--workdir/<size>``,
kept for the next run), and quantizes each with each method; with ``--source`` it quantizes that model.
Every quantization is its own ``aaac-quantize`` process, so its time and peak RSS (read back from its
``quantization_report.json``) are its own; the processes run one after the other. The table shows where
the time goes (the report's ``step_seconds``: reading the block from the shards, the forward that collects
statistics, the method's own work, the forward that makes the next block's inputs) and the peak RSS as a
fraction of the model's size on disk. The forwards' rate (the FLOP of the linears over the two forward
steps, statistics hooks included) is printed beside this machine's fp32 GEMM rate, their floor.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: offline_quantize is importable from the repo root
    sys.path.insert(0, str(ROOT))

from aaac_kernels.format.config import read_config  # noqa: E402
from aaac_kernels.format.files import ShardWriter, copy_side_files  # noqa: E402
from offline_quantize.methods import compared_variants  # noqa: E402
from offline_quantize.staging import staging_folder  # noqa: E402

TOKENIZER = ROOT / "artifacts" / "SmolLM2-135M-Instruct"
# Llama-family shapes at about 0.1, 0.5 and 1.5 billion parameters (with the 49152-token vocabulary).
SIZES = {
    "0.1b": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
    "0.5b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 24},
    "1.5b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32},
}
STEPS = ("read", "statistics", "quantization", "next inputs")


def write_synthetic(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A random Llama of ``shape`` in bf16 safetensors shards, written tensor by tensor (never whole in RAM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tokenizer_config = read_config(TOKENIZER)
    config = LlamaConfig(
        vocab_size=tokenizer_config["vocab_size"],
        num_key_value_heads=shape["num_attention_heads"] // 4,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=tokenizer_config["bos_token_id"],
        eos_token_id=tokenizer_config["eos_token_id"],
        dtype="bfloat16",
        **shape,
    )
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with staging_folder(folder) as staging:
        writer = ShardWriter(staging, 2 << 30)
        for name, param in skeleton.named_parameters():
            if name.endswith("norm.weight"):
                tensor = torch.ones(param.shape)
            else:
                tensor = torch.randn(param.shape, generator=generator) * config.initializer_range
            writer.add(name, tensor.to(torch.bfloat16))
        writer.finish()
        config.save_pretrained(staging)
        copy_side_files(TOKENIZER, staging)
    return folder


def model_facts(folder: Path) -> dict:
    """Blocks, bytes and parameters on disk (bf16: 2 bytes each), and the weights of one block's linears."""
    config = read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    linear = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                if name.startswith("model.layers.0.") and name.endswith("proj.weight") and len(shape) == 2:
                    linear += shape[0] * shape[1]
    return {"blocks": config["num_hidden_layers"], "bytes": size, "parameters": size / 2, "block_linear": linear}


def matmul_rate() -> float:
    """This machine's fp32 GEMM rate (GFLOP/s, best of 5, torch's threads): the floor the forwards race."""
    a, b = torch.randn(4096, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 2048 * 2048 / best / 1e9


def quantize(source: Path, output: Path, options: list[str]) -> dict:
    command = [sys.executable, "-m", "offline_quantize", str(source), str(output), *options, "--overwrite"]
    print("$ aaac-quantize " + " ".join(command[3:]), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: quantizing {source} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads((output / "quantization_report.json").read_text())


def main(argv: list[str] | None = None) -> None:
    variants = {v.label: v for v in compared_variants()}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="synthetic models and checkpoints go here")
    p.add_argument("--source", type=Path, help="quantize this model instead of synthetic ones")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--methods", nargs="+", choices=list(variants), default=["rtn", "aaac"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    models = (
        {args.source.name: args.source}
        if args.source
        else {size: write_synthetic(args.workdir / f"llama-{size}", SIZES[size]) for size in args.sizes}
    )
    common = ["--group-size", args.group_size, "--nsamples", args.nsamples, "--seqlen", args.seqlen]
    common = [str(o) for o in [*common, "--device", args.device]]
    rate = matmul_rate()
    tokens = args.nsamples * args.seqlen
    rows = []
    for name, folder in models.items():
        facts = model_facts(folder)
        for label in args.methods:
            report = quantize(folder, args.workdir / f"{name}-{label}", [*variants[label].arguments, *common])
            steps = report["step_seconds"]
            rss = report["memory"]["host_peak_rss_mib"] * 2**20
            # Two forwards per block (statistics, next inputs), 2 FLOP per weight and token in the linears.
            forward_flop = 2 * 2 * facts["block_linear"] * tokens * facts["blocks"]
            forward_seconds = steps["statistics"] + steps["next inputs"]
            rows.append(
                [
                    name,
                    f"{facts['parameters'] / 1e9:.2f}",
                    str(facts["blocks"]),
                    label,
                    f"{report['seconds']:.1f}",
                    f"{sum(report['block_seconds']) / facts['blocks']:.2f}",
                    f"{report['seconds'] / (facts['parameters'] / 1e9):.0f}",
                    " / ".join(f"{100 * steps.get(s, 0.0) / sum(report['block_seconds']):.0f}" for s in STEPS),
                    f"{forward_flop / forward_seconds / 1e9:.0f}",
                    f"{rss / 2**20:.0f}",
                    f"{facts['bytes'] / 2**20:.0f}",
                    f"{rss / facts['bytes']:.2f}",
                ]
            )
    header = [
        "model",
        "params (B)",
        "blocks",
        "method",
        "seconds",
        "s / block",
        "s / B params",
        "% read / statistics / quantization / next inputs",
        "forward linear GFLOP/s",
        "peak RSS MiB",
        "model MiB",
        "RSS / model",
    ]
    print(f"\ncalibration: {args.nsamples} x {args.seqlen} tokens, group size {args.group_size}, device {args.device}")
    print(f"fp32 GEMM on this machine: {rate:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

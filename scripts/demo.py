"""What `make demo` prints: size, quantization time, perplexity before and after, completions, vLLM.

python scripts/demo.py --source MODEL --quantized MODEL-aaac --text held-out.txt
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from offline_quantize.evaluate import perplexity, token_ids
from offline_quantize.hf_loader import load_causal_lm

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the history of football.",
    "Explain in two sentences why the sky is blue.",
]


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--quantized", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()

    report = json.loads((args.quantized / "quantization_report.json").read_text())
    src, dst = size_mib(args.source), size_mib(args.quantized)
    print(f"\n== AAAC on {args.source.name} (group size {report['settings']['group_size']}) ==")
    print(f"weights on disk   {src:8.1f} MiB (bf16)  ->  {dst:8.1f} MiB (AAAC)   {dst / src:.2f}x")
    print(
        f"quantization      {report['seconds']:.0f} s on {report['device']}, "
        f"peak host memory {report['memory']['host_peak_rss_mib']:.0f} MiB"
    )

    tokenizer = AutoTokenizer.from_pretrained(args.quantized)
    ids = token_ids(tokenizer, args.text.read_text(encoding="utf-8"), args.max_tokens)
    models = {}
    for name, path in (("bf16", args.source), ("AAAC", args.quantized)):
        models[name] = load_causal_lm(path, dtype=torch.float32)
        start = time.perf_counter()
        ppl, tokens = perplexity(models[name], ids, args.seqlen)
        print(f"perplexity {name:5s}  {ppl:8.3f}   ({tokens} held-out BBC tokens, {time.perf_counter() - start:.0f} s)")

    print("\ncompletions from the AAAC model (greedy, in transformers with the AAAC kernels):")
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = models["AAAC"].generate(**ids, max_new_tokens=48, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        print(f"  > {prompt}\n    {answer}")

    run_in_vllm(args.source, args.quantized)


def run_in_vllm(source: Path, quantized: Path) -> None:
    """The AAAC checkpoint in vLLM's engine: completions, and the weight memory of both engines."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # to send weight_bytes to the worker
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from aaac_vllm.memory import weight_bytes

    memory = {}
    for name, path in (("bf16", source), ("AAAC", quantized)):
        llm = LLM(model=str(path), seed=0, max_model_len=1024, enforce_eager=True)
        memory[name] = llm.apply_model(weight_bytes)[0]
        if name == "AAAC":
            chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
            outputs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
            print("\ncompletions from the AAAC model in vLLM (greedy, `--quantization aaac`):")
            for prompt, output in zip(PROMPTS, outputs):
                print(f"  > {prompt}\n    {output.outputs[0].text.strip()}")
        llm.llm_engine.engine_core.shutdown()

    print("\nweight memory in vLLM     linear layers     everything")
    for name, m in memory.items():
        print(
            f"  {name:5s}                 {m['linear'] / 2**20:8.1f} MiB    "
            f"{(m['linear'] + m['other']) / 2**20:8.1f} MiB"
        )
    ratio = memory["AAAC"]["linear"] / memory["bf16"]["linear"]
    total = sum(memory["AAAC"].values()) / sum(memory["bf16"].values())
    print(f"  AAAC/bf16             {ratio:8.3f}x        {total:8.3f}x")


if __name__ == "__main__":
    main()

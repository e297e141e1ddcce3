"""Models with random weights in real models' shapes, in bf16, AAAC and AWQ checkpoints, for speed measurements.

    python benchmarks/synthetic_model.py OUT_DIR [--shape llama1b|qwen3moe]
        [--tokenizer artifacts/SmolLM2-135M-Instruct] [--seed 0]

writes OUT_DIR/bf16, OUT_DIR/aaac and OUT_DIR/awq (a folder that already holds a config.json is kept;
each is built in a hidden staging folder and renamed when complete, so a present folder is a whole one).

``--shape llama1b`` (the default) is Llama-3.2-1B's: hidden 2048, intermediate 8192, 16 layers, 32 heads,
8 KV heads, head_dim 64, tied embeddings, rope_theta 500000 (default RoPE; Llama 3.2's "llama3"
long-context rope scaling is left out, it does not change the cost of a step). The vocabulary is
SmolLM2's (49152 tokens, not Llama's 128256): its tokenizer files are copied from ``--tokenizer``, so
prompts tokenize exactly as for SmolLM2; the embedding / lm_head matrix is therefore 49152 x 2048 instead
of 128256 x 2048. ``--shape qwen3moe`` is 4 decoder blocks of Qwen3-30B-A3B (hidden 2048, 32 heads, 4 KV
heads, head_dim 128, 128 experts of intermediate 768, 8 per token; the real model has 48 blocks), with the
same vocabulary: each expert and part is a linear of its own in the AAAC and AWQ checkpoints, under the
names checkpoints store (``aaac_kernels.format.experts``), and the routers stay bf16.

The weights are random, so the model writes garbage: it is for speed and memory only, never accuracy.

* bf16: ``AutoModelForCausalLM.from_config`` with transformers' random initialization (seeded), saved with
  ``save_pretrained``; ``rope_theta`` is then written at the top level of config.json too (readers that
  do not know ``rope_parameters`` would use 10000).
* aaac and awq: written directly from random packed tensors, with no calibration (quantizing 1B
  parameters on 2 CPU cores takes far too long), through the quantizer's own writers in
  ``aaac_kernels.format`` (``files.ShardWriter``, ``write_manifest``, ``write_config``,
  ``copy_side_files``, ``quantization_config``; ``awq.pack`` and ``awq.quantization_config``)
  and with the tensor names ``aaac-quantize`` writes: one checkpoint module per linear of the decoder
  blocks (q/k/v and gate/up separately, vLLM merges them at load; each expert's parts too). Every other
  tensor (embeddings, norms, routers) is copied from the bf16 checkpoint. The AAAC checkpoint passes
  ``aaac_kernels.format.verify.verify_checkpoint``.

  AAAC, per linear with weight [N, K] and group size G (64): ``qweight`` = ``pack_indices`` of uniform
  random indices 0..15, ``scales`` = ``encode_scales`` of magnitudes 0.005..0.015 with a random codebook
  choice per group (both codebooks in use), ``codebooks`` = two sorted random fp16 tables in [-1, 1].
  AWQ: uniform random codes 0..15, zero point 8, scales 0.001..0.003, packed by ``awq_format.pack``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: offline_quantize is importable from the repo root
    sys.path.insert(0, str(ROOT))

from aaac_kernels.experts import has_fused_experts, unfuse_experts  # noqa: E402
from aaac_kernels.format import awq as awq_format  # noqa: E402
from aaac_kernels.format.config import quantization_config, read_config, write_config  # noqa: E402
from aaac_kernels.format.experts import naming_for  # noqa: E402
from aaac_kernels.format.files import ShardWriter, copy_side_files  # noqa: E402
from aaac_kernels.format.layout import CODEBOOK_SIZE, NUM_CODEBOOKS, encode_scales, pack_indices  # noqa: E402
from aaac_kernels.format.manifest import write_manifest  # noqa: E402
from aaac_kernels.format.verify import verify_checkpoint  # noqa: E402
from offline_quantize import source  # noqa: E402
from offline_quantize.staging import staging_folder  # noqa: E402

GROUP_SIZE = 64
VOCAB_SIZE = 49152  # SmolLM2's, so that its tokenizer fits
SHAPES = {
    "llama1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rope_theta": 500000.0,
    },
    "qwen3moe": {  # 4 of Qwen3-30B-A3B's 48 blocks
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "rope_theta": 1000000.0,
    },
}
FORMATS = ("bf16", "aaac", "awq")
NOTE_FILE = "synthetic_model.json"  # a side file: copy_side_files carries it into the quantized folders


def describe_shape(name: str) -> str:
    shape = SHAPES[name]
    experts = (
        f", {shape['num_experts']} experts of intermediate {shape['moe_intermediate_size']}, "
        f"{shape['num_experts_per_tok']} per token"
        if "num_experts" in shape
        else f", intermediate {shape['intermediate_size']}"
    )
    return (
        f"{shape['model_type']}, hidden {shape['hidden_size']}{experts}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads, head_dim "
        f"{shape['head_dim']}, tied embeddings, rope_theta {shape['rope_theta']:.0f}"
    )


def model_config(name: str, source_config: dict):
    """The shape ``name`` with the vocabulary and special token ids of ``source_config`` (SmolLM2's config.json)."""
    from transformers import AutoConfig

    if source_config.get("vocab_size") != VOCAB_SIZE:
        raise SystemExit(
            f"error: the tokenizer's model has vocab_size {source_config.get('vocab_size')}, "
            f"expected {VOCAB_SIZE} (SmolLM2's)"
        )
    shape = dict(SHAPES[name])
    theta = shape.pop("rope_theta")
    return AutoConfig.for_model(
        shape.pop("model_type"),
        vocab_size=VOCAB_SIZE,
        **shape,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        max_position_embeddings=8192,
        rms_norm_eps=1e-5 if name == "llama1b" else 1e-6,
        tie_word_embeddings=True,
        bos_token_id=source_config.get("bos_token_id", 1),
        eos_token_id=source_config.get("eos_token_id", 2),
        pad_token_id=source_config.get("pad_token_id", 2),
    )


def write_bf16(out: Path, shape: str, tokenizer: Path, seed: int) -> None:
    """The random bf16 model, saved by transformers, with SmolLM2's tokenizer and generation files."""
    from transformers import AutoModelForCausalLM

    config = model_config(shape, read_config(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with staging_folder(out) as staging:
        model.save_pretrained(staging)
        saved = json.loads((staging / "config.json").read_text())
        saved["rope_theta"] = SHAPES[shape]["rope_theta"]  # older readers ignore rope_parameters: 10000
        (staging / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        copy_side_files(tokenizer, staging)  # tokenizer.json, tokenizer_config.json, chat template, ...
        note = {
            "what": f"random weights in the shape {shape} ({describe_shape(shape)}), for speed and memory only",
            "shape": SHAPES[shape],
            "vocab_size": VOCAB_SIZE,
            "tokenizer": f"copied from {tokenizer} (SmolLM2's 49152-token vocabulary)",
            "seed": seed,
            "written_by": "benchmarks/synthetic_model.py",
        }
        (staging / NOTE_FILE).write_text(json.dumps(note, indent=2) + "\n")


def block_linears(bf16: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """({checkpoint name: (out_features, in_features)} of every linear in the decoder blocks, as aaac-quantize
    finds them (each expert's parts too), the modules it leaves unquantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(bf16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    naming = naming_for(config.model_type, has_fused_experts(model))
    unfuse_experts(model, naming)
    blocks = source.decoder_blocks(model)
    prefix = source.blocks_prefix(model, blocks)
    linears = {
        f"{prefix}.{i}.{name}": module
        for i, block in enumerate(blocks)
        for name, module in source.block_linears(block).items()
    }
    shapes = {naming.stored_name(name): (m.out_features, m.in_features) for name, m in linears.items()}
    unquantized = [naming.stored_name(name) for name in source.unquantized_modules(model, linears)]
    return shapes, unquantized


def aaac_tensors(n: int, k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    indices = torch.randint(0, CODEBOOK_SIZE, (n, k), dtype=torch.uint8, generator=generator)
    groups = k // GROUP_SIZE
    magnitudes = 0.005 + 0.01 * torch.rand(n, groups, generator=generator)
    choices = torch.rand(n, groups, generator=generator) < 0.5
    codebooks = (2 * torch.rand(NUM_CODEBOOKS, CODEBOOK_SIZE, generator=generator) - 1).half().sort(dim=-1).values
    return {
        "qweight": pack_indices(indices),  # [K / 8, N]
        "scales": encode_scales(magnitudes, choices).t().contiguous(),  # [K / G, N]
        "codebooks": codebooks,  # [2, 16]
    }


def awq_tensors(n: int, k: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    groups = k // GROUP_SIZE
    scale = 0.001 + 0.002 * torch.rand(n, groups, generator=generator)
    zero = torch.full((n, groups), 8.0)
    return awq_format.pack(codes, scale, zero)


def write_quantized(out: Path, bf16: Path, kind: str, seed: int) -> None:
    """The AAAC or AWQ checkpoint of random packed tensors, every other tensor copied from ``bf16``."""
    make = aaac_tensors if kind == "aaac" else awq_tensors
    linears, unquantized = block_linears(bf16)
    config = read_config(bf16)
    generator = torch.Generator().manual_seed(seed + (1 if kind == "aaac" else 2))
    with staging_folder(out) as staging:
        writer = ShardWriter(staging, 4 << 30)
        for name, (n, k) in linears.items():
            for suffix, tensor in make(n, k, generator).items():
                writer.add(f"{name}.{suffix}", tensor)
        replaced = {f"{name}.weight" for name in linears}
        for file in source.weight_files(bf16):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key not in replaced:
                        writer.add(key, f.get_tensor(key))
        writer.finish()
        write_manifest(staging)
        make_config = quantization_config if kind == "aaac" else awq_format.quantization_config
        write_config(config, staging, make_config(GROUP_SIZE, unquantized))
        copy_side_files(bf16, staging)
    if kind == "aaac":
        verify_checkpoint(out, GROUP_SIZE)


def build(out_dir: Path, tokenizer: Path, shape: str = "llama1b", seed: int = 0, log=print) -> dict[str, Path]:
    """Write whatever of OUT_DIR/{bf16,aaac,awq} is missing; return the three folders."""
    folders = {kind: out_dir / kind for kind in FORMATS}
    for kind, folder in folders.items():
        if (folder / "config.json").is_file():
            log(f"synthetic model: keeping {folder}")
            continue
        start = time.perf_counter()
        if kind == "bf16":
            write_bf16(folder, shape, tokenizer, seed)
        else:
            write_quantized(folder, folders["bf16"], kind, seed)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        log(
            f"synthetic model: wrote {folder} ({size / 2**30:.2f} GiB of tensors) "
            f"in {time.perf_counter() - start:.0f} s"
        )
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="writes OUT_DIR/bf16, OUT_DIR/aaac, OUT_DIR/awq")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=ROOT / "artifacts" / "SmolLM2-135M-Instruct",
        help="model folder whose tokenizer files are copied (SmolLM2-135M-Instruct: vocabulary of 49152)",
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="llama1b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out_dir, args.tokenizer, args.shape, args.seed)


if __name__ == "__main__":
    main()

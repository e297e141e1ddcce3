"""The quantizer streams the source model one block at a time: the same weights as transformers loads, the
same checkpoint bytes as quantizing the fully loaded model, and a peak memory bounded by one block."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.experts import PLAIN
from offline_quantize import pipeline, streaming
from offline_quantize.methods import MethodOptions
from offline_quantize.pipeline import Settings, quantize_model
from offline_quantize.source import decoder_blocks

from .conftest import MODEL, TOKENIZER_FILES


def synthetic_llama(folder: Path, hidden: int, intermediate: int, layers: int, shard: str, tied: bool) -> Path:
    """A random Llama with SmolLM2's tokenizer, saved in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard)
    for name in TOKENIZER_FILES:
        shutil.copy(MODEL / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Three blocks in four shards, an untied head."""
    return synthetic_llama(tmp_path_factory.mktemp("sharded") / "m", 128, 256, 3, "5MB", tied=False)


@pytest.mark.parametrize("which", ["bundled", "sharded"])
def test_blocks_hold_what_from_pretrained_loads(which, source_model, sharded):
    from transformers import AutoModelForCausalLM

    path = source_model if which == "bundled" else sharded
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="cpu")
    streamed = streaming.StreamedModel(path)
    assert streamed.module.config._attn_implementation == loaded.config._attn_implementation
    assert all(p.is_meta for p in streamed.module.parameters())
    for name, buffer in loaded.named_buffers():  # the rotary frequencies: computed, not read
        assert torch.equal(streamed.module.get_buffer(name), buffer), name
    expected = dict(loaded.named_parameters())
    blocks = decoder_blocks(streamed.module)
    for block in [*blocks, *streamed.outside_blocks(blocks)]:
        with streamed.loaded([block]):
            prefix = next(n for n, m in streamed.module.named_modules() if m is block)
            for name, param in block.named_parameters():
                want = expected[f"{prefix}.{name}"]
                assert param.dtype == want.dtype and torch.equal(param, want), f"{prefix}.{name}"
        assert all(p.is_meta for p in block.parameters()), f"{prefix} is released"


def test_outside_blocks_is_what_runs_before_them(source_model):
    streamed = streaming.StreamedModel(source_model)
    names = {n for m in streamed.outside_blocks(decoder_blocks(streamed.module)) for n, _ in m.named_parameters()}
    assert names == {"weight"} and len(streamed.outside_blocks(decoder_blocks(streamed.module))) == 2  # embed, norm


class FullyLoaded(streaming.StreamedModel):
    """The whole source model loaded by transformers, as the quantizer did before it streamed."""

    def __init__(self, path: Path, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        self.path, self.files, self.naming = path, streaming._tensor_files(path), PLAIN
        self.module = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="cpu")
        self.module.eval()
        self.module.config.use_cache = False

    def load(self, module):
        pass

    def release(self, module):
        pass


def test_same_bytes_as_the_fully_loaded_model(sharded, small_calib, tmp_path, monkeypatch):
    """AAAC with AWQ scaling: codebooks, and norms folded into and stored from the streamed blocks."""
    settings = Settings(
        group_size=32, nsamples=4, seqlen=64, calib=[small_calib], device="cpu", max_shard_bytes=2 << 20
    )
    settings.method = MethodOptions("aaac", {"awq-scale"})
    quantize_model(sharded, tmp_path / "streamed", settings)
    monkeypatch.setattr(pipeline, "StreamedModel", FullyLoaded)
    quantize_model(sharded, tmp_path / "loaded", settings)
    files = sorted(p.name for p in (tmp_path / "streamed").iterdir() if p.name != "quantization_report.json")
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    for name in files:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "loaded" / name).read_bytes(), name


def test_a_parameter_missing_from_the_shards_is_named(sharded, small_calib, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded, damaged)
    name = "model.layers.1.post_attention_layernorm.weight"
    for file in damaged.glob("*.safetensors"):
        tensors = load_file(file)
        if tensors.pop(name, None) is not None:
            save_file(tensors, file, metadata={"format": "pt"})
    settings = Settings(group_size=32, nsamples=2, seqlen=64, calib=[small_calib], device="cpu")
    with pytest.raises(AAACError, match=f"the model has a parameter {re.escape(name)}, but the safetensors"):
        quantize_model(damaged, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


# Run in a fresh process: in the test process the allocator's state after hundreds of tests (freed but
# kept arenas, fragments) moves the peak by tens of MiB from one machine to another.
_MEASURE = """
import gc, json, re, sys
from pathlib import Path
from offline_quantize.methods import MethodOptions
from offline_quantize.pipeline import Settings, quantize_model
from offline_quantize.report import _host_peak_rss

warm_up, model, out, calib = map(Path, sys.argv[1:])
settings = Settings(group_size=64, nsamples=8, seqlen=128, calib=[calib], device="cpu", max_shard_bytes=8 << 20)
settings.method = MethodOptions("rtn")
# Libraries, tokenizer caches and kernels are loaded by a first run, so that the measured one counts only
# what the model itself costs.
quantize_model(warm_up, out.with_name("warm-up"), Settings(**{**settings.__dict__, "group_size": 32}))
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the present size
before = int(re.search(r"VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) << 10
quantize_model(model, out, settings)
print(json.dumps({"growth": _host_peak_rss() - before}))
"""


def test_peak_memory_is_bounded_by_a_block_not_the_model(tmp_path, small_calib, sharded):
    """24 blocks of 6 MiB (bf16) and a 48 MiB embedding and head each: 240 MiB in all. Streaming holds one
    block at a time, so the peak growth of the process is bounded by what one step holds, whatever the
    number of blocks: the embedding while the first block's inputs are captured, or one block in fp32 with
    the quantizer's temporaries, stated here as 8 copies of the block in fp32; plus a pending shard of
    8 MiB and 48 MiB for the allocator. (Shards are written by copying each tensor's bytes, so writing the
    head or the embedding holds neither.)"""
    model = synthetic_llama(tmp_path / "m", 512, 1536, 24, "64MB", tied=False)
    tensors = streaming._tensor_files(model)
    sizes = {}
    for name, file in tensors.items():
        with safe_open(str(file), framework="pt") as f:
            sizes[name] = f.get_slice(name).get_shape()
    numel = {name: torch.Size(shape).numel() for name, shape in sizes.items()}
    model_bytes = 2 * sum(numel.values())
    block_params = sum(n for name, n in numel.items() if name.startswith("model.layers.0."))
    embedding_bytes = 2 * numel["model.embed_tokens.weight"]
    bound = max(embedding_bytes, 8 * 4 * block_params) + (8 << 20) + (48 << 20)
    assert model_bytes > 4 * (2 * block_params) and model_bytes > bound

    command = [sys.executable, "-c", _MEASURE, sharded, model, tmp_path / "out", small_calib]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])["growth"]
    print(f"peak growth {growth / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB; model {model_bytes / 2**20:.0f} MiB")
    assert growth < bound

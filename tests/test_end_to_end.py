"""SmolLM2 -> AAAC at group size 64 with the real CLI (made by `make` before the tests, see conftest.quantized),
then loaded and evaluated on held-out BBC text; the CLI's own output is checked on the small model it
quantizes for the tests."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from offline_quantize.evaluate import perplexity, token_ids
from offline_quantize.hf_loader import load_causal_lm
from offline_quantize.source import block_linears, decoder_blocks
from offline_quantize.staging import staging_path
from offline_quantize.uniform_grid import rtn_dequantized

from .conftest import GROUP_SIZE, run_cli

EVAL_TOKENS = 2048  # one window: AAAC's lead over RTN (docs/results.md) shows in it


def test_cli_prints_summary_and_progress(tiny_quantize_run):
    source, out, result = tiny_quantize_run
    assert f"aaac checkpoint (aaac format) written to {out}" in result.stdout
    assert "14 linear layers, group size 32" in result.stdout
    assert "2/2" in result.stderr  # the per-block progress bar reached the end
    assert "quantization_config" not in json.loads((source / "config.json").read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny", "tiny-aaac-g32"]  # no staging folder left


def test_checkpoint_has_documented_tensors_and_config(quantized, source_model):
    out = quantized
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant == {
        "quant_method": "aaac",
        "bits": 4,
        "group_size": GROUP_SIZE,
        "num_codebooks": 2,
        "codebook_size": 16,
        "format_version": 1,
        "modules_to_not_convert": ["lm_head"],
    }
    assert config["rope_theta"] == 100000.0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "quantization_report.json"):
        assert (out / name).is_file(), name

    with (
        safe_open(str(out / "model.safetensors"), "pt") as f,
        safe_open(str(source_model / "model.safetensors"), "pt") as s,
    ):
        keys = set(f.keys())
        prefix = "model.layers.0.mlp.down_proj"  # [576, 1536]
        assert f.get_tensor(f"{prefix}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{prefix}.qweight").shape == (1536 // 8, 576)
        assert f.get_tensor(f"{prefix}.scales").dtype == torch.float16
        assert f.get_tensor(f"{prefix}.scales").shape == (1536 // GROUP_SIZE, 576)
        assert f.get_tensor(f"{prefix}.codebooks").shape == (2, 16)
        assert not any(k.endswith("proj.weight") for k in keys)
        assert len([k for k in keys if k.endswith(".codebooks")]) == 210
        # Everything that is not a quantized linear is copied bit for bit.
        for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.7.input_layernorm.weight"):
            assert torch.equal(f.get_tensor(key), s.get_tensor(key))


def test_report_is_machine_readable(quantized):
    out = quantized
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["settings"]["group_size"] == GROUP_SIZE and report["settings"]["calibration_tokens"] == 128 * 512
    assert len(report["layers"]) == 210 and len(report["block_seconds"]) == 30
    summary = report["summary"]
    assert summary["mean_weighted_error"] < 0.75 * summary["mean_rtn_weighted_error"]
    assert 0.05 < summary["mean_codebook1_share"] < 0.95
    assert {"torch", "transformers", "aaac_vllm"} <= set(report["versions"])


def test_source_is_not_modified_and_no_staging_left(quantized, source_model):
    assert not staging_path(quantized).exists()
    assert "quantization_config" not in json.loads((source_model / "config.json").read_text())


@pytest.fixture(scope="module")
def eval_text(bbc_text):
    return bbc_text["eval"].read_text()


def test_perplexity_beats_round_to_nearest(quantized, source_model, eval_text):
    out = quantized
    ids = token_ids(AutoTokenizer.from_pretrained(source_model), eval_text, EVAL_TOKENS)
    aaac_ppl, tokens = perplexity(load_causal_lm(out), ids)
    assert tokens == 2047

    # The fp32 model holds the checkpoint's bf16 values exactly, so this is RTN of the stored weights.
    rtn = load_causal_lm(source_model)
    with torch.no_grad():
        for block in decoder_blocks(rtn):
            for module in block_linears(block).values():
                module.weight.data = rtn_dequantized(module.weight.data, GROUP_SIZE)
    rtn_ppl, _ = perplexity(rtn, ids)
    print(f"perplexity on {tokens} held-out BBC tokens: AAAC-g64 {aaac_ppl:.3f}, RTN-g64 {rtn_ppl:.3f}")
    assert aaac_ppl < rtn_ppl


def test_aaac_eval_json(quantized, bbc_text):
    out = quantized
    result = run_cli("aaac-eval", out, "--text", bbc_text["eval"], "--seqlen", 512, "--max-tokens", 1024, "--json")
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(last) == {"model", "perplexity", "tokens", "seconds"} and last["model"] == str(out)
    assert last["tokens"] == 2 * 511 and 1 < last["perplexity"] < 100

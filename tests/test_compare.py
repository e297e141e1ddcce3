"""Every method end to end with `aaac-compare` on the real SmolLM2 cut to one block, and the checkpoints it writes.

One of SmolLM2's thirty blocks makes no language model (perplexity in the millions, for bf16 too), so
quality is asserted here on the layer errors the reports give; perplexity gaps of the whole model are
what `make compare` measures (docs/results.md).
"""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from offline_quantize.cli import compare_main
from offline_quantize.compare import variants
from offline_quantize.hf_loader import load_causal_lm

from .conftest import in_process, run_cli, vllm_engine

GROUP = 64
TEXTS = ("bbc", "pydoc")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, smollm2_one_block, small_calib, bbc_text, pydoc_text):
    """Every variant calibrated on ``small_calib``, and plain AAAC once more calibrated on it and library code."""
    from offline_quantize.bundled import write_stdlib_code

    workdir = tmp_path_factory.mktemp("compare")
    code = workdir / "code.txt"
    code.write_text(write_stdlib_code(tmp_path_factory.mktemp("code")).read_text()[:100_000])
    result = run_cli(
        "aaac-compare",
        smollm2_one_block,
        workdir,
        "--group-size",
        GROUP,
        "--calib",
        small_calib,
        "--calib-set",
        f"code={small_calib},{code}",
        "--methods",
        "all",
        "aaac@code",
        "--nsamples",
        8,
        "--seqlen",
        256,
        "--text",
        f"bbc={bbc_text['eval']}",
        f"pydoc={pydoc_text}",
        "--eval-seqlen",
        512,
        "--max-tokens",
        1024,
    )
    return workdir, json.loads((workdir / "results.json").read_text()), result.stdout


def test_results_cover_every_method_and_text(comparison):
    workdir, results, stdout = comparison
    assert list(results["methods"]) == [*variants(), "aaac@code"]
    assert results["texts"]["bbc"]["tokens"] == results["texts"]["pydoc"]["tokens"] == 2 * 511
    for label, entry in results["methods"].items():
        for text in TEXTS:
            assert math.isfinite(entry["perplexity"][text]) and entry["perplexity"][text] > 1, label
        if label == "bf16":
            assert entry["format"] == "unquantized" and entry["gap"] == {"bbc": 0.0, "pydoc": 0.0}
            continue
        assert entry["format"] == ("awq" if label.split("+")[0] in ("rtn", "rtn-sym", "gptq", "awq") else "aaac")
        assert entry["quantize_seconds"] > 0 and entry["peak_host_rss_mib"] > 100
        assert entry["gap"]["bbc"] == pytest.approx(
            entry["perplexity"]["bbc"] - results["methods"]["bf16"]["perplexity"]["bbc"]
        )
        rtn_gap = results["methods"]["rtn"]["gap"]["bbc"]
        assert entry["gap_vs_rtn"]["bbc"] == (pytest.approx(entry["gap"]["bbc"] / rtn_gap) if rtn_gap > 0 else None)

    table = (workdir / "results.md").read_text()
    assert table.splitlines()[0].startswith("| method | bbc ppl | bbc gap / RTN gap | pydoc ppl |")
    for label in results["methods"]:
        assert f"| {label} |" in table
    assert table in stdout
    assert (workdir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_calibration_set_calibrates_its_variant_alone(comparison):
    workdir, results, _ = comparison
    common, both = results["calib_sets"]["common"], results["calib_sets"]["code"]
    assert len(common) == 1 and both == [*common, str(workdir / "code.txt")]
    methods = results["methods"]
    assert all(entry["calibration"] == common for label, entry in methods.items() if label not in ("bf16", "aaac@code"))
    assert methods["aaac@code"]["calibration"] == both
    assert methods["aaac@code"]["mean_weighted_error"] != methods["aaac"]["mean_weighted_error"]
    table = (workdir / "results.md").read_text()
    assert f"Calibrated on {common[0]} + {both[1]}: aaac@code." in table


def test_reuse_takes_a_checkpoint_only_with_the_same_settings(
    comparison, tmp_path, smollm2_one_block, small_calib, bbc_text, pydoc_text
):
    workdir, results, _ = comparison
    shutil.copytree(workdir / "aaac", tmp_path / "aaac")

    def compare(*options):
        return in_process(
            compare_main,
            *(smollm2_one_block, tmp_path, "--group-size", GROUP, "--calib", small_calib, "--nsamples", 8),
            *("--seqlen", 256, "--text", f"bbc={bbc_text['eval']}", f"pydoc={pydoc_text}", "--eval-seqlen", 512),
            *("--max-tokens", 1024, "--methods", "aaac", "--reuse", *options),
        )

    same = compare()
    assert same.returncode == 0, same.stderr
    assert "quantizing" not in same.stdout
    reused, before = json.loads((tmp_path / "results.json").read_text())["methods"]["aaac"], results["methods"]["aaac"]
    assert reused["quantize_seconds"] == before["quantize_seconds"]
    assert reused["perplexity"] == pytest.approx(before["perplexity"], rel=1e-4)

    other = compare("--seed", 1)
    assert other.returncode == 2
    assert f"error: --reuse: {tmp_path / 'aaac'} was quantized with another seed than this run asks for" in other.stderr


def test_learned_codebooks_have_lower_error_than_fixed_grids(comparison):
    methods = comparison[1]["methods"]
    rtn = methods["rtn"]["mean_weighted_error"]
    assert methods["rtn"]["mean_rtn_weighted_error"] == pytest.approx(rtn)  # the yardstick is the rtn method itself
    assert methods["aaac"]["mean_weighted_error"] < 0.75 * rtn
    assert methods["aaac"]["mean_weighted_error"] < methods["nf4"]["mean_weighted_error"] < rtn
    assert methods["rtn-sym"]["mean_weighted_error"] > rtn


def test_gptq_awq_and_compensation_lower_the_output_error(comparison):
    """GPTQ and compensation minimise the full output error, AWQ its scaled-and-clipped version."""
    workdir = comparison[0]

    def mean_output_error(label):
        layers = json.loads((workdir / label / "quantization_report.json").read_text())["layers"]
        return sum(v["output_error"] for v in layers.values() if "output_error" in v) / 7

    assert mean_output_error("aaac+compensate") < mean_output_error("aaac+awq")
    assert mean_output_error("gptq") < mean_output_error("awq")
    report = json.loads((workdir / "aaac+awq" / "quantization_report.json").read_text())
    folded = [name for name, v in report["layers"].items() if "awq_alpha" in v]
    assert folded == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp.up_proj",
    ]


def test_awq_scaling_writes_the_folded_norms(comparison, smollm2_one_block):
    workdir = comparison[0]
    with (
        safe_open(str(workdir / "aaac+awq" / "model.safetensors"), "pt") as f,
        safe_open(str(smollm2_one_block / "model.safetensors"), "pt") as s,
    ):
        assert not torch.equal(
            f.get_tensor("model.layers.0.input_layernorm.weight"), s.get_tensor("model.layers.0.input_layernorm.weight")
        )
        assert torch.equal(f.get_tensor("model.norm.weight"), s.get_tensor("model.norm.weight"))


@pytest.mark.parametrize("label", ["gptq", "awq"])
def test_uniform_grid_methods_write_the_awq_format(comparison, label):
    folder = comparison[0] / label
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": GROUP,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        prefix = "model.layers.0.mlp.down_proj"  # [576, 1536]
        assert f.get_tensor(f"{prefix}.qweight").shape == (1536, 576 // 8)
        assert f.get_tensor(f"{prefix}.qzeros").shape == (1536 // GROUP, 576 // 8)
        assert f.get_tensor(f"{prefix}.scales").shape == (1536 // GROUP, 576)


def test_aaac_eval_reads_the_awq_format(comparison, bbc_text):
    workdir, results, _ = comparison
    out = run_cli(
        "aaac-eval", workdir / "gptq", "--text", bbc_text["eval"], "--seqlen", 512, "--max-tokens", 1024, "--json"
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["perplexity"] == pytest.approx(
        results["methods"]["gptq"]["perplexity"]["bbc"], rel=1e-6
    )


def test_vllm_serves_the_awq_format_checkpoints(comparison, bbc_text):
    """vLLM's own awq method on an AWQ-format checkpoint computes what the reference dequantizer means."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not torch.cuda.is_available() and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        pytest.skip("vLLM's CPU build for CPUs without AVX-512 has no AWQ kernel (cpu_gemm_wna16)")
    folder = comparison[0] / "awq"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(bbc_text["eval"].read_text()[:4000], add_special_tokens=False).input_ids[:256]
    model = load_causal_lm(folder)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()

    from vllm import SamplingParams, TokensPrompt

    with vllm_engine(folder, quantization="awq") as llm:
        output = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    nll = -sum(entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1)
    assert nll == pytest.approx(reference, rel=0.02)


def test_stdlib_code_is_a_second_calibration_text_apart_from_the_evaluation_topics(tmp_path, pydoc_text):
    from pydoc_data.topics import topics

    from offline_quantize.bundled import CODE_BYTES, write_stdlib_code

    code = write_stdlib_code(tmp_path).read_text()
    assert CODE_BYTES < len(code.encode()) < 2 * CODE_BYTES
    assert "def " in code and "import " in code
    assert topics["assert"].strip()[:200] not in code and topics["assert"].strip()[:200] in pydoc_text.read_text()

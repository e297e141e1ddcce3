"""Every bad input ends in one line naming what is at fault, exit code 2, no traceback, nothing at OUTPUT.

The commands run in-process (their ``main`` with an argv, as the console scripts call it); the signal
tests need a real process, and test_end_to_end.py runs each command once as one.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from offline_quantize.cli import compare_main, eval_main, quantize_main

from .conftest import BIN, ROOT, in_process, tiny_llama


def fails_with(tmp_path, *args, expect: str) -> str:
    out = tmp_path / "out"
    args = [a if a != "OUT" else out for a in args]
    result = in_process(quantize_main, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines and lines[-1].startswith("error: ") and expect in lines[-1], result.stderr
    assert not out.exists()
    return lines[-1]


def test_source_missing(tmp_path):
    fails_with(
        tmp_path, tmp_path / "nowhere", "OUT", expect=f"source model folder {tmp_path / 'nowhere'} does not exist"
    )


def test_source_not_a_model(tmp_path):
    (tmp_path / "src").mkdir()
    fails_with(tmp_path, tmp_path / "src", "OUT", expect="is not a Hugging Face model folder: it has no config.json")


def test_no_safetensors(tmp_path, source_model):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(source_model / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"pickle is never read")
    fails_with(tmp_path, src, "OUT", expect="has no safetensors weights")


def test_group_size_does_not_divide(tmp_path, source_model, small_calib):
    line = fails_with(
        tmp_path,
        source_model,
        "OUT",
        "--group-size",
        128,
        "--calib",
        small_calib,
        "--nsamples",
        2,
        expect="in_features 576 is not divisible by group size 128",
    )
    assert "layer model.layers.0.self_attn.q_proj" in line and "--group-size 64" in line


def test_group_size_must_be_a_power_of_two(tmp_path, source_model):
    result = in_process(quantize_main, source_model, tmp_path / "out", "--group-size", 48)
    assert result.returncode == 2 and "--group-size: 48 is not a power of two" in result.stderr


def test_nan_weight(tmp_path, small_calib):
    src = tiny_llama(tmp_path / "src", poison="model.layers.1.mlp.up_proj.weight")
    fails_with(
        tmp_path,
        src,
        "OUT",
        "--group-size",
        64,
        "--calib",
        small_calib,
        "--nsamples",
        2,
        "--seqlen",
        64,
        expect="layer model.layers.1.mlp.up_proj: weight contains NaN or Inf",
    )
    assert not list(tmp_path.glob(".out*")), "found after block 0 was done: its progress is removed too"


def test_no_linear_layers(tmp_path, small_calib, source_model):
    from transformers import GPT2Config, GPT2LMHeadModel  # GPT-2 blocks use Conv1D, not nn.Linear

    src = tmp_path / "src"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=49152)).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source_model / name, src / name)
    fails_with(
        tmp_path,
        src,
        "OUT",
        "--calib",
        small_calib,
        "--nsamples",
        2,
        "--seqlen",
        64,
        expect="no quantizable linear layers found",
    )


def test_calibration_empty(tmp_path, source_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    fails_with(tmp_path, source_model, "OUT", "--calib", empty, expect="calibration data is empty")


def test_calibration_too_short(tmp_path, source_model, small_calib):
    line = fails_with(
        tmp_path,
        source_model,
        "OUT",
        "--calib",
        small_calib,
        "--nsamples",
        128,
        "--seqlen",
        512,
        expect="calibration data has",
    )
    assert "65536 needed (128 samples x 512)" in line


def test_calibration_file_missing(tmp_path, source_model):
    fails_with(
        tmp_path,
        source_model,
        "OUT",
        "--calib",
        tmp_path / "nope.txt",
        expect=f"calibration file {tmp_path / 'nope.txt'} does not exist",
    )


def test_output_exists(tmp_path, source_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = in_process(quantize_main, source_model, out)
    assert result.returncode == 2 and "already exists; pass --overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_output_inside_source(tmp_path, source_model):
    src = tmp_path / "src"
    shutil.copytree(source_model, src)
    result = in_process(quantize_main, src, src / "q", "--overwrite")
    assert result.returncode == 2 and "must be outside the source model folder" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_nothing(tmp_path, source_model, small_calib, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            str(BIN / "aaac-quantize"),
            str(source_model),
            str(out),
            "--group-size",
            "64",
            "--calib",
            str(small_calib),
            "--nsamples",
            "8",
            "--seqlen",
            "256",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a terminal delivers it: an earlier test's vLLM engine may leave this process ignoring SIGINT,
        # which a child inherits (and Python then keeps ignoring it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Interrupt once the staging folder exists (the run is under way) and before a block is finished:
    # with no progress to resume, nothing at all may be left (tests/test_resume.py covers the other case).
    deadline = time.monotonic() + 300
    while not (tmp_path / ".out.partial").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted: nothing was written" in stderr
    assert sorted(os.listdir(tmp_path)) == []
    assert "quantization_config" not in json.loads((source_model / "config.json").read_text())


def test_eval_refuses_unknown_format_version(tmp_path, source_model):
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((source_model / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "aaac",
        "bits": 4,
        "group_size": 64,
        "num_codebooks": 2,
        "codebook_size": 16,
        "format_version": 99,
    }
    (model / "config.json").write_text(json.dumps(config))
    text = tmp_path / "t.txt"
    text.write_text("hello")
    result = in_process(eval_main, model, "--text", text)
    assert result.returncode == 2
    assert "AAAC format_version 99 is not supported (this aaac-vllm reads version 1)" in result.stderr


def test_eval_text_missing(tmp_path, source_model):
    result = in_process(eval_main, source_model, "--text", tmp_path / "none.txt")
    assert result.returncode == 2 and f"text file {tmp_path / 'none.txt'} does not exist" in result.stderr


@pytest.mark.parametrize(
    "arguments, expect",
    [
        (["--methods", "aaac@mix"], "method 'aaac@mix': no calibration set 'mix' (--calib-set named: code)"),
        (["--methods", "bf16@code"], "method 'bf16@code': bf16 is not quantized, so it takes no calibration set"),
        (["--methods", "aaac+nothing"], "method 'aaac+nothing': no variant 'aaac+nothing' (known: bf16, aaac,"),
        (["--methods", "all", "aaac"], "method 'aaac' is listed twice"),
        (["--calib-set", "code=CALIB,none.txt"], "calibration set code: file none.txt does not exist"),
        (["--calib-set", "common=CALIB"], "--calib-set: two sets have the same name, or one is named 'common'"),
    ],
)
def test_compare_arguments_are_checked_before_any_work(tmp_path, source_model, small_calib, arguments, expect):
    workdir = tmp_path / "compare"
    arguments = [str(a).replace("CALIB", str(small_calib)) for a in arguments]
    if "--calib-set" not in arguments:
        arguments += ["--calib-set", f"code={small_calib}"]
    result = in_process(compare_main, source_model, workdir, "--text", f"bbc={small_calib}", *arguments)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: {expect}")
    assert not workdir.exists()


def test_hub_name_says_it_is_not_downloaded(tmp_path):
    fails_with(
        tmp_path, "HuggingFaceTB/SmolLM2-135M", "OUT", expect="hub names are not downloaded (the quantizer reads"
    )


def _remote_code_model(folder: Path) -> Path:
    """A tiny Llama whose config names its own code (auto_map), as models on the hub that need
    trust_remote_code do."""
    tiny_llama(folder)
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny-remote'\n"
    )
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "tiny-remote"
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_runs_only_when_trusted(tmp_path, small_calib):
    src = _remote_code_model(tmp_path / "src")
    options = ["--group-size", 32, "--calib", small_calib, "--nsamples", 2, "--seqlen", 64]
    fails_with(tmp_path, src, "OUT", *options, expect="pass --trust-remote-code to run it, if you trust it")
    out = tmp_path / "out"
    result = in_process(quantize_main, src, out, *options, "--trust-remote-code")
    assert result.returncode == 0, result.stderr
    assert (out / "modeling_tiny.py").is_file() and "auto_map" in json.loads((out / "config.json").read_text())
    text = tmp_path / "t.txt"
    text.write_text(small_calib.read_text()[:5000])
    refused = in_process(eval_main, out, "--text", text, "--seqlen", 64)
    assert refused.returncode == 2 and "pass --trust-remote-code" in refused.stderr
    evaluated = in_process(eval_main, out, "--text", text, "--seqlen", 64, "--trust-remote-code")
    assert evaluated.returncode == 0 and "perplexity" in evaluated.stdout, evaluated.stderr


@pytest.mark.parametrize("size, expect", [("3XB", "is not a size such as 500MB"), ("100KB", "less than 1 MiB")])
def test_max_shard_size_is_checked(tmp_path, source_model, size, expect):
    result = in_process(quantize_main, source_model, tmp_path / "out", "--max-shard-size", size)
    assert result.returncode == 2 and "--max-shard-size: " in result.stderr and expect in result.stderr


def test_vllm_benchmark_names_a_checkpoint_folder_it_cannot_serve(tmp_path, source_model, monkeypatch):
    # benchmarks/vllm_cpu.py (a script, not one of the commands above: its SystemExit carries the line)
    # checks the folders it is given before any engine starts: vLLM would take a missing one for a Hub
    # name and fail only after its retries, and the run would go on without it.
    import argparse

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import vllm_cpu

    args = argparse.Namespace(workdir=tmp_path / "work", engines=list(vllm_cpu.ENGINES))
    missing = tmp_path / "missing-awq"
    message = f"error: --model smollm2: the AWQ checkpoint {missing} has no config.json"
    with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
        vllm_cpu.resolve_model("smollm2", f"{source_model}:{missing}:", args)
    assert not args.workdir.exists()

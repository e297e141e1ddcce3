"""Damaged or inconsistent AAAC checkpoints are refused at load, naming the tensor or field, by vLLM and by aaac-eval."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import run_cli, vllm_engine

LAYER = "model.layers.0.self_attn.q_proj"


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])


CASES = {
    "missing codebooks": (lambda f: _edit_tensors(f, lambda t: t.pop(f"{LAYER}.codebooks")),
                          rf"tensor {LAYER}\.codebooks is missing"),
    "scales of the wrong shape": (lambda f: _edit_tensors(f, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].t().contiguous()})),
                                  rf"tensor {LAYER}\.scales has shape"),
    "scales of the wrong dtype": (lambda f: _edit_tensors(f, lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].bfloat16()})),
                                  rf"tensor {LAYER}\.scales has dtype BF16, expected F16"),
    "unknown format version": (lambda f: _edit_config(f, format_version=99), "format_version 99 is not supported"),
    "bits other than 4": (lambda f: _edit_config(f, bits=3), "quantization_config.bits is 3, AAAC requires 4"),
    "group size that does not match": (lambda f: _edit_config(f, group_size=64),
                                       r"\.scales has shape \[\d+, 128\], expected \[\d+, 128\] \(in_features \d+ / group_size 64"),
    "truncated safetensors": (_truncate, r"model\.safetensors: truncated or damaged"),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def broken(request, tiny_quantized, tmp_path) -> tuple[Path, str]:
    damage, message = CASES[request.param]
    folder = tmp_path / "broken"
    shutil.copytree(tiny_quantized, folder)
    damage(folder)
    return folder, message


def test_vllm_refuses_broken_checkpoint(broken):
    folder, message = broken
    with pytest.raises(Exception, match=message):
        with vllm_engine(folder):
            pass


def test_eval_refuses_broken_checkpoint(broken, bbc_text):
    folder, message = broken
    result = run_cli("aaac-eval", folder, "--text", bbc_text["eval"], check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]

"""Damaged, inconsistent and hostile AAAC checkpoints are refused at load, naming the file and tensor or field
at fault, by vLLM and by the transformers loader (aaac-eval), before either reads a tensor into a model.

Each case damages a copy of a small quantized checkpoint. Cases that change tensors or headers rewrite the
manifest too, so that the check behind the manifest is the one under test; the manifest cases leave it stale.
The transformers loader is tried in-process on every case, and ``aaac-eval`` once, as a process, on all of them.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.files import INDEX_FILE
from aaac_kernels.format.manifest import MANIFEST_FILE, write_manifest
from offline_quantize.hf_loader import load_causal_lm

from .conftest import run_cli, vllm_engine

LAYER = "model.layers.0.self_attn.q_proj"
WEIGHTS = "model.safetensors"


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    write_manifest(folder)


def _set(name: str, change):
    return lambda folder: _edit_tensors(folder, lambda t: t.update({name: change(t[name])}))


def _poison(name: str, value: float):
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[3] = value
        return tensor

    return _set(name, change)


def _edit_header(folder: Path, edit) -> None:
    """Rewrite the JSON header of the weights file in place (same length, padded with spaces as safetensors allows)."""
    data = bytearray((folder / WEIGHTS).read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__")  # optional; frees room for the edit
    edit(header)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    assert len(encoded) <= length, "the edited header must fit in the old one"
    data[8 : 8 + length] = encoded.ljust(length, b" ")
    (folder / WEIGHTS).write_bytes(bytes(data))
    write_manifest(folder)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    file = folder / WEIGHTS
    file.write_bytes(file.read_bytes()[:-1000])


def _truncate_without_manifest(folder: Path) -> None:
    (folder / MANIFEST_FILE).unlink()  # as written before manifests existed: the headers catch it
    _truncate(folder)


def _flip_a_bit(folder: Path) -> None:
    """Flip the lowest bit of the first byte of LAYER's qweight: still a valid index, a different weight."""
    data = bytearray((folder / WEIGHTS).read_bytes())
    length = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8 : 8 + length])[f"{LAYER}.qweight"]["data_offsets"]
    data[8 + length + begin] ^= 0x01
    (folder / WEIGHTS).write_bytes(bytes(data))


def _garble_header(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:24] = b"\xff" * 16
    (folder / WEIGHTS).write_bytes(bytes(data))
    write_manifest(folder)


def _absurd_header_length(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[:8] = (1 << 62).to_bytes(8, "little")
    (folder / WEIGHTS).write_bytes(bytes(data))
    write_manifest(folder)


def _index_to(name: str):
    def damage(folder: Path) -> None:
        keys = load_file(folder / WEIGHTS).keys()
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, name)}))

    return damage


def _link_outside(folder: Path) -> None:
    outside = folder.parent / "elsewhere.safetensors"
    shutil.move(folder / WEIGHTS, outside)
    os.symlink(outside, folder / WEIGHTS)


def _pickle_only(folder: Path) -> None:
    torch.save(load_file(folder / WEIGHTS), folder / "pytorch_model.bin")
    (folder / WEIGHTS).unlink()
    (folder / MANIFEST_FILE).unlink()


def _rename_shard(folder: Path) -> None:
    (folder / WEIGHTS).rename(folder / "model-renamed.safetensors")


CASES = {
    # format and consistency
    "missing codebooks": (
        lambda f: _edit_tensors(f, lambda t: t.pop(f"{LAYER}.codebooks")),
        rf"tensor {LAYER}\.codebooks is missing",
    ),
    "scales of the wrong shape": (
        _set(f"{LAYER}.scales", lambda t: t.t().contiguous()),
        rf"tensor {LAYER}\.scales has shape",
    ),
    "scales of the wrong dtype": (
        _set(f"{LAYER}.scales", lambda t: t.bfloat16()),
        rf"tensor {LAYER}\.scales has dtype BF16, expected F16",
    ),
    "qweight of the wrong dtype": (
        _set(f"{LAYER}.qweight", lambda t: t.float()),
        rf"tensor {LAYER}\.qweight has dtype F32, expected I32",
    ),
    "unknown format version": (lambda f: _edit_config(f, format_version=99), "format_version 99 is not supported"),
    "bits other than 4": (lambda f: _edit_config(f, bits=3), "quantization_config.bits is 3, AAAC requires 4"),
    "group size that does not match": (
        lambda f: _edit_config(f, group_size=64),
        r"\.scales has shape \[\d+, 128\], expected \[\d+, 128\] \(in_features \d+ / group_size 64",
    ),
    # values a kernel would turn into silently wrong output
    "NaN in a codebook": (_poison(f"{LAYER}.codebooks", float("nan")), rf"tensor {LAYER}\.codebooks holds NaN or Inf"),
    "Inf in a scale": (_poison(f"{LAYER}.scales", float("inf")), rf"tensor {LAYER}\.scales holds NaN or Inf"),
    # damaged files
    "truncated file": (_truncate, r"model\.safetensors: \d+ bytes, the manifest says \d+ \(truncated or damaged\)"),
    "truncated file, no manifest": (_truncate_without_manifest, r"model\.safetensors: truncated or damaged"),
    "a flipped bit": (_flip_a_bit, r"model\.safetensors: SHA-256 differs from the manifest"),
    "a file the manifest does not list": (_rename_shard, rf"model-renamed\.safetensors: not listed in {MANIFEST_FILE}"),
    "damaged manifest": (lambda f: (f / MANIFEST_FILE).write_text("{not json"), rf"{MANIFEST_FILE}: damaged manifest"),
    # hostile headers
    "header that is not JSON": (_garble_header, r"model\.safetensors: damaged safetensors header \(not valid JSON\)"),
    "absurd header length": (
        _absurd_header_length,
        r"model\.safetensors: truncated or not a safetensors file \(header of",
    ),
    "absurd shape": (
        lambda f: _edit_header(f, lambda h: h[f"{LAYER}.codebooks"].update(shape=[1 << 40, 8])),
        rf"tensor {LAYER}\.codebooks has shape \[1099511627776, 8\] and data offsets .* do not agree",
    ),
    "unknown dtype": (
        lambda f: _edit_header(f, lambda h: h[f"{LAYER}.codebooks"].update(dtype="Q4")),
        rf"tensor {LAYER}\.codebooks has unknown dtype 'Q4'",
    ),
    # files outside the model folder, and pickle
    "index that climbs out with ../": (
        _index_to("../outside.safetensors"),
        r"shard '\.\./outside\.safetensors' is not a \.safetensors file name inside the model folder",
    ),
    "index with an absolute path": (_index_to("/etc/passwd.safetensors"), r"shard '/etc/passwd\.safetensors' is not"),
    "damaged index": (
        lambda f: (f / INDEX_FILE).write_text('{"weight_map": ['),
        rf"{re.escape(INDEX_FILE)}: damaged shard index",
    ),
    "link that leads outside": (
        _link_outside,
        r"model\.safetensors: links to .*elsewhere\.safetensors, outside the model folder",
    ),
    "pickle weights only": (
        _pickle_only,
        r"has no safetensors weights \(found pytorch_model\.bin: only safetensors are read",
    ),
}


def _broken_copy(tiny_quantized: Path, folder: Path, case: str) -> tuple[Path, str]:
    damage, message = CASES[case]
    shutil.copytree(tiny_quantized, folder)
    damage(folder)
    return folder, message


@pytest.fixture(params=list(CASES), ids=list(CASES))
def broken(request, tiny_quantized, tmp_path) -> tuple[Path, str]:
    return _broken_copy(tiny_quantized, tmp_path / "broken", request.param)


def test_quantizer_writes_a_manifest(tiny_quantized):
    manifest = json.loads((tiny_quantized / MANIFEST_FILE).read_text())["files"]
    assert list(manifest) == [WEIGHTS]
    assert manifest[WEIGHTS]["size"] == (tiny_quantized / WEIGHTS).stat().st_size
    assert re.fullmatch(r"[0-9a-f]{64}", manifest[WEIGHTS]["sha256"])


def test_vllm_refuses_broken_checkpoint(broken):
    folder, message = broken
    with pytest.raises(Exception, match=message):
        with vllm_engine(folder):
            pass


def test_transformers_loader_refuses_broken_checkpoint(broken):
    folder, message = broken
    with pytest.raises(AAACError, match=message):
        load_causal_lm(folder)


def test_eval_reports_every_broken_checkpoint_in_one_run(tiny_quantized, tmp_path, bbc_text):
    """One aaac-eval process over every case and an intact copy: one ``error:`` line per broken checkpoint, in
    order, each naming what is at fault; the intact one still evaluated; exit code 2."""
    folders = [_broken_copy(tiny_quantized, tmp_path / f"case-{i}", case) for i, case in enumerate(CASES)]
    result = run_cli(
        "aaac-eval",
        *[f for f, _ in folders],
        tiny_quantized,
        "--text",
        bbc_text["eval"],
        "--seqlen",
        128,
        "--max-tokens",
        256,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(CASES), result.stderr[-3000:]
    for (_, message), line in zip(folders, errors):
        assert re.search(message, line), line
    assert result.stdout.startswith(f"{tiny_quantized}: perplexity ")


def test_checksums_can_be_switched_off(tiny_quantized, tmp_path, monkeypatch):
    # A flipped bit in a weight is then not caught (sizes still are), and the checkpoint loads.
    folder = tmp_path / "flipped"
    shutil.copytree(tiny_quantized, folder)
    _flip_a_bit(folder)
    with pytest.raises(AAACError, match="SHA-256 differs"):
        load_causal_lm(folder)
    monkeypatch.setenv("AAAC_VERIFY_SHA256", "0")
    load_causal_lm(folder)

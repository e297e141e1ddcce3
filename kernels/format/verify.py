"""Everything a loader checks before it allocates anything: the manifest, every safetensors header, the
tensors of every quantized layer against each other and the group size, and codebooks and scales for
NaN or Inf. Each refusal is an AAACError naming the file and tensor at fault.
"""

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import AAACError
from .files import tensor_files
from .layout import CODEBOOK_SIZE, NUM_CODEBOOKS, PACK_FACTOR
from .manifest import verify_manifest

# Set to 0 to skip the SHA-256 sums at load (sizes are always checked): a 70B checkpoint is ~37 GB to read.
VERIFY_SHA256_ENV = "AAAC_VERIFY_SHA256"
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


def verify_checkpoint(path: Path, group_size: int) -> set[str]:
    """All of the checks above on the AAAC checkpoint at ``path``; returns the quantized layer prefixes.

    SHA-256 sums are compared unless ``AAAC_VERIFY_SHA256=0``.
    """
    verify_manifest(path, checksums=os.environ.get(VERIFY_SHA256_ENV, "1") != "0")
    layers = check_tensors(path, group_size)
    check_values(path, layers)
    return layers


def check_tensors(path: Path, group_size: int) -> set[str]:
    """Check every shard and every quantized layer from the safetensors headers alone; return the layer prefixes.

    Reads a few kilobytes per file, so a loader can refuse a damaged or inconsistent checkpoint before
    it allocates anything.
    """
    headers = {}
    for file in tensor_files(path):
        for name, info in read_header(file).items():
            headers[name] = (file, info)
    layers = {name[: -len(".qweight")] for name in headers if name.endswith(".qweight")}
    for name in headers:
        for part in (".scales", ".codebooks"):
            if name.endswith(part) and name[: -len(part)] not in layers:
                raise AAACError(f"{headers[name][0]}: tensor {name} has no matching {name[: -len(part)]}.qweight")
    for prefix in sorted(layers):
        for part in ("scales", "codebooks"):
            if f"{prefix}.{part}" not in headers:
                raise AAACError(f"{path}: tensor {prefix}.{part} is missing for quantized layer {prefix}")
        file, qweight = headers[f"{prefix}.qweight"]
        _expect(file, qweight, f"{prefix}.qweight", "I32", None)
        if len(qweight["shape"]) != 2:
            raise AAACError(
                f"{file}: tensor {prefix}.qweight has shape {qweight['shape']}, "
                "expected [in_features // 8, out_features]"
            )
        rows, n = qweight["shape"]
        k = rows * PACK_FACTOR
        if k % group_size:
            raise AAACError(
                f"{file}: tensor {prefix}.qweight holds {k} input features, not a multiple of "
                f"quantization_config.group_size {group_size}"
            )
        _expect(
            *headers[f"{prefix}.scales"],
            f"{prefix}.scales",
            "F16",
            [k // group_size, n],
            f"(in_features {k} / group_size {group_size}, out_features {n})",
        )
        _expect(*headers[f"{prefix}.codebooks"], f"{prefix}.codebooks", "F16", [NUM_CODEBOOKS, CODEBOOK_SIZE])
    return layers


def check_values(path: Path, layers: set[str]) -> None:
    """Refuse NaN or Inf in any codebook or scale: a kernel would turn them into silently wrong outputs."""
    for file in tensor_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith((".codebooks", ".scales")) and name.rsplit(".", 1)[0] in layers:
                    if not torch.isfinite(f.get_tensor(name)).all():
                        raise AAACError(f"{file}: tensor {name} holds NaN or Inf values")


def read_header(file: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header, after checking that the file holds all the bytes they name."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise AAACError(f"{file}: not a safetensors file (truncated: {size} bytes)")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise AAACError(f"{file}: truncated or not a safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AAACError(f"{file}: damaged safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise AAACError(f"{file}: damaged safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(file, name, info)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + end != size:
        raise AAACError(f"{file}: truncated or damaged: its header names {8 + length + end} bytes, the file has {size}")
    return header


def _check_entry(file: Path, name: str, info) -> None:
    """One header entry: a known dtype, a shape of non-negative sizes, and data offsets that span exactly its bytes."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        sizes_ok = all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end])
    except (TypeError, KeyError, ValueError):
        raise AAACError(
            f"{file}: damaged safetensors header (entry {name!r} lacks dtype, shape or data_offsets)"
        ) from None
    if dtype not in _DTYPE_BYTES:
        raise AAACError(f"{file}: tensor {name} has unknown dtype {dtype!r}")
    if not sizes_ok or end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise AAACError(f"{file}: tensor {name} has shape {shape} and data offsets {[begin, end]} that do not agree")


def _expect(file: Path, info: dict, name: str, dtype: str, shape: list[int] | None, why: str = "") -> None:
    if info["dtype"] != dtype:
        raise AAACError(f"{file}: tensor {name} has dtype {info['dtype']}, expected {dtype}")
    if shape is not None and list(info["shape"]) != shape:
        raise AAACError(f"{file}: tensor {name} has shape {list(info['shape'])}, expected {shape} {why}".rstrip())

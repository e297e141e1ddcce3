"""The AAAC checkpoint on disk: config, safetensors shards, side files, report; written atomically."""

import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aaac_kernels.format import BITS, CODEBOOK_SIZE, FORMAT_VERSION, NUM_CODEBOOKS, PACK_FACTOR

from .errors import AAACError
from .progress import PROGRESS_DIR

REPORT_FILE = "quantization_report.json"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "aaac_manifest.json"
# Set to 0 to skip the SHA-256 sums at load (sizes are always checked): a 70B checkpoint is ~37 GB to read.
VERIFY_SHA256_ENV = "AAAC_VERIFY_SHA256"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def quantization_config(group_size: int, modules_to_not_convert: list[str]) -> dict:
    return {
        "quant_method": "aaac",
        "bits": BITS,
        "group_size": group_size,
        "num_codebooks": NUM_CODEBOOKS,
        "codebook_size": CODEBOOK_SIZE,
        "format_version": FORMAT_VERSION,
        "modules_to_not_convert": modules_to_not_convert,
    }


def staging_path(output: Path) -> Path:
    """Where a run builds ``output``: a hidden sibling, renamed to ``output`` only when complete."""
    return output.parent / f".{output.name}.partial"


@contextmanager
def staging_folder(output: Path, resume: bool = False):
    """Yield the staging folder of ``output``; it replaces ``output`` only if the block finishes.

    Ctrl-C, SIGTERM, a crash or an error leave ``output`` as it was (the old folder, or none), never a
    partial one. A staging folder that holds progress (``.progress/``, see progress.py) is kept for
    ``--resume``; otherwise it is removed. Without ``resume`` an earlier staging folder is discarded.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(output)
    if staging.exists() and not resume:
        shutil.rmtree(staging)
    staging.mkdir(exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield staging
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, trash / output.name)
            os.replace(staging, output)
            shutil.rmtree(trash)
        else:
            os.replace(staging, output)
    except BaseException:
        if not (staging / PROGRESS_DIR).is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class ShardWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes``, then names and indexes them."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_bytes = folder, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().cpu().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (path, keys), name in zip(self.shards, names):
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer, generation config, chat template: every top-level file that is not weights or config.json."""
    for item in source.iterdir():
        if item.is_file() and item.name != "config.json" and item.name != INDEX_FILE and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, target / item.name)


def write_config(source_config: dict, target: Path, quant_config: dict) -> None:
    config = dict(source_config)
    config["quantization_config"] = quant_config
    # Readers that predate rope_parameters fall back to rope_theta = 10000 and
    # silently degrade the model: keep the value at the top level too.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every tensor file (and the shard index) in ``aaac_manifest.json``."""
    files = [*tensor_files(folder), *([folder / INDEX_FILE] if (folder / INDEX_FILE).is_file() else [])]
    entries = {file.name: {"size": file.stat().st_size, "sha256": _sha256(file)} for file in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=2) + "\n")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ---- reading ---------------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """config.json of a model folder."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise AAACError(f"{path} is not a Hugging Face model folder: it has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AAACError(f"{config_file} is not valid JSON ({exc})") from None


def read_quant_config(path: Path) -> tuple[dict, dict]:
    """(config.json, its quantization_config), checked against the format this code reads."""
    config = read_config(path)
    quant = config.get("quantization_config")
    if quant is None or quant.get("quant_method") != "aaac":
        return config, {}
    check_quant_config(quant, str(path / "config.json"))
    return config, quant


def check_quant_config(quant: dict, where: str) -> None:
    """Refuse a quantization_config this code cannot read; ``where`` names its file in the message."""
    if quant.get("format_version") != FORMAT_VERSION:
        raise AAACError(
            f"{where}: AAAC format_version {quant.get('format_version')!r} is not supported "
            f"(this aaac-vllm reads version {FORMAT_VERSION}); upgrade aaac-vllm or re-quantize"
        )
    expected = {"bits": BITS, "num_codebooks": NUM_CODEBOOKS, "codebook_size": CODEBOOK_SIZE}
    for key, value in expected.items():
        if quant.get(key) != value:
            raise AAACError(f"{where}: quantization_config.{key} is {quant.get(key)!r}, AAAC requires {value}")
    group_size = quant.get("group_size")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or group_size % PACK_FACTOR:
        raise AAACError(
            f"{where}: quantization_config.group_size is {group_size!r}, expected a positive multiple of {PACK_FACTOR}"
        )
    skipped = quant.get("modules_to_not_convert", [])
    if not isinstance(skipped, list) or not all(isinstance(name, str) for name in skipped):
        raise AAACError(f"{where}: quantization_config.modules_to_not_convert must be a list of module names")


def tensor_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder (from its shard index when it has one), each checked to lie
    inside the folder. Only safetensors are ever read: pickle-based weight files are not loaded."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise AAACError(f"{index}: damaged shard index (expected JSON with a weight_map object)") from None
        files = [_shard_path(path, name, index) for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
        found = f" (found {', '.join(pickled[:3])}: only safetensors are read, never pickle-based files)" if pickled else ""
        raise AAACError(f"{path} has no safetensors weights{found}")
    for file in files:
        _check_inside(path, file)
    return files


def _shard_path(folder: Path, name, index: Path) -> Path:
    if not isinstance(name, str) or not name.endswith(".safetensors") or name != Path(name).name:
        raise AAACError(f"{index}: shard {name!r} is not a .safetensors file name inside the model folder")
    return folder / name


def _check_inside(folder: Path, file: Path) -> None:
    """Refuse a tensor file that is missing, not a regular file, or a link that leads out of the model folder.

    A Hugging Face cache snapshot (``<repo>/snapshots/<revision>/``) links its files to ``<repo>/blobs/``,
    which is allowed.
    """
    if not file.is_file():
        raise AAACError(f"{file}: tensor file is missing or not a regular file")
    target = file.resolve()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    if not any(target.is_relative_to(root) for root in roots):
        raise AAACError(f"{file}: links to {target}, outside the model folder; refusing to read it")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in tensor_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise AAACError(f"{file}: cannot read safetensors file ({exc})") from None
    return tensors


def verify_checkpoint(path: Path, group_size: int) -> set[str]:
    """Everything a loader checks before it allocates anything; returns the quantized layer prefixes.

    The manifest (sizes, and SHA-256 sums unless ``AAAC_VERIFY_SHA256=0``), every safetensors header,
    the tensors of every quantized layer against each other and ``group_size``, and the codebooks and
    scales for NaN or Inf. Raises AAACError naming the file and tensor at fault.
    """
    verify_manifest(path, checksums=os.environ.get(VERIFY_SHA256_ENV, "1") != "0")
    layers = check_tensors(path, group_size)
    check_values(path, layers)
    return layers


def verify_manifest(path: Path, checksums: bool = True) -> None:
    """Compare the tensor files with ``aaac_manifest.json``. Checkpoints written before manifests existed
    have none and pass."""
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.exists():
        return
    try:
        entries = json.loads(manifest_file.read_text())["files"]
        expected = {name: (int(e["size"]), str(e["sha256"])) for name, e in entries.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise AAACError(f"{manifest_file}: damaged manifest (expected JSON with a files object)") from None
    for file in tensor_files(path):
        if file.name not in expected:
            raise AAACError(f"{file}: not listed in {MANIFEST_FILE}; the checkpoint was changed after it was written")
    for name, (size, sha256) in expected.items():
        file = _shard_path(path, name, manifest_file) if name != INDEX_FILE else path / name
        _check_inside(path, file)
        if file.stat().st_size != size:
            raise AAACError(f"{file}: {file.stat().st_size} bytes, the manifest says {size} (truncated or damaged)")
        if checksums and _sha256(file) != sha256:
            raise AAACError(f"{file}: SHA-256 differs from the manifest (the file is damaged or was changed)")


def check_values(path: Path, layers: set[str]) -> None:
    """Refuse NaN or Inf in any codebook or scale: a kernel would turn them into silently wrong outputs."""
    for file in tensor_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith((".codebooks", ".scales")) and name.rsplit(".", 1)[0] in layers:
                    if not torch.isfinite(f.get_tensor(name)).all():
                        raise AAACError(f"{file}: tensor {name} holds NaN or Inf values")


def check_tensors(path: Path, group_size: int) -> set[str]:
    """Check every shard and every quantized layer from the safetensors headers alone; return the layer prefixes.

    Reads a few kilobytes per file, so a loader can refuse a damaged or
    inconsistent checkpoint before it allocates anything.
    """
    headers = {}
    for file in tensor_files(path):
        for name, info in _read_header(file).items():
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
        _expect(file, f"{prefix}.qweight", qweight, "I32", None)
        if len(qweight["shape"]) != 2:
            raise AAACError(f"{file}: tensor {prefix}.qweight has shape {qweight['shape']}, expected [in_features // 8, out_features]")
        rows, n = qweight["shape"]
        k = rows * PACK_FACTOR
        if k % group_size:
            raise AAACError(
                f"{file}: tensor {prefix}.qweight holds {k} input features, not a multiple of "
                f"quantization_config.group_size {group_size}"
            )
        _expect(headers[f"{prefix}.scales"][0], f"{prefix}.scales", headers[f"{prefix}.scales"][1], "F16",
                [k // group_size, n], f"(in_features {k} / group_size {group_size}, out_features {n})")
        _expect(headers[f"{prefix}.codebooks"][0], f"{prefix}.codebooks", headers[f"{prefix}.codebooks"][1], "F16",
                [NUM_CODEBOOKS, CODEBOOK_SIZE])
    return layers


def _expect(file: Path, name: str, info: dict, dtype: str, shape: list[int] | None, why: str = "") -> None:
    if info["dtype"] != dtype:
        raise AAACError(f"{file}: tensor {name} has dtype {info['dtype']}, expected {dtype}")
    if shape is not None and list(info["shape"]) != shape:
        raise AAACError(f"{file}: tensor {name} has shape {list(info['shape'])}, expected {shape} {why}".rstrip())


def _check_entry(file: Path, name: str, info) -> None:
    """One header entry: a known dtype, a shape of non-negative sizes, and data offsets that span exactly its bytes."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        sizes_ok = all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end])
    except (TypeError, KeyError, ValueError):
        raise AAACError(f"{file}: damaged safetensors header (entry {name!r} lacks dtype, shape or data_offsets)") from None
    if dtype not in _DTYPE_BYTES:
        raise AAACError(f"{file}: tensor {name} has unknown dtype {dtype!r}")
    if not sizes_ok or end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise AAACError(f"{file}: tensor {name} has shape {shape} and data offsets {[begin, end]} that do not agree")


def _read_header(file: Path) -> dict[str, dict]:
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
        raise AAACError(
            f"{file}: truncated or damaged: its header names {8 + length + end} bytes, the file has {size}"
        )
    return header

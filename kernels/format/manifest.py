"""``aaac_manifest.json``: the size and SHA-256 of every tensor file, written last and checked at load."""

import hashlib
import json
from pathlib import Path

from .errors import AAACError
from .files import INDEX_FILE, check_inside, shard_path, tensor_files

MANIFEST_FILE = "aaac_manifest.json"


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every tensor file (and the shard index) in ``aaac_manifest.json``."""
    files = [*tensor_files(folder), *([folder / INDEX_FILE] if (folder / INDEX_FILE).is_file() else [])]
    entries = {file.name: {"size": file.stat().st_size, "sha256": _sha256(file)} for file in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=2) + "\n")


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
        file = shard_path(path, name, manifest_file) if name != INDEX_FILE else path / name
        check_inside(path, file)
        if file.stat().st_size != size:
            raise AAACError(f"{file}: {file.stat().st_size} bytes, the manifest says {size} (truncated or damaged)")
        if checksums and _sha256(file) != sha256:
            raise AAACError(f"{file}: SHA-256 differs from the manifest (the file is damaged or was changed)")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()

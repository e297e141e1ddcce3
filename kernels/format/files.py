"""The files of a checkpoint folder: safetensors shards (and their index), side files; reading and writing.

Only safetensors are ever read: pickle-based weight files are refused, and a shard that is a link
leading out of the folder is not followed.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AAACError

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def tensor_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder (from its shard index when it has one), each checked to lie
    inside the folder."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise AAACError(f"{index}: damaged shard index (expected JSON with a weight_map object)") from None
        files = [shard_path(path, name, index) for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        found = (
            f" (found {', '.join(pickled[:3])}: only safetensors are read, never pickle-based files)" if pickled else ""
        )
        raise AAACError(f"{path} has no safetensors weights{found}")
    for file in files:
        check_inside(path, file)
    return files


def shard_path(folder: Path, name, listed_in: Path) -> Path:
    """The path of shard ``name`` as ``listed_in`` (an index or a manifest) names it: a plain file name."""
    if not isinstance(name, str) or not name.endswith(".safetensors") or name != Path(name).name:
        raise AAACError(f"{listed_in}: shard {name!r} is not a .safetensors file name inside the model folder")
    return folder / name


def check_inside(folder: Path, file: Path) -> None:
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
    """Every tensor of a model folder, by name."""
    tensors = {}
    for file in tensor_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise AAACError(f"{file}: cannot read safetensors file ({exc})") from None
    return tensors


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
        """Name the shards as transformers does (and write the index when there are several); returns the names."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
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
        if item.is_file() and item.name not in ("config.json", INDEX_FILE) and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, target / item.name)

"""The files of a checkpoint folder: safetensors shards (and their index), side files; reading and writing.

Only safetensors are ever read: pickle-based weight files are refused, and a shard that is a link
leading out of the folder is not followed.
"""

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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


# torch dtype -> safetensors' name, in safetensors' order of dtypes: its writer puts a file's tensors in
# descending order of this rank, then by name.
_DTYPE_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_DTYPE_RANK = {name: rank for rank, name in enumerate(_DTYPE_NAMES.values())}
_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as it lies in a safetensors file: copied into a shard by its bytes, never read into memory."""

    file: Path
    dtype: str  # safetensors' name: "BF16", "I32", ...
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def stored_tensors(file: Path) -> dict[str, StoredTensor]:
    """Where each tensor of a safetensors file lies in it, from the file's header; by name, as ``safe_open``
    lists them."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    data = 8 + length
    stored = {}
    for name, info in sorted(header.items()):
        start, end = info["data_offsets"]
        stored[name] = StoredTensor(file, info["dtype"], tuple(info["shape"]), data + start, data + end)
    return stored


class ShardWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes``, then names and indexes them.

    A shard is written as safetensors writes it (the same bytes as ``safetensors.torch.save_file``), but
    tensor by tensor: a ``StoredTensor`` is copied from its file in chunks, so copying a source model's
    embedding or a finished block costs no memory of its size.
    """

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_bytes = folder, max_shard_bytes
        self.pending: dict[str, torch.Tensor | StoredTensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach().cpu().contiguous()
        size = _nbytes(tensor)
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.shards):05d}.tmp"
        write_safetensors(path, self.pending)
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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor | StoredTensor]) -> None:
    """One safetensors file (metadata ``format: pt``), written tensor by tensor."""
    dtypes = {name: _dtype_name(name, tensor) for name, tensor in tensors.items()}
    names = sorted(tensors, key=lambda name: (-_DTYPE_RANK[dtypes[name]], name))
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = _nbytes(tensors[name])
        header[name] = {
            "dtype": dtypes[name],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for tensor in (tensors[name] for name in names):
            if isinstance(tensor, torch.Tensor):
                out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            else:
                _copy_range(tensor, out)


def _nbytes(tensor: torch.Tensor | StoredTensor) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else tensor.nbytes


def _dtype_name(name: str, tensor: torch.Tensor | StoredTensor) -> str:
    """Safetensors' name of the tensor's dtype, one its writer knows how to order."""
    dtype = _DTYPE_NAMES.get(tensor.dtype) if isinstance(tensor, torch.Tensor) else tensor.dtype
    if dtype not in _DTYPE_RANK:
        raise AAACError(f"tensor {name}: dtype {tensor.dtype} cannot be written to a safetensors shard here")
    return dtype


def _copy_range(tensor: StoredTensor, out) -> None:
    buffer = bytearray(min(_COPY_CHUNK, tensor.nbytes))
    with open(tensor.file, "rb") as source:
        source.seek(tensor.start)
        left = tensor.nbytes
        while left:
            view = memoryview(buffer)[: min(left, len(buffer))]
            if source.readinto(view) != len(view):
                raise AAACError(f"{tensor.file}: ends inside a tensor's data")
            out.write(view)
            left -= len(view)


def copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer, generation config, chat template: every top-level file that is not weights or config.json."""
    for item in source.iterdir():
        if item.is_file() and item.name not in ("config.json", INDEX_FILE) and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, target / item.name)

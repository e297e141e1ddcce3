"""Per-block progress of a quantization run, kept so that ``aaac-quantize --resume`` continues after a kill.

It lives in ``.progress/`` inside the run's staging folder (never at the output path). After block i:
``block-0000i.safetensors`` (its packed tensors), ``inputs.safetensors`` (what block i + 1 will be fed:
the calibration activations after the quantized blocks, which are the only state the later blocks need)
and, last, ``progress.json``: the commit point. A kill at any moment leaves either the old commit or
the new one. All of it is safetensors and JSON, never pickle.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aaac_kernels.format.errors import AAACError

PROGRESS_DIR = ".progress"
_STATE = "progress.json"
_INPUTS = "inputs.safetensors"


class Progress:
    def __init__(self, staging: Path, fingerprint: dict):
        self.folder = staging / PROGRESS_DIR
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples become lists)
        self.blocks_done = 0
        self.resumed_from = 0
        self.layers: dict[str, dict] = {}
        self.block_seconds: list[float] = []
        self.step_seconds: dict[str, float] = {}  # summed over the blocks (report.StepClock's steps)

    def start(self, resume: bool) -> int:
        """Begin a run in the staging folder; returns how many blocks are done (0 unless ``resume`` finds a
        committed state). Shards of an interrupted run are removed: they are rebuilt from its blocks."""
        done = self._load() if resume else 0
        for stale in self.folder.parent.iterdir():
            if stale != self.folder:
                stale.unlink()
        return done

    def _load(self) -> int:
        """Load the last committed state; returns how many blocks are done (0 when there is none).

        Refuses progress made from another source model or with other settings: its blocks would not
        fit this run.
        """
        state_file = self.folder / _STATE
        if not state_file.is_file():
            return 0
        state = json.loads(state_file.read_text())
        if state["fingerprint"] != self.fingerprint:
            changed = sorted(k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k])
            raise AAACError(
                f"the interrupted run in {self.folder.parent} used another {', '.join(changed)}; "
                "rerun with the same options, or without --resume to start over"
            )
        self.blocks_done, self.layers, self.block_seconds, self.step_seconds = (
            state["blocks_done"],
            state["layers"],
            state["block_seconds"],
            state["step_seconds"],
        )
        self.resumed_from = self.blocks_done
        return self.blocks_done

    def commit(
        self,
        block: int,
        tensors: dict[str, torch.Tensor],
        layers: dict[str, dict],
        step_seconds: dict[str, float],
        inputs: list[torch.Tensor],
    ) -> None:
        """Record block ``block`` as finished, with the seconds of its steps and the inputs of the next block."""
        self.folder.mkdir(exist_ok=True)
        _save(tensors, self.block_file(block))
        _save({str(i): t for i, t in enumerate(inputs)}, self.folder / _INPUTS)
        self.blocks_done = block + 1
        self.layers.update(layers)
        self.block_seconds.append(sum(step_seconds.values()))
        for step, seconds in step_seconds.items():
            self.step_seconds[step] = self.step_seconds.get(step, 0.0) + seconds
        state = {
            "fingerprint": self.fingerprint,
            "blocks_done": self.blocks_done,
            "layers": self.layers,
            "block_seconds": self.block_seconds,
            "step_seconds": self.step_seconds,
        }
        _replace(self.folder / _STATE, lambda tmp: tmp.write_text(json.dumps(state) + "\n"))

    def inputs(self, device: torch.device) -> list[torch.Tensor]:
        saved = load_file(self.folder / _INPUTS, device=str(device))
        return [saved[str(i)] for i in range(len(saved))]

    def block_file(self, block: int) -> Path:
        return self.folder / f"block-{block:05d}.safetensors"

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _replace(path, lambda tmp: save_file(tensors, str(tmp)))


def _replace(path: Path, write) -> None:
    """Write through a temporary file and rename it into place, so that ``path`` is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)

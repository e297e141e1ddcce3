"""A quantization run killed mid-way resumes from its last finished block and writes the same bytes as an
uninterrupted run; nothing ever appears at the output path before the run completes.

The runs that are interrupted are processes (a signal is sent to them); the others run in-process."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from offline_quantize.cli import quantize_main
from offline_quantize.progress import PROGRESS_DIR
from offline_quantize.report import REPORT_FILE
from offline_quantize.staging import staging_path

from .conftest import BIN, in_process, tiny_llama

LAYERS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_calib) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("resume")
    source = tiny_llama(root / "source", hidden=128, layers=LAYERS)
    options = ["--group-size", 32, "--calib", small_calib, "--nsamples", 8, "--seqlen", 128, "--device", "cpu"]
    return source, options


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> Path:
    source, options = setup
    out = tmp_path_factory.mktemp("whole") / "aaac"
    assert in_process(quantize_main, source, out, *options).returncode == 0
    return out


def _interrupted_run(source: Path, out: Path, options: list, sig: signal.Signals, after_blocks: int) -> tuple[int, str]:
    """Start aaac-quantize, send ``sig`` once ``after_blocks`` blocks are committed; returns (blocks done, stderr)."""
    state = staging_path(out) / PROGRESS_DIR / "progress.json"
    process = subprocess.Popen(
        [str(BIN / "aaac-quantize"), *map(str, [source, out, *options])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not (state.is_file() and json.loads(state.read_text())["blocks_done"] >= after_blocks):
        assert process.poll() is None, f"the run ended before it could be interrupted:\n{process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert not out.exists(), "an interrupted run left something at the output path"
    return json.loads(state.read_text())["blocks_done"], stderr


def _same_checkpoint(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != REPORT_FILE:  # holds timings
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def test_killed_run_resumes_to_identical_checkpoint(setup, uninterrupted, tmp_path):
    source, options = setup
    out = tmp_path / "aaac"
    done, _ = _interrupted_run(source, out, options, signal.SIGKILL, after_blocks=3)
    assert 3 <= done < LAYERS
    assert in_process(quantize_main, source, out, *options, "--resume").returncode == 0
    _same_checkpoint(uninterrupted, out)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["resumed_from_block"] == done
    assert len(report["block_seconds"]) == LAYERS
    assert not staging_path(out).exists()


def test_sigterm_keeps_progress_and_says_how_to_resume(setup, tmp_path):
    source, options = setup
    out = tmp_path / "aaac"
    state = staging_path(out) / PROGRESS_DIR / "progress.json"
    done, stderr = _interrupted_run(source, out, options, signal.SIGTERM, after_blocks=2)
    assert done >= 2 and state.is_file()
    assert f"progress kept in {staging_path(out)}: rerun with --resume to continue" in stderr
    # Other options cannot continue these blocks.
    result = in_process(quantize_main, source, out, *options[:-2], "--device", "cpu", "--seed", 7, "--resume")
    assert result.returncode == 2 and "used another seed" in result.stderr, result.stderr
    # Without --resume the old progress is discarded and the run starts over.
    assert in_process(quantize_main, source, out, *options).returncode == 0
    assert json.loads((out / REPORT_FILE).read_text())["resumed_from_block"] == 0
    assert not staging_path(out).exists()

"""``quantization_report.json``: what a run did (settings, time, memory, per-layer errors, versions)."""

import json
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .progress import Progress

REPORT_FILE = "quantization_report.json"


class StepClock:
    """Seconds spent in each named step of a block (on CUDA, as seen by the host: the steps end in reads
    of results that wait for the device)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def write_report(
    folder: Path,
    source_dir: Path,
    settings,
    device: torch.device,
    progress: Progress,
    shards: list[str],
    start: float,
    windows: torch.Tensor,
) -> dict:
    """Write the run's report into ``folder`` and return it; ``settings`` is the run's ``pipeline.Settings``."""
    import transformers

    from . import __version__

    linear_layers = [v for v in progress.layers.values() if "weighted_error" in v]
    errors = [v["weighted_error"] for v in linear_layers]
    rtn = [v["rtn_weighted_error"] for v in linear_layers]
    shares = [v["codebook1_share"] for v in linear_layers if "codebook1_share" in v]
    experts = [v for v in linear_layers if "calibration_tokens" in v]
    report = {
        "source": str(source_dir),
        "method": settings.method.label,
        "format": settings.method.format,
        "settings": {**settings.record(), "calibration_tokens": int(windows.numel())},
        "device": str(device),
        "seconds": time.perf_counter() - start,
        "block_seconds": progress.block_seconds,
        "step_seconds": progress.step_seconds,
        "resumed_from_block": progress.resumed_from,
        "memory": _peak_memory(device),
        "summary": {
            "layers": len(linear_layers),
            "mean_weighted_error": sum(errors) / len(errors),
            "mean_rtn_weighted_error": sum(rtn) / len(rtn),
            "mean_codebook1_share": sum(shares) / len(shares) if shares else None,
            # expert parts (one per expert and gate/up/down) and those quantized with their layer's pooled
            # statistics for want of calibration tokens (statistics.MIN_EXPERT_TOKENS)
            "expert_parts": len(experts),
            "expert_parts_with_pooled_statistics": sum(1 for v in experts if v["pooled_statistics"]),
        },
        "files": shards,
        "layers": progress.layers,
        "versions": {
            "aaac_vllm": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _peak_memory(device: torch.device) -> dict:
    peak = {"host_peak_rss_mib": _host_peak_rss() / 2**20}
    if device.type == "cuda":
        peak["device_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def _host_peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux's VmHWM starts afresh at exec; ru_maxrss keeps
    the peak of the process that forked it (a parent holding gigabytes would count)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10

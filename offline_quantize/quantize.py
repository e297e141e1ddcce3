"""The block-by-block pipeline: calibration -> statistics -> (AWQ scaling) -> per-layer method -> packing -> checkpoint.

Block i+1 is calibrated on the outputs of the already-quantized block i, so
each block's codebooks see the errors the blocks before it will make at
inference. Only one block at a time lives on the compute device.
"""

import json
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from . import awq_format, checkpoint, source
from .calibration import read_texts, token_windows
from .codebooks import CodebookOptions
from .errors import AAACError
from .methods import LinearInputs, MethodOptions, quantize_linear, rtn_reference_error, scale_block
from .progress import Progress
from .statistics import collect


@dataclass
class Settings:
    group_size: int = 128
    nsamples: int = 128
    seqlen: int = 512
    device: str = "auto"
    seed: int = 0
    calib: list[Path] = field(default_factory=list)
    batch_size: int = 8
    max_shard_bytes: int = 4 << 30
    codebooks: CodebookOptions = field(default_factory=CodebookOptions)
    method: MethodOptions = field(default_factory=MethodOptions)


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0 to record what the model feeds it, then stops the forward pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # models read attributes of their blocks (attention_type, ...)
            return getattr(self.block, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        raise _Captured


def _to(obj, device, dtype=None):
    """Move the tensors inside nested tuples, lists and dicts; floating tensors also to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if dtype and obj.is_floating_point() else None)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AAACError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def _peak_memory(device: torch.device) -> dict:
    peak = {"host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["device_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def _capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int) -> list:
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
    try:
        for chunk in windows.split(batch_size):
            try:
                model(input_ids=chunk, use_cache=False)
            except _Captured:
                pass
    finally:
        blocks[0] = catcher.block
    return catcher.calls


def quantize_model(
    source_dir: Path, output: Path, settings: Settings, overwrite: bool = False, resume: bool = False
) -> dict:
    """Quantize ``source_dir`` into an AAAC checkpoint at ``output``; return the report.

    With ``resume``, an interrupted run of the same source and settings continues from its last
    finished block, and writes the same bytes an uninterrupted run would.
    """
    start = time.perf_counter()
    source_dir, output = source_dir.resolve(), output.resolve()
    config = source.check_source(source_dir)
    if output == source_dir or source_dir.is_relative_to(output) or output.is_relative_to(source_dir):
        raise AAACError(f"output folder {output} must be outside the source model folder {source_dir}")
    if output.exists() and not overwrite:
        raise AAACError(f"output folder {output} already exists; pass --overwrite to replace it")
    device = _resolve_device(settings.device)
    method = settings.method
    method.check()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    texts = read_texts(settings.calib)
    if not texts:
        raise AAACError(f"calibration data is empty: no text in {', '.join(map(str, settings.calib))}")
    windows = token_windows(texts, tokenizer, settings.nsamples, settings.seqlen, settings.seed)

    model = source.load_model(source_dir)
    linears = source.check_linears(model, settings.group_size)
    stored = source.tensor_names(source_dir)
    for name in linears:
        if f"{name}.weight" not in stored:
            raise AAACError(f"layer {name}: no tensor {name}.weight in the safetensors files of {source_dir}")
    blocks = source.decoder_blocks(model)
    prefix = source.blocks_prefix(model, blocks)
    model_dtype = next(blocks[0].parameters()).dtype
    # CPUs without native bf16 matmul are far faster in fp32; GPUs compute in the model's dtype.
    compute_dtype = torch.float32 if device.type == "cpu" else model_dtype

    fingerprint = {
        "source": str(source_dir),
        "source files": {f.name: f.stat().st_size for f in source.weight_files(source_dir)},
        **_settings_record(settings),
    }
    with torch.no_grad(), checkpoint.staging_folder(output, resume) as staging:
        progress = Progress(staging, fingerprint)
        done = progress.resume() if resume else 0
        for stale in staging.iterdir():  # shards of an interrupted run are rebuilt from its blocks
            if stale != progress.folder:
                stale.unlink()
        calls = _capture_block_inputs(model, blocks, windows, settings.batch_size)
        extras = [(_to(a, device, compute_dtype), _to(k, device, compute_dtype)) for _, a, k in calls]
        inputs = progress.inputs(device) if done else [_to(h, device, compute_dtype) for h, _, _ in calls]
        bar = tqdm(total=len(blocks), initial=done, desc=method.label, unit="block", dynamic_ncols=True)
        for i in range(done, len(blocks)):
            block = blocks[i]
            block_start = time.perf_counter()
            block.to(device=device, dtype=compute_dtype)
            block_lin = source.block_linears(block)
            with collect(block_lin, full=method.needs_second_moment) as stats:
                for h, (args, kwargs) in zip(inputs, extras):
                    block(h, *args, **kwargs)
            linear_inputs = {
                name: LinearInputs(st.mean(), st.second_moment() if method.needs_second_moment else None, st.abs_mean())
                for name, st in stats.items()
            }
            rtn_errors = {  # on the unscaled weights, before AWQ scaling changes them
                name: rtn_reference_error(m.weight.data, linear_inputs[name].h, settings.group_size)
                for name, m in block_lin.items()
            }
            tensors, layers = {}, {}
            if method.scales_channels:
                folded = scale_block(block, i, block_lin, linear_inputs, settings.group_size)
                for previous, record in folded.items():
                    module = block.get_submodule(previous)
                    module.weight.data = module.weight.data.to(model_dtype).to(compute_dtype)
                    if not isinstance(module, nn.Linear):  # folded norms are stored; folded linears are quantized next
                        tensors[f"{prefix}.{i}.{previous}.weight"] = module.weight.data.to(model_dtype).cpu()
                    layers[f"{prefix}.{i}.{previous}"] = {"awq_alpha": record["alpha"], "scales": record["linears"]}
            for j, (name, module) in enumerate(block_lin.items()):
                full = f"{prefix}.{i}.{name}"
                result = quantize_linear(name, module.weight.data, linear_inputs[name], settings.group_size, method,
                                         settings.codebooks, seed=settings.seed + 1000 * i + j)
                tensors.update({f"{full}.{suffix}": t.cpu() for suffix, t in result.tensors.items()})
                layers[full] = {
                    **layers.get(full, {}),  # a linear that AWQ scaling folded into keeps its awq_alpha
                    "shape": list(module.weight.shape),
                    **result.details,
                    "rtn_weighted_error": rtn_errors[name],
                }
                # What the next block sees is what inference will compute: the stored weights, in the model's dtype.
                module.weight.data = result.dense.to(model_dtype).to(compute_dtype)
            inputs = [_first(block(h, *args, **kwargs)) for h, (args, kwargs) in zip(inputs, extras)]
            block.to(device="cpu", dtype=model_dtype)
            progress.commit(i, tensors, layers, time.perf_counter() - block_start, inputs)
            linear_entries = [e for e in layers.values() if "weighted_error" in e]
            ratio = sum(e["weighted_error"] for e in linear_entries) / max(sum(e["rtn_weighted_error"] for e in linear_entries), 1e-30)
            bar.update()
            bar.set_postfix(error_vs_rtn=f"{ratio:.2f}")
        bar.close()

        writer = checkpoint.ShardWriter(staging, settings.max_shard_bytes)
        written = {f"{name}.weight" for name in linears}
        for i in range(len(blocks)):
            for name, tensor in progress.block_tensors(i).items():
                writer.add(name, tensor)
                written.add(name)
        _copy_unquantized(source_dir, writer, written)
        shards = writer.finish()
        checkpoint.write_manifest(staging)
        unconverted = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears)
        make_config = awq_format.quantization_config if method.format == "awq" else checkpoint.quantization_config
        checkpoint.write_config(config, staging, make_config(settings.group_size, unconverted))
        checkpoint.copy_side_files(source_dir, staging)
        report = _report(source_dir, settings, device, progress, shards, start, windows)
        (staging / checkpoint.REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        progress.remove()
    return report


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _copy_unquantized(source_dir: Path, writer: checkpoint.ShardWriter, written: set[str]) -> None:
    """Every source tensor not yet written (quantized weights, folded norms), bit for bit as stored in the source."""
    for file in source.weight_files(source_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key not in written:
                    writer.add(key, f.get_tensor(key))


def _settings_record(settings: Settings) -> dict:
    return {
        **{k: v for k, v in asdict(settings).items() if k not in ("calib", "codebooks", "method")},
        "calib": [str(p) for p in settings.calib],
        "codebooks": asdict(settings.codebooks),
        "method": asdict(settings.method),
    }


def _report(source_dir, settings, device, progress: Progress, shards, start, windows) -> dict:
    import transformers

    from . import __version__

    layers = progress.layers
    linear_layers = [v for v in layers.values() if "weighted_error" in v]
    errors = [v["weighted_error"] for v in linear_layers]
    rtn = [v["rtn_weighted_error"] for v in linear_layers]
    shares = [v["codebook1_share"] for v in linear_layers if "codebook1_share" in v]
    return {
        "source": str(source_dir),
        "method": settings.method.label,
        "format": settings.method.format,
        "settings": {**_settings_record(settings), "calibration_tokens": int(windows.numel())},
        "device": str(device),
        "seconds": time.perf_counter() - start,
        "block_seconds": progress.block_seconds,
        "resumed_from_block": progress.resumed_from,
        "memory": _peak_memory(device),
        "summary": {
            "layers": len(linear_layers),
            "mean_weighted_error": sum(errors) / len(errors),
            "mean_rtn_weighted_error": sum(rtn) / len(rtn),
            "mean_codebook1_share": sum(shares) / len(shares) if shares else None,
        },
        "files": shards,
        "layers": layers,
        "versions": {
            "aaac_vllm": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }

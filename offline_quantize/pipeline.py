"""``quantize_model``: a Hugging Face causal LM -> a 4-bit checkpoint, one decoder block at a time.

    capture block 0's inputs -> per block: read -> statistics -> (AWQ channel scaling) -> quantize
    -> next inputs -> commit -> write the checkpoint -> report

Block i + 1 is calibrated on the outputs of the already-quantized block i, so each block's codebooks
see the errors the blocks before it will make at inference. The source is streamed (streaming.py): only
one block at a time is read from its shards, and only that block lives on the compute device. Every
finished block is committed to the run's progress (progress.py), from which ``--resume`` continues.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from aaac_kernels.format import awq as awq_format
from aaac_kernels.format.config import quantization_config, write_config
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.experts import expert_of
from aaac_kernels.format.files import ShardWriter, copy_side_files, stored_tensors
from aaac_kernels.format.manifest import write_manifest

from . import source
from .awq_search import scale_block
from .calibration import read_texts, token_windows
from .capture import capture_block_inputs, move
from .codebooks import CodebookOptions
from .methods import LayerOptions, MethodOptions
from .objectives import layer_errors, rtn_reference_error
from .progress import Progress
from .report import StepClock, write_report
from .staging import staging_folder
from .statistics import LinearStatistics, collect, expert_statistics
from .streaming import StreamedModel


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
    trust_remote_code: bool = False
    codebooks: CodebookOptions = field(default_factory=CodebookOptions)
    method: MethodOptions = field(default_factory=MethodOptions)

    def record(self) -> dict:
        """The settings as JSON values: the report's record and the fingerprint a resumed run must match."""
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("calib", "codebooks", "method")},
            "calib": [str(p) for p in self.calib],
            "codebooks": asdict(self.codebooks),
            "method": {"method": self.method.method, "flags": sorted(self.method.flags)},
        }


@dataclass
class BlockInputs:
    """What the model feeds a decoder block: hidden states per batch, and the other arguments of each call."""

    hidden: list[torch.Tensor]
    arguments: list[tuple[tuple, dict]]

    def feed(self, block: nn.Module) -> None:
        """Run the block on every batch, for the hooks that collect statistics."""
        for h, (args, kwargs) in zip(self.hidden, self.arguments):
            block(h, *args, **kwargs)

    def advance(self, block: nn.Module) -> None:
        """Replace the hidden states with the block's outputs: the next block's inputs."""
        outputs = [block(h, *args, **kwargs) for h, (args, kwargs) in zip(self.hidden, self.arguments)]
        self.hidden = [out[0] if isinstance(out, (tuple, list)) else out for out in outputs]


def quantize_model(
    source_dir: Path, output: Path, settings: Settings, overwrite: bool = False, resume: bool = False
) -> dict:
    """Quantize ``source_dir`` into a checkpoint at ``output``; return the report.

    With ``resume``, an interrupted run of the same source and settings continues from its last
    finished block, and writes the same bytes an uninterrupted run would.
    """
    start = time.perf_counter()
    config = source.check_source(source_dir, settings.trust_remote_code)
    source_dir, output = source_dir.resolve(), output.resolve()
    _check_output(source_dir, output, overwrite)
    settings.method.check()
    device = resolve_device(settings.device)
    windows = calibration_windows(source_dir, settings)
    model = StreamedModel(source_dir, settings.trust_remote_code)
    linears = _check_model(model, settings.group_size)
    blocks = source.decoder_blocks(model.module)
    prefix = source.blocks_prefix(model.module, blocks)
    # CPUs without native bf16 matmul are far faster in fp32; GPUs compute in the model's dtype.
    compute_dtype = torch.float32 if device.type == "cpu" else next(blocks[0].parameters()).dtype
    fingerprint = {
        "source": str(source_dir),
        "source files": {f.name: f.stat().st_size for f in source.weight_files(source_dir)},
        **settings.record(),
    }
    with torch.no_grad(), staging_folder(output, resume) as staging:
        progress = Progress(staging, fingerprint)
        done = progress.start(resume)
        with model.loaded(model.outside_blocks(blocks)):
            inputs = _first_block_inputs(model.module, blocks, windows, settings.batch_size, device, compute_dtype)
        if done:
            inputs.hidden = progress.inputs(device)
        # As a context, the bar ends its line whatever happens: an error a block raises starts its own line.
        with tqdm(total=len(blocks), initial=done, desc=settings.method.label, unit="block", dynamic_ncols=True) as bar:
            for i, block in enumerate(blocks[done:], start=done):
                clock = StepClock()
                with clock.step("read"):
                    model.load(block)
                try:
                    result = quantize_block(block, f"{prefix}.{i}", i, inputs, settings, device, compute_dtype, clock)
                finally:
                    model.release(block)
                tensors = {model.stored_name(name): t for name, t in result.tensors.items()}
                layers = {model.stored_name(name): entry for name, entry in result.layers.items()}
                progress.commit(i, tensors, layers, clock.seconds, inputs.hidden)
                bar.update()
                bar.set_postfix(error_vs_rtn=f"{_error_ratio(result.layers):.2f}")
        shards = write_checkpoint(source_dir, staging, config, model, linears, progress, settings)
        report = write_report(staging, source_dir, settings, device, progress, shards, start, windows)
        progress.remove()
    return report


@dataclass
class BlockResult:
    """What one block adds to the checkpoint and to the report."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> tensor to store
    layers: dict[str, dict] = field(default_factory=dict)  # full name -> report entry


def quantize_block(
    block: nn.Module,
    prefix: str,
    index: int,
    inputs: BlockInputs,
    settings: Settings,
    device: torch.device,
    compute_dtype: torch.dtype,
    clock: StepClock,
) -> BlockResult:
    """Statistics -> channel scaling -> quantization of block ``index`` (named ``prefix`` in the model);
    ``inputs`` become its outputs. ``clock`` times each step."""
    model_dtype = next(block.parameters()).dtype
    linears = source.block_linears(block)
    source.check_finite(linears, prefix)
    block.to(device=device, dtype=compute_dtype)
    # AWQ scaling takes the mean |x| of a mixture-of-experts MLP's inputs from its router, which sees every token.
    routers = source.block_routers(block) if settings.method.scales_channels else {}
    full = settings.method.needs_second_moment
    with clock.step("statistics"), collect(linears, full) as accumulators, collect(routers) as router_accumulators:
        inputs.feed(block)
    stats, pooled = expert_statistics(accumulators)
    stats.update({name: acc.result() for name, acc in router_accumulators.items()})
    result = BlockResult()
    with clock.step("quantization"):
        rtn_errors = {  # on the unscaled weights, before AWQ scaling changes them
            name: rtn_reference_error(m.weight.data, stats[name].mean_square, settings.group_size)
            for name, m in linears.items()
        }
        if settings.method.scales_channels:
            scale_channels(block, index, prefix, linears, stats, settings.group_size, model_dtype, result)
        quantize_linears(index, prefix, linears, stats, settings, model_dtype, result)
    for name, error in rtn_errors.items():
        result.layers[f"{prefix}.{name}"]["rtn_weighted_error"] = error
    for name, acc in accumulators.items():
        if expert_of(name) is not None:
            tokens = {"calibration_tokens": acc.tokens, "pooled_statistics": name in pooled}
            result.layers[f"{prefix}.{name}"].update(tokens)
    with clock.step("next inputs"):
        inputs.advance(block)
    return result


def scale_channels(
    block: nn.Module,
    index: int,
    prefix: str,
    linears: dict[str, nn.Linear],
    stats: dict[str, LinearStatistics],
    group_size: int,
    model_dtype: torch.dtype,
    result: BlockResult,
) -> None:
    """AWQ's channel scaling of the block, folded into the operations before its linears (``stats`` follow)."""
    for previous, record in scale_block(block, index, linears, stats, group_size).items():
        # Folded norms and the routers that took the scale are stored as they are now; a folded linear
        # (v, up) is quantized next.
        for name in [previous, *record["routers"]]:
            module = block.get_submodule(name)
            module.weight.data = module.weight.data.to(model_dtype).to(module.weight.dtype)  # as stored
            if name in record["routers"] or not isinstance(module, nn.Linear):
                result.tensors[f"{prefix}.{name}.weight"] = module.weight.data.to(model_dtype).cpu()
        scaled = record["linears"] + record["routers"]
        result.layers[f"{prefix}.{previous}"] = {"awq_alpha": record["alpha"], "scales": scaled}


def quantize_linears(
    index: int,
    prefix: str,
    linears: dict[str, nn.Linear],
    stats: dict[str, LinearStatistics],
    settings: Settings,
    model_dtype: torch.dtype,
    result: BlockResult,
) -> None:
    """Every linear of the block by the run's method; each weight is then replaced by what inference will
    compute from the stored tensors (in the model's dtype), which is what the next block is calibrated on."""
    method = settings.method
    for j, (name, module) in enumerate(linears.items()):
        seed = settings.seed + 1000 * index + j
        options = LayerOptions(name, settings.group_size, method.flags, settings.codebooks, seed)
        weight = module.weight.data.float()
        quantized = method.handler.quantize(weight, stats[name], options)
        result.tensors.update({f"{prefix}.{name}.{suffix}": t.cpu() for suffix, t in quantized.tensors.items()})
        result.layers[f"{prefix}.{name}"] = {
            **result.layers.get(f"{prefix}.{name}", {}),  # a linear AWQ scaling folded into keeps its awq_alpha
            "shape": list(module.weight.shape),
            **quantized.details,
            **layer_errors(weight, quantized.dense, stats[name]),
        }
        module.weight.data = quantized.dense.to(model_dtype).to(module.weight.dtype)


def write_checkpoint(
    source_dir: Path,
    staging: Path,
    config: dict,
    model: StreamedModel,
    linears: dict[str, nn.Linear],
    progress: Progress,
    settings: Settings,
) -> list[str]:
    """Shards (every block's tensors, then every source tensor not replaced, bit for bit), manifest, config
    and side files into ``staging``; returns the shard names."""
    writer = ShardWriter(staging, settings.max_shard_bytes)  # copies each tensor's bytes, holding none
    written = {model.stored_name(f"{name}.weight") for name in linears}
    for i in range(progress.blocks_done):
        for name, tensor in stored_tensors(progress.block_file(i)).items():
            writer.add(name, tensor)
            written.add(name)
    for file in source.weight_files(source_dir):
        for name, tensor in stored_tensors(file).items():
            if name not in written:
                writer.add(name, tensor)
    shards = writer.finish()
    write_manifest(staging)
    unconverted = [model.stored_name(name) for name in source.unquantized_modules(model.module, linears)]
    make_config = awq_format.quantization_config if settings.method.format == "awq" else quantization_config
    write_config(config, staging, make_config(settings.group_size, unconverted))
    copy_side_files(source_dir, staging)
    return shards


def calibration_windows(source_dir: Path, settings: Settings) -> torch.Tensor:
    """The calibration token windows [nsamples, seqlen], tokenized with the source model's tokenizer."""
    from transformers import AutoTokenizer

    texts = read_texts(settings.calib)
    if not texts:
        raise AAACError(f"calibration data is empty: no text in {', '.join(map(str, settings.calib))}")
    tokenizer = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=settings.trust_remote_code)
    return token_windows(texts, tokenizer, settings.nsamples, settings.seqlen, settings.seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AAACError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def _check_output(source_dir: Path, output: Path, overwrite: bool) -> None:
    if output == source_dir or source_dir.is_relative_to(output) or output.is_relative_to(source_dir):
        raise AAACError(f"output folder {output} must be outside the source model folder {source_dir}")
    if output.exists() and not overwrite:
        raise AAACError(f"output folder {output} already exists; pass --overwrite to replace it")


def _check_model(model: StreamedModel, group_size: int) -> dict[str, nn.Linear]:
    """The quantizable linears by full name, each checked to be stored under its own name in the source."""
    linears = source.check_linears(model.module, group_size)
    for name in linears:
        stored = model.stored_name(f"{name}.weight")
        if stored not in model.files:
            raise AAACError(f"layer {name}: no tensor {stored} in the safetensors files of {model.path}")
    return linears


def _first_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> BlockInputs:
    calls = capture_block_inputs(model, blocks, windows, batch_size)
    return BlockInputs(
        hidden=[move(h, device, dtype) for h, _, _ in calls],
        arguments=[(move(args, device, dtype), move(kwargs, device, dtype)) for _, args, kwargs in calls],
    )


def _error_ratio(layers: dict[str, dict]) -> float:
    """The block's weighted error as a fraction of round-to-nearest's, for the progress bar."""
    linear = [e for e in layers.values() if "weighted_error" in e]
    return sum(e["weighted_error"] for e in linear) / max(sum(e["rtn_weighted_error"] for e in linear), 1e-30)

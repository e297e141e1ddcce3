"""AAAC's CPU kernels against vLLM's own CPU linear layers (bf16 and AWQ), side by side in one run.

    python benchmarks/cpu_kernels.py [--models 8b 135m] [--shapes qkv o gate_up down] [--m 1 2 4 ...]
        [--group-size 64] [--threads 1 2] [--isa auto avx2 ...] [--awq w4a8 w4a16] [--quick]

For every linear layer shape of Llama-3-8B and SmolLM2-135M (and Llama-3.2-1B with ``--models 1b``; q/k/v
merged, o, gate/up merged, down) and batch size M it times y = x @ Wᵀ with bf16 activations x, each way
built and called as vLLM would:

  bf16   vLLM's unquantized linear on its CPU build: ``UnquantizedLinearMethod`` (create_weights,
         process_weights_after_loading, apply), whose load step is
         ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``. That picks, in order: zentorch on AMD
         Zen; the sgl-kernel path (``convert_weight_packed`` at load, ``weight_packed_linear_cpu`` per call)
         when the CPU has AMX tiles and the bf16 weight is at most 1 MiB (of the shapes here only SmolLM2's
         o_proj); oneDNN otherwise (``create_onednn_mm(Wᵀ, 32)`` at load, ``onednn_mm(handler, x, bias)`` per
         call); plain F.linear if oneDNN is missing. The path each shape got is printed.
  AWQ    vLLM's AWQ linear method on CPU: ``AutoAWQMarlinLinearMethod`` (what ``AutoAWQConfig`` returns on
         CPU) with the kernel ``choose_mp_linear_kernel`` picks, ``CPUWNA16LinearKernel``, on random
         AutoAWQ checkpoint tensors (uint4 with zero points, group size G). Its load step repacks them
         (``_convert_awq_to_standard_format``, then the kernel's own ``process_weights_after_loading``), and
         ``apply`` is the per-call op. The kernel has two paths: with ``VLLM_CPU_INT4_W4A8=1`` (vLLM's
         default) on a CPU with AMX tiles it takes ``w4a8``: ``convert_weight_packed_scale_zp`` at load and
         ``int4_scaled_mm_cpu`` per call, which quantizes x to int8 on the fly; otherwise ``w4a16``:
         ``cpu_gemm_wna16(..., isa_hint)`` on bf16 x (isa_hint "amx" with AMX, else "vec"). ``--awq`` times
         either or both (the variable is set around each load step).
  AAAC   ``torch.ops.aaac.linear`` on ``format.serving.prepare``'s layout of random checkpoint tensors, on the
         C++ extension's automatically chosen instruction-set path, or on each path ``--isa`` names.

Every path is first checked against dequantize + matmul in fp32 (relative error under 1%, 3% for w4a8)
on SmolLM2's qkv and o shapes (8B o where the group size does not divide 576) at M = 3 and 64, which
run different code paths of each kernel.

How it is timed, so that the figures mean what decoding sees:
  * weights stream from memory: each variant holds enough copies of the layer's prepared weights to
    exceed twice the last-level cache (read from sysfs) and calls them in rotation, continuing the
    rotation across M and thread counts, so every call reads weights last touched a full cycle ago
    (``--in-cache`` instead rotates two copies, which stay in the cache where they fit: what a model
    small enough for the cache, like SmolLM2 on a large-L3 server, sees when it decodes);
  * each (variant, M, threads) is warmed up, then timed as the median over repetitions of a
    time.perf_counter loop of calls (fewer repetitions where one call is long, at large M);
  * the machine's read bandwidth (max over a 1 GiB int32 tensor) is measured in the same run, and at
    M = 1 each variant's weight bytes per second are given as a fraction of it. Weight bytes: 2 per
    weight for bf16; the AWQ layer's tensors after vLLM's repack (4-bit weights, scales, zero points);
    AAAC's layout tensors.
Threads: ``torch.set_num_threads`` (vLLM's C++ ops and AAAC's both run on torch's OpenMP pool). vLLM's
worker also pins its threads to cores and preloads torch's libgomp; this script does neither.

Prints a markdown table per thread count, with AAAC's speed-up over bf16 (bf16 time / AAAC time) and over
each AWQ path, then the geometric means of those speed-ups over the 8B shapes per M. The full default
run is sized for well under ten minutes on two idle cores; ``--quick`` (SmolLM2 qkv and o, 8B o; M 1, 16,
512; shorter timing) for about one. Peak memory is about 5 GiB (8B gate_up: four variants' copies at once).
"""

import argparse
import contextlib
import functools
import itertools
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

# (hidden, intermediate, attention heads, KV heads, head dim)
# 1b: Llama-3.2-1B, the shapes of benchmarks/vllm_cpu.py's 1B-shaped model
MODELS = {"8b": (4096, 14336, 32, 8, 128), "1b": (2048, 8192, 32, 8, 64), "135m": (576, 1536, 9, 3, 64)}
SHAPES = ("qkv", "o", "gate_up", "down")
M_VALUES = [1, 2, 4, 8, 16, 64, 512]
QUICK_M_VALUES = [1, 16, 512]
QUICK_SHAPES = [("135m", "qkv"), ("135m", "o"), ("8b", "o")]  # both of vLLM's bf16 paths, three parts
CHECK_SHAPES = [("135m", "qkv"), ("135m", "o")]  # "o" takes vLLM's sgl bf16 path on AMX, "qkv" oneDNN
CHECK_FALLBACK = [("8b", "o")]  # where the group size does not divide SmolLM2's 576
CHECK_M = (3, 64)
AWQ_PATHS = ("w4a8", "w4a16")
AUTO = "auto"  # the AAAC ISA the extension chose by itself
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16")
FALLBACK_LLC_BYTES = 512 << 20
BANDWIDTH_BYTES = 1 << 30
PAGE_BYTES = 4096
# Relative Frobenius error allowed against the fp32 reference: bf16 output (and, in vLLM's bf16 paths,
# bf16 rounding inside the GEMM) gives ~0.2-0.4%; AWQ w4a8 quantizes x to int8 per row, ~1%.
TOLERANCE = {"w4a8": 3e-2, "default": 1e-2}


@dataclass(frozen=True)
class Timing:
    """How long to warm up and time each (variant, M, threads)."""

    warmup_s: float  # warm-up at least this long (and at least two calls)
    rep_s: float  # calls per repetition: enough to last about this long
    reps: int  # repetitions whose median is reported
    long_call_s: float  # calls longer than this get fewer repetitions (large M)


FULL_TIMING = Timing(warmup_s=0.05, rep_s=0.025, reps=7, long_call_s=0.1)
QUICK_TIMING = Timing(warmup_s=0.02, rep_s=0.01, reps=5, long_call_s=0.05)


@dataclass
class Weights:
    """Copies of one layer's prepared weights, each behind a call ``x -> y``, called in rotation.

    The rotation continues across calls to ``run``, so a copy is read again only after all the others:
    with the copies together larger than twice the last-level cache, its weights come from memory.
    """

    calls: list[Callable[[torch.Tensor], torch.Tensor]]
    nbytes: int  # of one copy
    cursor: int = 0

    def run(self, x: torch.Tensor, count: int) -> None:
        calls, n, i = self.calls, len(self.calls), self.cursor
        for _ in range(count):
            calls[i](x)
            i += 1
            if i == n:
                i = 0
        self.cursor = i


@dataclass
class Variant:
    """One column of the table: a way of computing the layer, on its copies of the weights."""

    name: str
    weights: Weights
    isa: str | None = None  # AAAC instruction-set path to select before timing (None: leave as is)
    note: str = ""  # the path vLLM took, for the header


@dataclass
class Row:
    shape: str
    model: str
    m: int
    threads: int
    seconds: dict[str, float] = field(default_factory=dict)  # variant name -> median seconds per call


# ---------------------------------------------------------------------------------------------- shapes


def layer_shapes(model: str) -> dict[str, tuple[list[int], int]]:
    """name -> (output part sizes, in_features) of the four linear layers of a decoder block."""
    hidden, intermediate, heads, kv_heads, head_dim = MODELS[model]
    return {
        "qkv": ([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], hidden),
        "o": ([hidden], heads * head_dim),
        "gate_up": ([intermediate, intermediate], hidden),
        "down": ([hidden], intermediate),
    }


def shape_label(model: str, name: str) -> str:
    parts, k = layer_shapes(model)[name]
    return f"{model} {name} {k}→{sum(parts)}"


# ------------------------------------------------------------------------------------------- machine


def llc_bytes() -> int:
    """Size of the last-level cache (L3) from sysfs, else lscpu's, else FALLBACK_LLC_BYTES."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        text = ""
    if not text:
        with contextlib.suppress(OSError):
            found = re.search(r"L3 cache:\s*([\d.]+)\s*(\w+)", os.popen("lscpu 2>/dev/null").read())
            text = f"{found.group(1)}{found.group(2)}" if found else ""
    found = re.fullmatch(r"([\d.]+)\s*([A-Za-z]*)", text)
    if not found:
        return FALLBACK_LLC_BYTES
    return int(float(found.group(1)) * units.get(found.group(2).upper(), 1))


def cpu_description() -> tuple[str, list[str]]:
    """CPU model name and which of ISA_FLAGS /proc/cpuinfo lists."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", []
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE)
    present = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else "unknown"), [f for f in ISA_FLAGS if f in present]


def read_bandwidth(thread_counts: list[int], reps: int) -> dict[int, float]:
    """Bytes per second of a max-reduction over a 1 GiB int32 tensor, per thread count (median of reps)."""
    data = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.int32)  # ones, not empty: the pages must exist
    result = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        data.max()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            data.max()
            samples.append(time.perf_counter() - start)
        result[threads] = data.nbytes / statistics.median(samples)
    return result


# ------------------------------------------------------------------------------------------- vLLM side


@contextlib.contextmanager
def vllm_context() -> Iterator[None]:
    """What vLLM's linear methods need to create their parameters: a current vLLM config and a
    tensor-parallel group (here of one rank), as a worker has them."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    with tempfile.TemporaryDirectory() as directory, set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{directory}/init", backend="gloo"
        )
        initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def _no_loader(*args, **kwargs) -> None:
    """The weight_loader vLLM's parameters require; the tensors are filled directly."""


def new_layer() -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.register_parameter("bias", None)  # as LinearBase does for bias=False (Llama)
    return layer


def bf16_path(layer: torch.nn.Module) -> str:
    """Which of dispatch_cpu_unquantized_gemm's paths the layer got, read from the op its cpu_linear calls."""
    code = getattr(getattr(layer, "cpu_linear", None), "__code__", None)  # F.linear itself has none
    names = code.co_names if code is not None else ()
    for op, label in (
        ("onednn_mm", "oneDNN onednn_mm"),
        ("weight_packed_linear_cpu", "sgl weight_packed_linear"),
        ("zentorch_linear_unary", "zentorch"),
    ):
        if op in names:
            return label
    return "torch F.linear"


def build_bf16(parts: list[int], k: int, llc: int | None) -> tuple[Variant, torch.Tensor | None]:
    """vLLM's unquantized linear on a random bf16 weight, loaded into enough layers to stream from memory
    (one where llc is None); and, where llc is None, the dense [N, K] fp32 weight."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    n = sum(parts)
    weight = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    method = UnquantizedLinearMethod()
    calls, path = [], ""
    for _ in range(copies_for(weight.nbytes, llc)):
        layer = new_layer()
        method.create_weights(layer, k, parts, k, n, torch.bfloat16, weight_loader=_no_loader)
        layer.weight.data.copy_(weight)
        method.process_weights_after_loading(layer)  # packs its own copy and drops layer.weight
        path = bf16_path(layer)
        calls.append(functools.partial(method.apply, layer))
    return Variant("bf16", Weights(calls, weight.nbytes), note=path), weight.float() if llc is None else None


# AutoAWQ packs 8 output columns per int32, column AWQ_ORDER[j] in bits 4j..4j+3.
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, N] integers in 0..15 -> int32 [R, N // 8] in AutoAWQ's packing."""
    rows, n = values.shape
    nibbles = values.to(torch.int32).view(rows, n // 8, 8)[:, :, AWQ_ORDER]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (nibbles << shifts).sum(dim=-1, dtype=torch.int32)  # disjoint bits: the sum is an OR


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def layer_copies(layer: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """Copies of a processed layer, each with its own copy of the parameters (deepcopy fails on vLLM's
    parameter classes): same attributes, each parameter one of ``stacked_copies``."""
    params = {name: stacked_copies(p.data, count) for name, p in layer._parameters.items() if p is not None}
    copies = []
    for i in range(count):
        copy = torch.nn.Module()
        for key, value in vars(layer).items():
            if not key.startswith("_"):  # use_w4a8, isa_hint, ... that process_weights_after_loading set
                setattr(copy, key, value)
        for name, param in layer._parameters.items():
            copy.register_parameter(name, None if param is None else torch.nn.Parameter(params[name][i], False))
        copies.append(copy)
    return copies


def build_awq(
    parts: list[int], k: int, group_size: int, path: str, llc: int | None
) -> tuple[Variant, torch.Tensor | None] | tuple[None, str]:
    """vLLM's AWQ linear on random AutoAWQ tensors, loaded with the w4a8 or w4a16 path, copied to stream
    from memory (one copy where llc is None); and, where llc is None, the dense [N, K] fp32 weight they
    encode. (None, reason) where vLLM would not take that path on this machine."""
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig, AutoAWQMarlinLinearMethod

    if path == "w4a16" and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None, "this vLLM build has no cpu_gemm_wna16 (vLLM's AVX2 build serves no AWQ checkpoint)"
    n = sum(parts)
    indices = torch.randint(0, 16, (k, n), dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // group_size, n), dtype=torch.int32)
    scales = (torch.rand(k // group_size, n) * 0.01 + 1e-3).half()  # AutoAWQ stores fp16 scales
    config = AutoAWQConfig(weight_bits=4, group_size=group_size, zero_point=True, lm_head_quantized=False)
    method = AutoAWQMarlinLinearMethod(config)
    layer = new_layer()
    method.create_weights(layer, k, parts, k, n, torch.bfloat16, weight_loader=_no_loader)
    layer.qweight.data.copy_(awq_pack(indices))
    layer.qzeros.data.copy_(awq_pack(zeros))
    layer.scales.data.copy_(scales)  # the parameter is in the model dtype: the loader rounds to bf16
    loaded_scales = layer.scales.data.float()
    with environment("VLLM_CPU_INT4_W4A8", "1" if path == "w4a8" else "0"):
        method.process_weights_after_loading(layer)
    if layer.use_w4a8 != (path == "w4a8"):
        return None, f"vLLM does not take the {path} path here (no AMX tiles?)"
    kernel = type(method.kernel).__name__
    op = "int4_scaled_mm_cpu" if layer.use_w4a8 else f"cpu_gemm_wna16 isa_hint={layer.isa_hint}"
    nbytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    calls = [functools.partial(method.apply, each) for each in layer_copies(layer, copies_for(nbytes, llc))]
    dense = None
    if llc is None:  # w[k, n] = (q[k, n] - zero[g, n]) * scale[g, n], g = k // G
        expand = functools.partial(torch.repeat_interleave, repeats=group_size, dim=0)
        dense = ((indices - expand(zeros)).float() * expand(loaded_scales)).t().contiguous()
    return Variant(f"AWQ {path}", Weights(calls, nbytes), note=f"{kernel} {path}: {op}"), dense


# ------------------------------------------------------------------------------------------- AAAC side


def random_aaac(parts: list[int], k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint tensors (qweight, scales, codebooks) of a random AAAC linear whose parts have their own
    codebook pairs: uniform indices, both codebooks in use."""
    from aaac_kernels.format.layout import encode_scales, pack_indices

    n = sum(parts)
    qweight = pack_indices(torch.randint(0, 16, (n, k), dtype=torch.uint8))
    magnitude = torch.rand(k // group_size, n) * 0.02 + 1e-3
    scales = encode_scales(magnitude, torch.rand_like(magnitude) < 0.5)
    return qweight, scales, torch.randn(len(parts), 2, 16).sort(dim=-1).values.half()


def reference_weight(
    qweight: torch.Tensor, scales: torch.Tensor, codebooks: torch.Tensor, parts: list[int], group_size: int
) -> torch.Tensor:
    """The reference dequantizer's fp32 [N, K] weight, one part (codebook pair) at a time."""
    from aaac_kernels.format import reference

    bounds = [0, *torch.tensor(parts).cumsum(0).tolist()]
    return torch.cat(
        [
            reference.dequantize(qweight[:, a:b], scales[:, a:b], codebooks[i], group_size, torch.float32)
            for i, (a, b) in enumerate(itertools.pairwise(bounds))
        ]
    )


def build_aaac(
    parts: list[int], k: int, group_size: int, isas: list[str | None], llc: int | None
) -> tuple[list[Variant], torch.Tensor | None]:
    """torch.ops.aaac.linear on random AAAC tensors in ``prepare``'s layout, copied to stream from memory
    (one copy where llc is None), one variant per ISA (sharing the copies); and, where llc is None, the
    dense [N, K] fp32 weight from the reference dequantizer."""
    from aaac_kernels.format.serving import prepare

    qweight, scales, codebooks = random_aaac(parts, k, group_size)
    layout = prepare(qweight, scales, codebooks)
    nbytes = sum(t.numel() * t.element_size() for t in layout)
    layouts = list(zip(*(stacked_copies(t, copies_for(nbytes, llc)) for t in layout), strict=True))
    op = torch.ops.aaac.linear

    def caller(tensors: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: op(x, *tensors, parts, None)

    weights = Weights([caller(each) for each in layouts], nbytes)
    dense = reference_weight(qweight, scales, codebooks, parts, group_size) if llc is None else None
    return [Variant(f"AAAC {aaac_isa_label(isa)}", weights, isa=isa) for isa in isas], dense


def aaac_native() -> ModuleType | None:
    """The AAAC C++ extension (None where it was not built: the op then runs its plain-torch path)."""
    from aaac_kernels import linear as aaac_linear

    return aaac_linear.native


def aaac_isa_label(isa: str | None) -> str:
    """The ISA path a variant runs: the named one, or the one the extension chose (or 'torch' without it)."""
    if isa is not None:
        return isa
    native = aaac_native()
    return native.isa() if native is not None else "torch"


@contextlib.contextmanager
def selected_isa(isa: str | None) -> Iterator[None]:
    """Select an AAAC ISA path for the block and restore the previous one; None selects nothing."""
    native = aaac_native()
    if isa is None or native is None:
        yield
        return
    previous = native.isa()
    native.set_isa(isa)
    try:
        yield
    finally:
        native.set_isa(previous)


# ------------------------------------------------------------------------------------------- measuring


def stacked_copies(tensor: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` contiguous copies of a tensor, each starting on its own page of one allocation: one
    large copy instead of thousands of small ones (which cost a parallel op each)."""
    nbytes = tensor.numel() * tensor.element_size()
    stride = -(-nbytes // PAGE_BYTES) * PAGE_BYTES
    buffer = torch.empty(count, stride, dtype=torch.uint8)
    buffer[:, :nbytes] = tensor.contiguous().view(-1).view(torch.uint8)
    return [row[:nbytes].view(tensor.dtype).view(tensor.shape) for row in buffer]


def copies_for(nbytes: int, llc: int | None) -> int:
    """Copies of nbytes whose total exceeds twice the last-level cache (at least two); one without a cache size."""
    return 1 if llc is None else max(2, 2 * llc // nbytes + 1)


def seconds_per_call(weights: Weights, x: torch.Tensor, timing: Timing) -> float:
    """Median over repetitions of the time per call, after a warm-up, rotating through the copies."""
    weights.run(x, 1)  # one-off costs: oneDNN primitive for this M, thread pool wake-up, ...
    calls, start = 0, time.perf_counter()
    while calls < 1 or time.perf_counter() - start < timing.warmup_s:
        weights.run(x, 1)
        calls += 1
    estimate = (time.perf_counter() - start) / calls
    per_rep = max(1, round(timing.rep_s / estimate))
    reps = timing.reps if estimate < timing.long_call_s else max(3, timing.reps // 2)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        weights.run(x, per_rep)
        samples.append((time.perf_counter() - start) / per_rep)
    return statistics.median(samples)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def check(variants: list[Variant], dense_nk: dict[str, torch.Tensor | None], label: str) -> list[str]:
    """Each variant's output against x @ Wᵀ in fp32 on its own dense weight, at CHECK_M; raises if off."""
    lines = []
    for variant in variants:
        weight = dense_nk[variant.name]
        k = weight.shape[1]
        for m in CHECK_M:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
            with selected_isa(variant.isa):
                got = variant.weights.calls[0](x)
            error = relative_error(got, x.float() @ weight.t())
            tolerance = TOLERANCE.get(variant.name.removeprefix("AWQ "), TOLERANCE["default"])
            if not error < tolerance:
                raise AssertionError(f"{variant.name} on {label}, M={m}: relative error {error:.2e} > {tolerance}")
            lines.append(f"{variant.name} on {label}, M={m}: relative error {error:.1e} (tolerance {tolerance:.0e})")
    return lines


def build_variants(
    model: str, name: str, args: argparse.Namespace, llc: int | None
) -> tuple[list[Variant], dict[str, torch.Tensor | None], list[str]]:
    """All variants of one shape (one copy each and their dense [N, K] weights where llc is None, for the
    checks; else copies to stream from memory), and notes on paths vLLM would not take here."""
    parts, k = layer_shapes(model)[name]
    variants, dense, notes = [], {}, []
    bf16, dense["bf16"] = build_bf16(parts, k, llc)
    variants.append(bf16)
    for path in args.awq:
        awq, result = build_awq(parts, k, args.group_size, path, llc)
        if awq is None:
            notes.append(f"AWQ {path} skipped: {result}")
            continue
        variants.append(awq)
        dense[awq.name] = result
    aaac, aaac_dense = build_aaac(parts, k, args.group_size, args.isa_paths, llc)
    variants.extend(aaac)
    dense.update((variant.name, aaac_dense) for variant in aaac)
    return variants, dense, notes


def measure_shape(
    model: str, name: str, args: argparse.Namespace, llc: int, timing: Timing
) -> tuple[list[Row], dict[str, int], list[str]]:
    """Times every variant of one shape at every M and thread count. Returns the rows, each variant's
    weight bytes, and a line per variant on its path and copies. The copies are freed on return."""
    label = shape_label(model, name)
    begun = time.perf_counter()
    variants, _, notes = build_variants(model, name, args, llc)
    log(f"{label}: weights built and copied in {time.perf_counter() - begun:.0f} s")
    k = layer_shapes(model)[name][1]
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for m in args.m:
            x = torch.randn(m, k).to(torch.bfloat16)
            row = Row(label, model, m, threads)
            for variant in variants:  # interleaved, so drift in the machine's load hits all of them alike
                with selected_isa(variant.isa):
                    row.seconds[variant.name] = seconds_per_call(variant.weights, x, timing)
            rows.append(row)
    torch.set_num_threads(max(args.threads))
    nbytes = {v.name: v.weights.nbytes for v in variants}
    lines = [f"{label}: {note}" for note in notes] + [
        f"{label}: {v.name}: {v.note + '; ' if v.note else ''}"
        f"{len(v.weights.calls)} copies of {v.weights.nbytes / 2**20:.2f} MiB"
        for v in variants
    ]
    return rows, nbytes, lines


# ------------------------------------------------------------------------------------------- printing


def log(message: str) -> None:
    print(f"[cpu_kernels] {message}", file=sys.stderr, flush=True)


def speedup_columns(names: list[str]) -> list[tuple[str, str, str]]:
    """(header, numerator variant, denominator variant): each AAAC path against bf16 and each AWQ path."""
    aaac = [n for n in names if n.startswith("AAAC")]
    baselines = [n for n in names if not n.startswith("AAAC")]
    return [(f"{a} vs {b}", b, a) for a in aaac for b in baselines]


def table(rows: list[Row], names: list[str], nbytes: dict[str, dict[str, int]], bandwidth: float) -> list[str]:
    speedups = speedup_columns(names)
    header = [
        "shape",
        "M",
        *(f"{n} µs" for n in names),
        *(h for h, _, _ in speedups),
        *(f"{n} GB/s at M=1 (of BW)" for n in names),
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row.shape, str(row.m)]
        cells += [f"{row.seconds[n] * 1e6:.1f}" if n in row.seconds else "" for n in names]
        cells += [
            f"{row.seconds[b] / row.seconds[a]:.2f}x" if a in row.seconds and b in row.seconds else ""
            for _, b, a in speedups
        ]
        for n in names:
            if row.m == 1 and n in row.seconds:
                rate = nbytes[row.shape][n] / row.seconds[n]
                cells.append(f"{rate / 1e9:.1f} ({rate / bandwidth:.0%})")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def geomean_table(rows: list[Row], names: list[str]) -> list[str]:
    """Geometric means over the 8B shapes of each speed-up, per M."""
    speedups = speedup_columns(names)
    eight_b = [r for r in rows if r.model == "8b"]
    if not eight_b or not speedups:
        return []
    lines = ["| M | " + " | ".join(h for h, _, _ in speedups) + " |", "|---:|" + "---:|" * len(speedups)]
    for m in sorted({r.m for r in eight_b}):
        cells = []
        for _, b, a in speedups:
            ratios = [r.seconds[b] / r.seconds[a] for r in eight_b if r.m == m and a in r.seconds and b in r.seconds]
            cells.append(f"{torch.tensor(ratios).log().mean().exp().item():.2f}x" if ratios else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def header(args: argparse.Namespace, llc: int, bandwidth: dict[int, float], load: tuple[float, float]) -> list[str]:
    import vllm

    model, flags = cpu_description()
    absent = [f for f in ISA_FLAGS if f not in flags]
    native = aaac_native()
    isa_line = (
        f"AAAC ISA paths timed: {', '.join(aaac_isa_label(i) for i in args.isa_paths)} "
        f"(automatic choice: {native.isa()}; supported: {', '.join(native.supported_isas())})"
        if native is not None
        else "AAAC: C++ extension not built, plain-torch path"
    )
    return [
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        f"- CPU: {model}; {os.cpu_count()} logical CPUs; last-level cache {llc / 2**20:.0f} MiB",
        f"- ISA flags present: {' '.join(flags) or 'none'}; absent: {' '.join(absent) or 'none'}",
        f"- torch {torch.__version__}, vllm {vllm.__version__}",
        f"- threads: {', '.join(map(str, args.threads))}; group size {args.group_size}",
        f"- {isa_line}",
        "- read bandwidth (max over 1 GiB int32): "
        + ", ".join(f"{t} thread{'s' if t > 1 else ''} {bw / 1e9:.1f} GB/s" for t, bw in bandwidth.items()),
        (
            f"- load average (1 min) at start and end of the run: {load[0]:.1f}, {load[1]:.1f} "
            "(anything else running on these cores skews the figures, the multi-threaded ones most)"
        ),
        (
            "- times: median per call over repetitions of a loop that rotates through copies of the weights "
            + ("(two copies: --in-cache)" if args.in_cache else "totalling more than twice the last-level cache")
            + "; 'AAAC vs X' columns are X's time / AAAC's time (above 1: AAAC is faster)"
        ),
    ]


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["8b", "135m"])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--m", type=int, nargs="+", help=f"batch sizes (default {M_VALUES})")
    parser.add_argument("--group-size", type=int, default=64, help="AWQ and AAAC group size (64 or 128)")
    parser.add_argument("--threads", type=int, nargs="+", help=f"thread counts (default 1 and {os.cpu_count()})")
    parser.add_argument(
        "--isa",
        nargs="+",
        default=[AUTO],
        help="AAAC ISA paths to time, one column each ('auto': the extension's own choice)",
    )
    parser.add_argument(
        "--awq",
        nargs="+",
        choices=AWQ_PATHS,
        default=list(AWQ_PATHS),
        help="vLLM AWQ kernel paths (w4a8 is vLLM's default where the CPU has AMX)",
    )
    parser.add_argument(
        "--in-cache",
        action="store_true",
        help="two copies of each layer's weights instead of more than twice the last-level cache",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: SmolLM2 qkv and o and 8B o, M {QUICK_M_VALUES}, shorter timing",
    )
    args = parser.parse_args(argv)
    args.threads = sorted(set(args.threads or [1, os.cpu_count() or 1]))
    shapes = QUICK_SHAPES if args.quick else [(m, s) for m in args.models for s in args.shapes]
    args.layers = [(m, s) for m, s in shapes if layer_shapes(m)[s][1] % args.group_size == 0]
    for m, s in sorted(set(shapes) - set(args.layers)):
        log(f"skipping {shape_label(m, s)}: in_features not a multiple of group size {args.group_size}")
    args.m = args.m or (QUICK_M_VALUES if args.quick else M_VALUES)
    return args


def resolve_isas(requested: list[str]) -> list[str | None]:
    """--isa names -> set_isa arguments (None for 'auto'), checked against what the extension supports;
    a path named twice (also as the automatic choice) is timed once."""
    native = aaac_native()
    supported = native.supported_isas() if native is not None else []
    paths: dict[str, str | None] = {}  # label -> set_isa argument
    for name in requested:
        if name != AUTO and name not in supported:
            raise SystemExit(f"--isa {name}: not among this build's and CPU's paths {supported} (or '{AUTO}')")
        isa = None if name == AUTO else name
        paths.setdefault(aaac_isa_label(isa), isa)
    return list(paths.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs every kernel choice at INFO
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    torch.manual_seed(0)
    from aaac_kernels import linear  # noqa: F401  registers torch.ops.aaac.linear

    args.isa_paths = resolve_isas(args.isa)
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    llc = llc_bytes()
    copies_llc = 0 if args.in_cache else llc  # copies_for: two copies where the cache size is 0
    rows: list[Row] = []
    paths: list[str] = []
    nbytes: dict[str, dict[str, int]] = {}
    torch.set_num_threads(max(args.threads))
    with vllm_context():
        log("checking every path against dequantize + matmul")
        fits = [s for s in CHECK_SHAPES if layer_shapes(s[0])[s[1]][1] % args.group_size == 0]
        for model, name in fits or CHECK_FALLBACK:
            variants, dense, _ = build_variants(model, name, args, None)
            paths += check(variants, dense, shape_label(model, name))
            del variants, dense
        bandwidth = read_bandwidth(args.threads, reps=3 if args.quick else 5)
        log("read bandwidth " + ", ".join(f"{t} threads {bw / 1e9:.1f} GB/s" for t, bw in bandwidth.items()))
        for model, name in args.layers:
            begun = time.perf_counter()
            shape_rows, nbytes[shape_label(model, name)], lines = measure_shape(model, name, args, copies_llc, timing)
            rows += shape_rows
            paths += lines
            log(f"{shape_label(model, name)} done in {time.perf_counter() - begun:.0f} s")
    names = list(dict.fromkeys(n for r in rows for n in r.seconds))
    load = (load_at_start, os.getloadavg()[0])
    out = [*header(args, llc, bandwidth, load), "", "Checks and paths:", "", *(f"- {p}" for p in paths)]
    for threads in args.threads:
        mine = [r for r in rows if r.threads == threads]
        out += [
            "",
            f"### {threads} thread{'s' if threads > 1 else ''}",
            "",
            *table(mine, names, nbytes, bandwidth[threads]),
        ]
        means = geomean_table(mine, names)
        if means:
            out += ["", f"Geometric mean over the 8B shapes of AAAC's speed-ups, {threads} thread(s):", "", *means]
    out += ["", f"Total run time {time.perf_counter() - started:.0f} s."]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

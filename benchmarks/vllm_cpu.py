"""vLLM throughput, start-up time and weight memory of bf16, AWQ and AAAC, in one run with the same prompts.

    python benchmarks/vllm_cpu.py --text artifacts/text/bbc-eval.txt --workdir artifacts/bench \\
        --model smollm2=artifacts/SmolLM2-135M-Instruct --model llama1b=synthetic

Engines, for every model, one after another (each fully shut down, its worker processes gone, before the
next starts), on the same prompts:

* ``bf16``: the unquantized model, vLLM's dense path (oneDNN on CPU);
* ``awq``: the model in AutoAWQ's format (``aaac-quantize --method rtn``: uniform INT4 with zero point,
  config ``quant_method: awq``), served by vLLM's built-in AWQ path;
* ``aaac``: the AAAC checkpoint (``aaac-quantize``, default method), served by this project's plugin.

``--model NAME=SPEC`` names a model; SPEC is one of

* ``BF16``: a bf16 HF folder; its AWQ and AAAC checkpoints are made with ``aaac-quantize --group-size G``
  (``--calib`` passed on if given) into WORKDIR/NAME/awq and WORKDIR/NAME/aaac, or reused from there;
* ``BF16:AWQ:AAAC``: three folders (an empty part means "make it in WORKDIR/NAME", as above);
* ``synthetic``: a Llama-3.2-1B-shaped model with random weights, SmolLM2's tokenizer and its vocabulary
  of 49152 (``benchmarks/synthetic_model.py``), written into WORKDIR/NAME/{bf16,aaac,awq} or reused;
  ``synthetic-moe``: the same for 4 mixture-of-experts blocks of Qwen3-30B-A3B.
  Its AAAC and AWQ checkpoints are random packed tensors, not quantizations: for speed and memory only.

Repeat ``--model`` to measure several models; ``--engines`` picks a subset of the engines.

For every engine it measures the start-up (the ``LLM(...)`` call: load, repack, compile), output
tokens/s of a batch of ``--batch`` prompts x ``--max-tokens`` tokens (one ``generate`` call, prefill
included) and of one prompt x ``--max-tokens`` tokens (median of ``--single-runs`` runs, each on another
prompt), greedy with ``ignore_eos``, after a warm-up (4 tokens for a batch of the same size, then for
one prompt) on other prompts. Prompts are the first lines of the text's blank-line-separated blocks
(in bbc-eval.txt blank lines also separate paragraphs, so these are headlines and whole paragraphs, 6 to
about 250 SmolLM2 tokens; the same prompts as the earlier two-engine version of this script). The batch,
single and warm-up prompts are distinct, so prefix caching (left on, vLLM's default) never serves a
measured prompt. Weight bytes come from ``aaac_vllm.memory.weight_bytes`` run in the worker.

``--dtype float32`` runs every engine's activations and unquantized weights in fp32: on a CPU without
AVX512-BF16, vLLM 0.32 multiplies bf16 through torch's slow path (its oneDNN linear fails to build), so
fp32 is the dense engine such a user would pick. The default mode is vLLM's (torch.compile);
``--enforce-eager`` skips compilation. In compiled mode the
start-up includes torch.compile, which vLLM caches under ~/.cache/vllm: a second run of the same model
starts faster (``VLLM_DISABLE_COMPILE_CACHE=1`` turns the cache off). Making SmolLM2's checkpoints here
takes a while on 2 cores (about 17 min for rtn and 30 min for aaac, measured); the synthetic model about
3 min.

It prints a header (CPU, ISA flags, versions, the AAAC CPU kernel path, the command) and one table per
model with the ratios against bf16 and AAAC against AWQ; ``--json FILE`` also writes the raw numbers.
An engine that fails is reported with its error and the run goes on (exit status 1 at the end).
vLLM's CPU build needs ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache per engine; 2 unless set).
"""

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # to send weight_bytes to the worker
SYNTHETIC = {"synthetic": "llama1b", "synthetic-moe": "qwen3moe"}  # --model NAME=SPEC -> synthetic_model shape
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "benchmarks") not in sys.path:  # synthetic_model; this file as module vllm_cpu (worker_info)
    sys.path.insert(0, str(ROOT / "benchmarks"))

from aaac_vllm.memory import weight_bytes  # noqa: E402

ENGINES = ("bf16", "awq", "aaac")
LABELS = {"bf16": "bf16", "awq": "AWQ", "aaac": "AAAC"}
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
ENV_SHOWN = (
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "AAAC_CPU_ISA",
    "AAAC_VERIFY_SHA256",
    "VLLM_DISABLE_COMPILE_CACHE",
    "OMP_NUM_THREADS",
)


# ---- prompts and models ----------------------------------------------------------------------------


def prompts_from(text: Path, count: int) -> list[str]:
    """The first line of each of the first ``count`` blank-line-separated blocks of held-out text."""
    blocks = [b.strip().splitlines()[0] for b in text.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    if len(blocks) < count:
        raise SystemExit(f"error: {text} has {len(blocks)} blank-line-separated blocks, {count} prompts needed")
    return blocks[:count]


def parse_model(spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value or "/" in name:
        raise argparse.ArgumentTypeError(f"--model {spec!r}: expected NAME=BF16[:AWQ:AAAC] or NAME=synthetic[-moe]")
    return name, value


def quantize(bf16: Path, out: Path, method: str, args) -> None:
    """``aaac-quantize BF16 OUT --method METHOD --group-size G [--calib ...]`` in its own process."""
    command = [
        sys.executable,
        "-m",
        "offline_quantize",
        str(bf16),
        str(out),
        "--method",
        method,
        "--group-size",
        str(args.group_size),
        *(["--calib", *map(str, args.calib)] if args.calib else []),
    ]
    print(f"[bench] quantizing: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"[bench] wrote {out} in {time.perf_counter() - start:.0f} s", flush=True)


def describe(folder: Path) -> str:
    """What a checkpoint is, from its own files: quantization_config, and the quantizer's report if any."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "(no readable config.json)"
    quant = config.get("quantization_config")
    if not quant:
        return f"unquantized, {config.get('torch_dtype') or config.get('dtype')}"
    text = f"quant_method {quant.get('quant_method')}, group size {quant.get('group_size')}"
    report = folder / "quantization_report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        text += (
            f"; aaac-quantize --method {r.get('method')} ({r['settings'].get('calibration_tokens')} calibration tokens)"
        )
    elif (folder / "synthetic_model.json").is_file():
        text += "; random packed tensors (benchmarks/synthetic_model.py)"
    return text


def resolve_model(name: str, spec: str, args) -> tuple[dict[str, Path], list[str]]:
    """({engine: checkpoint folder}, lines that describe the model), making what is missing in WORKDIR/NAME."""
    work = args.workdir / name
    if spec in SYNTHETIC:
        import synthetic_model

        shape = SYNTHETIC[spec]
        log = lambda line: print(f"[bench] {line}", flush=True)  # noqa: E731
        folders = synthetic_model.build(work, args.tokenizer, shape, log=log)
        about = [
            f"synthetic model, random weights: {synthetic_model.describe_shape(shape)}",
            f"tokenizer and vocabulary ({synthetic_model.VOCAB_SIZE}) are SmolLM2's, copied from {args.tokenizer}: "
            f"prompts tokenize as for SmolLM2",
            "AWQ and AAAC weights are random packed tensors, not quantizations: the text is garbage, "
            "only speed and memory mean anything",
        ]
        folders = {engine: folders[engine] for engine in ENGINES}
    else:
        parts = spec.split(":")
        if len(parts) not in (1, 3) or not parts[0]:
            raise SystemExit(f"error: --model {name}={spec}: expected BF16 or BF16:AWQ:AAAC")
        parts += [""] * (3 - len(parts))
        folders = {engine: Path(part) if part else None for engine, part in zip(ENGINES, parts)}
        for engine, folder in folders.items():
            # Checked before any engine starts: vLLM takes a missing folder for a Hub name and fails much later.
            if folder is not None and not (folder / "config.json").is_file():
                raise SystemExit(f"error: --model {name}: the {LABELS[engine]} checkpoint {folder} has no config.json")
        for engine, method in (("awq", "rtn"), ("aaac", "aaac")):
            if folders[engine] is None and engine in args.engines:
                folders[engine] = work / engine
                if not (folders[engine] / "config.json").is_file():
                    quantize(folders["bf16"], folders[engine], method, args)
        about = []
    about += [f"{LABELS[e]:5s} {folders[e]}: {describe(folders[e])}" for e in ENGINES if e in args.engines]
    return folders, about


# ---- one engine -----------------------------------------------------------------------------------


def worker_info(model) -> dict:
    """Runs in the worker: which linear methods (and kernels) serve the linear layers, torch threads, AAAC CPU path."""
    from collections import Counter

    import torch
    from vllm.model_executor.layers.linear import LinearBase

    methods = Counter()
    for module in model.modules():
        if isinstance(module, LinearBase):
            method = module.quant_method
            kernel = getattr(method, "kernel", None)
            methods[type(method).__name__ + (f"[{type(kernel).__name__}]" if kernel is not None else "")] += 1
    linear = sys.modules.get("aaac_kernels.linear")
    isa = None if linear is None else (linear.native.isa() if linear.native is not None else "torch")
    return {"linear_methods": dict(methods), "torch_threads": torch.get_num_threads(), "aaac_isa": isa}


def _engine_processes() -> set[int]:
    """Child processes of this one (recursively), less multiprocessing's resource tracker, which lives on."""
    import psutil

    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in process.cmdline()):
                pids.add(process.pid)
        except psutil.Error:  # exited meanwhile
            pass
    return pids


def _wait_gone(pids: set[int], timeout: float = 60.0) -> None:
    """Wait until the processes ``pids`` (an engine's, started by this process) have exited; kill those that
    outlive ``timeout``, so that the next engine never shares the cores with this one."""
    import psutil

    alive = []
    for pid in pids:
        try:
            alive.append(psutil.Process(pid))
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    if alive:
        print(
            f"[bench] warning: engine processes {[p.pid for p in alive]} still alive {timeout:.0f} s after "
            f"shutdown; killing them",
            flush=True,
        )
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)


def measure(
    model: Path, batch: list[str], singles: list[str], warmup: list[str], max_tokens: int, eager: bool, dtype: str
) -> dict:
    from vllm import LLM, SamplingParams

    before = _engine_processes()
    llm = None
    try:
        start = time.perf_counter()
        llm = LLM(model=str(model), seed=0, max_model_len=1024, enforce_eager=eager, dtype=dtype)
        startup = time.perf_counter() - start
        config = llm.llm_engine.model_config
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate(warmup, short, use_tqdm=False)  # warm-up: a batch as large as the measured one, then one prompt
        llm.generate(warmup[:1], short, use_tqdm=False)

        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        sample = outputs[0].outputs[0].text

        single = []
        for prompt in singles:
            start = time.perf_counter()
            out = llm.generate([prompt], params, use_tqdm=False)
            single.append(len(out[0].outputs[0].token_ids) / (time.perf_counter() - start))

        import vllm_cpu  # this file as a module: the worker unpickles functions by module and name, not __main__

        memory = llm.apply_model(weight_bytes)[0]
        info = llm.apply_model(vllm_cpu.worker_info)[0]
        return {
            "startup_s": startup,
            "batch_prompts": len(batch),
            "batch_tokens": tokens,
            "batch_seconds": seconds,
            "batch_tok_s": tokens / seconds,
            "single_tok_s": statistics.median(single),
            "single_runs_tok_s": single,
            **memory,
            "quantization": config.quantization,
            "dtype": str(config.dtype).removeprefix("torch."),
            **info,
            "sample": sample,
        }
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        _wait_gone(_engine_processes() - before)


# ---- report ---------------------------------------------------------------------------------------


def cpu_description() -> tuple[str, dict[str, bool]]:
    """The CPU's model name and which of ISA_FLAGS it reports (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break  # the first processor's entry is enough
    return model, {flag: flag in flags for flag in ISA_FLAGS}


def aaac_kernel_path() -> str:
    try:
        from aaac_kernels import linear
    except Exception as error:  # the kernels are being rebuilt: say so rather than fail the report
        return f"unavailable ({type(error).__name__}: {error})"
    return linear.native.isa() if linear.native is not None else "torch"


def _across(results: dict, key: str) -> list[str]:
    """The distinct values of ``key`` over every engine that reported it."""
    return sorted(
        {str(r[key]) for model in results.values() for r in model["engines"].values() if r.get(key) is not None}
    )


def header(args, prompts: dict, results: dict) -> list[str]:
    import torch
    import transformers
    import vllm

    cpu, flags = cpu_description()
    isa = aaac_kernel_path()
    workers = _across(results, "aaac_isa")
    if workers and workers != [isa]:
        isa += f" (in the vLLM workers: {', '.join(workers)})"
    threads = _across(results, "torch_threads")
    mode = "eager (--enforce-eager)" if args.enforce_eager else "compiled (vLLM default, torch.compile)"
    mode += f"; dtype {args.dtype}"
    env = " ".join(f"{k}={os.environ[k]}" for k in ENV_SHOWN if k in os.environ)
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores; " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()),
        f"torch {torch.__version__}, vLLM {vllm.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}",
        f"AAAC CPU kernel path: {isa}; torch threads in the vLLM worker: {', '.join(threads) or '-'}",
        f"mode: {mode}; batch: {len(prompts['batch'])} prompts x {args.max_tokens} output tokens (one generate call); "
        f"single: 1 prompt x {args.max_tokens} tokens, median of {len(prompts['single'])} runs; greedy, ignore_eos",
        f"prompts: first lines of the blank-line-separated blocks of {args.text}; env: {env}",
        f"command: {shlex.join([sys.executable, *sys.argv])}",
    ]


def _ratio(a, b) -> str:
    return f"{a / b:.3f}x" if a is not None and b else "-"


def table(name: str, model: dict) -> list[str]:
    engines = model["engines"]
    lines = [f"== {name}", *(f"   {line}" for line in model["about"])]
    cols = f"{'':10s} {'batch tok/s':>12s} {'1-prompt tok/s':>15s} {'linear MiB':>11s} {'all MiB':>9s} {'start s':>8s}"
    lines += [cols + "  served by"]
    for engine, r in engines.items():
        if "error" in r:
            lines.append(f"{LABELS[engine]:10s} FAILED: {r['error']}")
            continue
        methods = ", ".join(f"{m} x{c}" for m, c in r["linear_methods"].items())
        lines.append(
            f"{LABELS[engine]:10s} {r['batch_tok_s']:12.1f} {r['single_tok_s']:15.2f} {r['linear'] / 2**20:11.1f} "
            f"{(r['linear'] + r['other']) / 2**20:9.1f} {r['startup_s']:8.0f}  "
            f"{r['quantization'] or 'dense'} ({r['dtype']}; {methods})"
        )
    ok = {e: r for e, r in engines.items() if "error" not in r}
    for a, b in (("awq", "bf16"), ("aaac", "bf16"), ("aaac", "awq")):
        if a in ok and b in ok:
            x, y = ok[a], ok[b]
            lines.append(
                f"{LABELS[a] + '/' + LABELS[b]:10s} {_ratio(x['batch_tok_s'], y['batch_tok_s']):>12s} "
                f"{_ratio(x['single_tok_s'], y['single_tok_s']):>15s} {_ratio(x['linear'], y['linear']):>11s} "
                f"{_ratio(x['linear'] + x['other'], y['linear'] + y['other']):>9s} "
                f"{_ratio(x['startup_s'], y['startup_s']):>8s}"
            )
    for engine, r in ok.items():
        lines.append(f"   {LABELS[engine]} sample: {r['sample'][:100]!r}")
    return lines


# ---- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 2)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--text",
        type=Path,
        required=True,
        help="held-out text: the first lines of its blank-line-separated blocks become prompts",
    )
    parser.add_argument(
        "--model",
        type=parse_model,
        action="append",
        required=True,
        metavar="NAME=SPEC",
        help="NAME=BF16, NAME=BF16:AWQ:AAAC or NAME=synthetic; repeat for several models",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / "artifacts" / "bench",
        help="where missing checkpoints are made: WORKDIR/NAME/{awq,aaac} (and bf16 for synthetic)",
    )
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="default: all three")
    parser.add_argument("--batch", type=int, default=16, help="prompts in the batch measurement")
    parser.add_argument("--single-runs", type=int, default=3, help="one-prompt runs (median reported)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per prompt")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="skip torch.compile (default: vLLM's default mode)"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="activations and unquantized weights of every engine (vLLM's --dtype; auto: the model's, bf16 here). "
        "float32 is what to compare on a CPU without AVX512-BF16, where vLLM multiplies bf16 in torch's slow path",
    )
    parser.add_argument("--group-size", type=int, default=64, help="for checkpoints made here (default 64)")
    parser.add_argument("--calib", type=Path, nargs="+", help="calibration text for aaac-quantize (default: its own)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=ROOT / "artifacts" / "SmolLM2-135M-Instruct",
        help="tokenizer of the synthetic model (SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    args.engines = [e for e in ENGINES if e in args.engines]

    texts = prompts_from(args.text, 2 * args.batch + args.single_runs)
    prompts = {
        "batch": texts[: args.batch],
        "single": texts[args.batch : args.batch + args.single_runs],
        "warmup": texts[args.batch + args.single_runs :],
    }

    results = {}
    for name, spec in args.model:  # make every checkpoint before the first engine starts
        folders, about = resolve_model(name, spec, args)
        results[name] = {
            "spec": spec,
            "about": about,
            "folders": {e: str(folders[e]) for e in args.engines},
            "engines": {},
        }
    for name, model in results.items():
        for engine in args.engines:
            folder = Path(model["folders"][engine])
            print(f"[bench] {name} {LABELS[engine]}: starting vLLM on {folder}", flush=True)
            try:
                r = measure(
                    folder,
                    prompts["batch"],
                    prompts["single"],
                    prompts["warmup"],
                    args.max_tokens,
                    args.enforce_eager,
                    args.dtype,
                )
                print(
                    f"[bench] {name} {LABELS[engine]}: batch {r['batch_tok_s']:.1f} tok/s, "
                    f"single {r['single_tok_s']:.2f} "
                    f"tok/s, start-up {r['startup_s']:.0f} s",
                    flush=True,
                )
            except Exception as error:
                traceback.print_exc()
                r = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
            model["engines"][engine] = r

    head = header(args, prompts, results)
    lines = ["", *head]
    for name, model in results.items():
        lines += ["", *table(name, model)]
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": head, "prompts": prompts, "models": results}, indent=2) + "\n")
    if any("error" in r for model in results.values() for r in model["engines"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

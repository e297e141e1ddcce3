"""`aaac-compare`: every method on one model and group size, quantized and evaluated in one run.

Each method is quantized by its own `aaac-quantize` process (so its wall time and
peak memory are its own, read back from its quantization report), with the same
calibration settings; a label VARIANT@SET runs the variant calibrated on the named
calibration set instead of the common one. Then every checkpoint, and the
unquantized model, is evaluated on the same texts with the same perplexity
protocol. Writes results.json (raw numbers), results.md (the table) and
results.png (perplexity against quantization time, a panel per text) into the
work folder, and each quantization's output into logs/LABEL.log there.

The quantization processes are forked from one server process that has imported
torch, transformers and datasets once (multiprocessing's forkserver): a fresh
interpreter spends about 8 s on those imports on the 2-core machine, which is
neither the method's time nor, for a small model, small beside it.
"""

import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from aaac_kernels.format.errors import AAACError

from .evaluate import evaluation_device, perplexity, token_ids
from .methods import compared_variants
from .methods.registry import FORMATS

BASELINE, YARDSTICK = "bf16", "rtn"  # gaps are to bf16, and as a fraction of asymmetric RTN's gap


def variants() -> dict[str, list[str] | None]:
    """Label -> aaac-quantize options of every variant, from the method registry (None: the source itself)."""
    return {BASELINE: None, **{v.label: v.arguments for v in compared_variants()}}


COMMON = "common"  # the calibration set of every label without @SET (aaac-compare's --calib)


def variant_arguments(label: str, calib_sets: dict[str, list[Path]]) -> list[str] | None:
    """aaac-quantize options of ``label``: a variant, calibrated on ``calib_sets[COMMON]`` (aaac-quantize's
    default calibration when absent), or VARIANT@SET, the variant calibrated on ``calib_sets[SET]``."""
    name, at, set_name = label.partition("@")
    known = variants()
    if name not in known:
        raise AAACError(f"method {label!r}: no variant {name!r} (known: {', '.join(known)})")
    options = known[name]
    if options is None:
        if at:
            raise AAACError(f"method {label!r}: {name} is not quantized, so it takes no calibration set")
        return None
    if at and (set_name == COMMON or set_name not in calib_sets):
        named = ", ".join(s for s in calib_sets if s != COMMON) or "none"
        raise AAACError(f"method {label!r}: no calibration set {set_name!r} (--calib-set named: {named})")
    files = calib_sets.get(set_name if at else COMMON)
    return [*options, *(["--calib", *map(str, files)] if files else [])]


# What every quantization process imports before it starts; the server imports it once.
_PRELOAD = [
    "offline_quantize.pipeline",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "datasets",
]


class QuantizeCommand(NamedTuple):
    """aaac-quantize's command line, which this module's own (``cli``) passes in: ``main(argv)`` runs it and
    ``settings(argv)`` is the settings record its report will hold."""

    main: Callable[[list[str]], int]
    settings: Callable[[list[str]], dict]


def quantize_variant(
    command: QuantizeCommand,
    label: str,
    source: Path,
    output: Path,
    options: list[str],
    reuse: bool,
    log: Path,
) -> dict:
    """Run aaac-quantize for one variant in its own process, its output into ``log``; return its report. With
    ``reuse``, a checkpoint already at ``output`` is taken instead if it was made from the same source with
    the same settings."""
    argv = [str(source), str(output), *options, "--overwrite"]
    report_file = output / "quantization_report.json"
    if reuse and report_file.is_file():
        report = json.loads(report_file.read_text())
        _check_reused(report, source, command.settings(argv), output)
        return report
    print(f"[{label}] quantizing: aaac-quantize {' '.join(argv)}", flush=True)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    log.parent.mkdir(parents=True, exist_ok=True)
    process = context.Process(target=_logged, args=(command.main, argv, str(log)), name=f"aaac-quantize {label}")
    process.start()
    process.join()
    if process.exitcode != 0:
        last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        raise AAACError(f"quantizing {label} failed (exit {process.exitcode}, log {log}): {last}")
    return json.loads(report_file.read_text())


def _check_reused(report: dict, source: Path, settings: dict, folder: Path) -> None:
    settings = json.loads(json.dumps(settings))  # as the report holds them: tuples read back as lists
    recorded = {key: value for key, value in report["settings"].items() if key != "calibration_tokens"}
    differing = sorted(key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key))
    if Path(report["source"]) != source.resolve():
        differing.insert(0, "source")
    if differing:
        raise AAACError(
            f"--reuse: {folder} was quantized with another {', '.join(differing)} than this run asks for: "
            "remove it or leave out --reuse"
        )


def _logged(main: Callable[[list[str]], int], argv: list[str], log: str) -> None:
    """The body of a quantization process: ``main(argv)``, its output (both streams) into ``log``."""
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    sys.exit(main(argv))


def run(
    quantize: QuantizeCommand,
    source: Path,
    workdir: Path,
    texts: dict[str, Path],
    labels: list[str],
    quantize_options: list[str],
    calib_sets: dict[str, list[Path]],
    seqlen: int,
    max_tokens: int | None,
    device: str,
    reuse: bool,
) -> dict:
    """Quantize and evaluate every variant in ``labels`` (each with ``quantize_options`` and its calibration
    set, see ``variant_arguments``); returns the results and writes the three files."""
    from transformers import AutoTokenizer

    from .hf_loader import load_causal_lm

    for name, file in texts.items():
        if not file.is_file():
            raise AAACError(f"text {name}: file {file} does not exist")
    for name, files in calib_sets.items():
        for file in files:
            if not file.is_file():
                raise AAACError(f"calibration set {name}: file {file} does not exist")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise AAACError(f"method {repeated[0]!r} is listed twice")
    options_of = {label: variant_arguments(label, calib_sets) for label in labels}  # every label checked first
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    contents = {
        name: token_ids(tokenizer, file.read_text(encoding="utf-8"), max_tokens) for name, file in texts.items()
    }
    eval_device, dtype = evaluation_device(device)

    # All quantization first, then all evaluation: each method's timing is taken with nothing else running.
    methods: dict[str, dict] = {}
    folders: dict[str, Path] = {}
    for label in labels:
        options = options_of[label]
        if options is None:
            folders[label] = source
            methods[label] = {"format": "unquantized", "quantize_seconds": 0.0}
            continue
        folders[label] = workdir / label
        log = workdir / "logs" / f"{label}.log"
        arguments = [*options, *quantize_options]
        report = quantize_variant(quantize, label, source, folders[label], arguments, reuse, log)
        summary = report["summary"]
        methods[label] = {
            "format": report["format"],
            "quantize_seconds": report["seconds"],
            "device": report["device"],
            "peak_host_rss_mib": report["memory"]["host_peak_rss_mib"],
            "peak_device_mib": report["memory"].get("device_peak_allocated_mib"),
            "mean_weighted_error": summary["mean_weighted_error"],
            "mean_rtn_weighted_error": summary["mean_rtn_weighted_error"],
            "calibration": report["settings"]["calib"],
            "checkpoint": str(folders[label]),
        }
        print(f"[{label}] quantized in {report['seconds']:.0f} s", flush=True)

    token_counts: dict[str, int] = {}
    for label in labels:
        entry = methods[label]
        entry["perplexity"] = {}
        model = load_causal_lm(folders[label], dtype=dtype, device=eval_device)
        for name, ids in contents.items():
            start = time.perf_counter()
            entry["perplexity"][name], token_counts[name] = perplexity(model, ids, seqlen)
            print(
                f"[{label}] {name}: perplexity {entry['perplexity'][name]:.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        del model

    _add_gaps(methods)
    results = {
        "source": str(source),
        "quantize_options": quantize_options,
        "calib_sets": {name: [str(f) for f in files] for name, files in calib_sets.items()},
        "texts": {name: {"file": str(texts[name]), "tokens": token_counts[name]} for name in texts},
        "protocol": {"seqlen": seqlen, "max_tokens": max_tokens, "eval_device": eval_device, "eval_dtype": str(dtype)},
        "machine": _machine(),
        "methods": methods,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (workdir / "results.md").write_text(markdown(results))
    plot(results, workdir / "results.png")
    return results


def _add_gaps(methods: dict[str, dict]) -> None:
    if BASELINE not in methods:
        return
    base = methods[BASELINE]["perplexity"]
    for entry in methods.values():
        entry["gap"] = {name: ppl - base[name] for name, ppl in entry["perplexity"].items()}
    if YARDSTICK in methods:
        yard = methods[YARDSTICK]["gap"]
        for entry in methods.values():
            entry["gap_vs_rtn"] = {
                name: gap / yard[name] if yard[name] > 0 else None for name, gap in entry["gap"].items()
            }


def _machine() -> dict:
    import transformers

    return {
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown(results: dict) -> str:
    """The results table: perplexity per text, gap to bf16 as a fraction of RTN's, time, memory, format."""
    names = list(results["texts"])
    head = ["method"]
    for name in names:
        head += [f"{name} ppl", f"{name} gap / RTN gap"]
    head += ["quantize s", "peak RSS MiB", "format (served by)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, entry in results["methods"].items():
        row = [label]
        for name in names:
            ratio = entry.get("gap_vs_rtn", {}).get(name)
            row += [f"{entry['perplexity'][name]:.3f}", "" if ratio is None or label == BASELINE else f"{ratio:.2f}"]
        rss = entry.get("peak_host_rss_mib")
        served = FORMATS.get(entry["format"], "")
        row += [
            f"{entry['quantize_seconds']:.0f}" if label != BASELINE else "",
            f"{rss:.0f}" if rss else "",
            f"{entry['format']} ({served})" if served else entry["format"],
        ]
        lines.append("| " + " | ".join(row) + " |")
    tokens = ", ".join(f"{name}: {info['tokens']} tokens" for name, info in results["texts"].items())
    lines.append("")
    lines.append(f"Perplexity over non-overlapping {results['protocol']['seqlen']}-token windows ({tokens}).")
    calibrations = sorted({tuple(e["calibration"]) for e in results["methods"].values() if "calibration" in e})
    for files in calibrations:
        users = [label for label, e in results["methods"].items() if tuple(e.get("calibration", ())) == files]
        lines.append(f"Calibrated on {' + '.join(files)}: {', '.join(users)}.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity against quantization time, one panel per text, one point per method, bf16 as a line. A
    variant keeps its colour on every calibration set; a VARIANT@SET point is hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(results["texts"])
    bases = list(dict.fromkeys(label.partition("@")[0] for label in results["methods"] if label != BASELINE))
    colours = {base: plt.get_cmap("tab10")(i % 10) for i, base in enumerate(bases)}
    fig, axes = plt.subplots(1, len(texts), figsize=(4.5 * len(texts) + 2.5, 4.5), dpi=120, squeeze=False)
    for ax, text in zip(axes[0], texts):
        for label, entry in results["methods"].items():
            ppl = entry["perplexity"][text]
            if label == BASELINE:
                ax.axhline(ppl, color="gray", linestyle="--", linewidth=1, label="bf16")
                continue
            base, at, _ = label.partition("@")
            marker = "o" if base.startswith("aaac") else "s"
            colour = colours[base]
            face = "none" if at else colour
            ax.scatter(entry["quantize_seconds"], ppl, marker=marker, s=40, label=label, color=colour, facecolors=face)
        ax.set_xscale("log")
        ax.set_xlabel("quantization wall time (s, log scale)")
        ax.set_ylabel(f"perplexity ({text})")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{Path(results['source']).name}: perplexity against quantization time")
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    fig.savefig(path)
    plt.close(fig)

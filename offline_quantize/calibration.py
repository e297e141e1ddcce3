"""Calibration text, read through `datasets` from local files, cut into token windows."""

from pathlib import Path

import torch

from aaac_kernels.format.errors import AAACError

# File suffix -> `datasets` builder. JSON lines and parquet files must have a "text" column.
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_texts(files: list[Path]) -> list[str]:
    """Documents from local files: a plain-text file is one document, a JSON/parquet row is one."""
    from datasets import load_dataset

    by_builder: dict[str, list[str]] = {}
    for file in files:
        if not file.is_file():
            raise AAACError(f"calibration file {file} does not exist")
        builder = _BUILDERS.get(file.suffix.lower())
        if builder is None:
            raise AAACError(
                f"calibration file {file}: unsupported type '{file.suffix}' (use .txt, .jsonl, .json or .parquet)"
            )
        by_builder.setdefault(builder, []).append(str(file))
    texts = []
    for builder, paths in by_builder.items():
        extra = {"sample_by": "document"} if builder == "text" else {}
        try:
            dataset = load_dataset(builder, data_files=paths, split="train", **extra)
        except Exception as exc:  # datasets wraps the reader's error; its cause says what is wrong
            cause = exc.__cause__ or exc
            raise AAACError(
                f"calibration files {', '.join(paths)}: cannot read ({type(cause).__name__}: {cause})"
            ) from None
        if "text" not in dataset.column_names:
            raise AAACError(
                f"calibration files {', '.join(paths)} have no 'text' column (columns: {dataset.column_names})"
            )
        texts.extend(t for t in dataset["text"] if t and t.strip())
    return texts


def token_windows(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` non-overlapping windows of ``seqlen`` tokens, chosen with ``seed`` from the joined documents.

    Documents are joined with the EOS token so no window mixes two documents without a boundary marker.
    """
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.extend(separator)
    needed = nsamples * seqlen
    if len(stream) < needed:
        raise AAACError(
            f"calibration data has {len(stream)} tokens, {needed} needed ({nsamples} samples x {seqlen}); "
            "add text with --calib or lower --nsamples / --seqlen"
        )
    windows = torch.tensor(stream[: len(stream) // seqlen * seqlen]).reshape(-1, seqlen)
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:nsamples]
    return windows[pick.sort().values]

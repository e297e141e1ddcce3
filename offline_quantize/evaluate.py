"""Perplexity over non-overlapping windows (the GPTQ / AWQ protocol)."""

import math

import torch
from torch import nn

from aaac_kernels.format.errors import AAACError


def evaluation_device(name: str) -> tuple[str, torch.dtype]:
    """``auto``/``cpu``/``cuda`` -> (device, dtype). On the CPU the stored weights are computed exactly in fp32:
    bf16 matmuls are slow on CPUs without native support."""
    if name == "cuda" and not torch.cuda.is_available():
        raise AAACError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """The text's token ids [T] (no special tokens), the first ``max_tokens`` of them: tokenized once for
    every model evaluated on it (about a second per 500 kB of text on the 2-core machine)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids if max_tokens is None else ids[:max_tokens]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 2048) -> tuple[float, int]:
    """exp(mean NLL) over every token predicted inside ``seqlen`` windows of ``ids`` [T]; returns (perplexity,
    tokens predicted)."""
    windows = len(ids) // seqlen
    if windows == 0:
        raise AAACError(
            f"the text has {len(ids)} tokens, fewer than one window of {seqlen}; lower --seqlen or add text"
        )
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for w in range(windows):
        batch = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=batch, use_cache=False).logits[0, :-1].float()
        nll += nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum").item()
        count += seqlen - 1
    return math.exp(nll / count), count

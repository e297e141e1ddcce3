"""Capturing what a model feeds its first decoder block, for the block-by-block pipeline."""

import torch
from torch import nn


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


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, tuple, dict]]:
    """(hidden states, positional arguments, keyword arguments) of block 0, per batch of ``windows``."""
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


def move(obj, device: torch.device, dtype: torch.dtype | None = None):
    """Move the tensors inside nested tuples, lists and dicts; floating tensors also to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if dtype and obj.is_floating_point() else None)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device, dtype) for k, v in obj.items()}
    return obj

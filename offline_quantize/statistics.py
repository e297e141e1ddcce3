"""Activation statistics: h[k] = mean(x[k]^2) over calibration tokens, for every linear's input."""

from contextlib import contextmanager

import torch
from torch import nn


class ChannelStatistics:
    """Running sum of squared inputs per channel, fed by a forward hook."""

    def __init__(self, features: int, device: torch.device):
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.sum += x.double().pow(2).sum(dim=0)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()


@contextmanager
def collect(linears: dict[str, nn.Linear]):
    """Within the block, record the statistics of every listed linear's input."""
    stats = {name: ChannelStatistics(m.in_features, m.weight.device) for name, m in linears.items()}
    handles = [
        module.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
        for name, module in linears.items()
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()

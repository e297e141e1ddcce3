"""The errors every method is judged by, in the report of each layer.

``mean_square`` [K] is mean(x[k]^2) over the calibration tokens, ``second_moment`` [K, K] is
mean(x x^T) (GPTQ's Hessian up to a factor of 2).
"""

import torch

from .statistics import LinearStatistics
from .uniform_grid import rtn_dequantized


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, mean_square: torch.Tensor) -> float:
    """sum_k mean_square[k] (W - W_hat)^2 / sum_k mean_square[k] W^2: the diagonal of the output error,
    relative to the output energy; the figure every method is compared on."""
    w, diff = weight.float(), weight.float() - approx.float()
    return ((diff * diff * mean_square.float()).sum() / (w * w * mean_square.float()).sum().clamp_min(1e-30)).item()


def output_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """mean over tokens of ||x W^T - x approx^T||^2, from second_moment = mean(x x^T)."""
    d = weight - approx
    return ((d @ second_moment) * d).sum()


def rtn_reference_error(weight: torch.Tensor, mean_square: torch.Tensor, group_size: int) -> float:
    """Asymmetric round-to-nearest's weighted error on the unscaled weight: every report's yardstick."""
    return weighted_error(weight, rtn_dequantized(weight, group_size), mean_square)


def layer_errors(weight: torch.Tensor, dense: torch.Tensor, stats: LinearStatistics) -> dict[str, float]:
    """The layer's weighted error and, where the full second moment was collected, its output error
    relative to the output energy (the objective GPTQ and AWQ minimise)."""
    errors = {"weighted_error": weighted_error(weight, dense, stats.mean_square)}
    if stats.second_moment is not None:
        energy = output_error(weight, torch.zeros_like(weight), stats.second_moment).clamp_min(1e-30)
        errors["output_error"] = (output_error(weight, dense, stats.second_moment) / energy).item()
    return errors

"""Codebook learning on real SmolLM2 layers with real activation statistics from BBC text."""

import pytest
import torch

from aaac_kernels.format.layout import pack_indices
from aaac_kernels.format.reference import dequantize
from offline_quantize.calibration import token_windows
from offline_quantize.codebooks import (
    CodebookOptions,
    _assign,
    _covariance_aware_scales,
    _mean_aware_scales,
    _refit_scales,
    quantize_layer,
)
from offline_quantize.objectives import weighted_error
from offline_quantize.source import block_linears, decoder_blocks
from offline_quantize.statistics import STATISTICS_COLUMNS, BatchSums, collect
from offline_quantize.uniform_grid import rtn_dequantized

from .conftest import GROUP_SIZE

BLOCK = 3


@pytest.fixture(scope="module")
def block_statistics(source_model, bbc_text):
    """Real weights of one block and mean_square = mean(x^2) of each linear's input on 2 x 256 BBC tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_model)
    text = bbc_text["calib"].read_text()[:200_000]
    windows = token_windows([text], tokenizer, nsamples=2, seqlen=256, seed=0)
    model = AutoModelForCausalLM.from_pretrained(source_model, dtype=torch.float32)
    linears = block_linears(decoder_blocks(model)[BLOCK])
    with torch.no_grad(), collect(linears) as stats:
        model(input_ids=windows)
    return {name: (m.weight.detach().clone(), stats[name].result().mean_square) for name, m in linears.items()}


@pytest.fixture(scope="module")
def learned(block_statistics):
    """AAAC (seed 0) of every linear of the block, shared by the tests that only read results."""
    return {
        name: quantize_layer(weight, mean_square, GROUP_SIZE, seed=0)
        for name, (weight, mean_square) in block_statistics.items()
    }


def test_statistics_are_mean_squares(block_statistics):
    for weight, mean_square in block_statistics.values():
        assert mean_square.shape == (weight.shape[1],) and (mean_square >= 0).all() and mean_square.sum() > 0


@pytest.mark.parametrize("width", [STATISTICS_COLUMNS * 9, STATISTICS_COLUMNS * 2 + 37, 20])
def test_batch_sums_equal_whole_tensor_sums(width):
    """A batch's sums, taken a slice of columns at a time, are the whole tensor's float64 sums bit for bit
    (so the checkpoints stay what they were), for widths with and without a partial last slice."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1001, width, generator=g) * torch.rand(width, generator=g) * 4 + torch.randn(width, generator=g)
    sums = BatchSums.of(x, full=False)
    wide = x.reshape(-1, width).double()
    assert torch.equal(sums.square, wide.pow(2).sum(0)) and torch.equal(sums.total, wide.sum(0))
    assert torch.equal(sums.absolute, wide.abs().sum(0)) and sums.tokens == 3 * 1001 and sums.gram is None


@pytest.mark.parametrize("name", ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"])
def test_learned_codebooks_beat_fixed_grids(block_statistics, learned, name):
    weight, mean_square = block_statistics[name]
    result = learned[name]
    dense = dequantize(pack_indices(result.indices), result.scales.t().contiguous(), result.codebooks, GROUP_SIZE)

    aaac = weighted_error(weight, dense, mean_square)
    assert aaac == pytest.approx(result.error, rel=1e-4)  # the reported error is the dequantized one
    for symmetric in (False, True):
        assert aaac < 0.8 * weighted_error(weight, rtn_dequantized(weight, GROUP_SIZE, symmetric), mean_square)
    assert not torch.equal(result.codebooks[0], result.codebooks[1])


def test_both_codebooks_carry_real_load_across_a_block(learned):
    """Per layer one codebook may serve only a few groups (v_proj's does); over the block both matter."""
    groups = shares = 0.0
    for result in learned.values():
        count = result.scales.numel()
        groups, shares = groups + count, shares + result.codebook1_share * count
    assert 0.05 < shares / groups < 0.95


def test_codebooks_are_stored_in_fp16_and_sorted(block_statistics, learned):
    weight, _ = block_statistics["self_attn.o_proj"]
    result = learned["self_attn.o_proj"]
    assert result.codebooks.dtype == torch.float16 and result.codebooks.shape == (2, 16)
    assert torch.equal(result.codebooks, result.codebooks.sort(dim=1).values)
    assert result.scales.dtype == torch.float16 and result.scales.shape == (
        weight.shape[0],
        weight.shape[1] // GROUP_SIZE,
    )


def test_seeded_and_deterministic(block_statistics, learned):
    weight, mean_square = block_statistics["self_attn.k_proj"]
    a, b = learned["self_attn.k_proj"], quantize_layer(weight, mean_square, GROUP_SIZE, seed=0)
    assert (
        torch.equal(a.indices, b.indices) and torch.equal(a.scales, b.scales) and torch.equal(a.codebooks, b.codebooks)
    )


def test_all_zero_group_is_exact():
    weight = torch.randn(4, 128)
    weight[1, 64:] = 0
    result = quantize_layer(weight, torch.ones(128), 64)
    dense = dequantize(pack_indices(result.indices), result.scales.t().contiguous(), result.codebooks, 64)
    assert dense[1, 64:].abs().sum() == 0


def test_scale_refit_never_raises_a_groups_error():
    generator = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 4, 64, generator=generator) * torch.rand(1, 4, 64, generator=generator)).float()
    mean_square = torch.rand(4, 64, generator=generator) ** 3
    codebooks = torch.sort(torch.randn(2, 16, generator=generator)).values
    scale = w.abs().amax(dim=-1, keepdim=True) / codebooks.abs().max()
    before, _, _ = _assign(w, mean_square, scale, codebooks)
    after, _, _ = _assign(w, mean_square, _refit_scales(w, mean_square, scale, codebooks, steps=3), codebooks)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < 0.95 * before.sum()  # absmax scales are far from the least-squares ones


def test_refit_rounds_lower_the_layer_error_and_keep_zero_groups_exact():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(128, 256, generator=generator) * torch.rand(1, 256, generator=generator)
    weight[3, :64] = 0
    mean_square = torch.rand(256, generator=generator) ** 3
    plain = quantize_layer(weight, mean_square, 64, CodebookOptions(refit_rounds=0))
    refit = quantize_layer(weight, mean_square, 64, CodebookOptions(refit_rounds=2))
    assert refit.error < plain.error
    dense = dequantize(pack_indices(refit.indices), refit.scales.t().contiguous(), refit.codebooks, 64)
    assert dense[3, :64].abs().sum() == 0


def test_mean_aware_scales_lower_the_output_error_on_inputs_with_means():
    """Inputs whose channels have means (as a norm's or an activation's outputs do): the scale solve with the
    means lowers ||x W^T - x W_hat^T||^2 on fresh tokens from the same distribution by more than a fifth."""
    generator = torch.Generator().manual_seed(2)
    k = 256
    offset, spread = torch.randn(k, generator=generator), torch.rand(k, generator=generator) + 0.2

    def tokens(n: int) -> torch.Tensor:
        return offset + spread * torch.randn(n, k, generator=generator)

    x = tokens(4096)
    mean_square, mean = x.pow(2).mean(0), x.mean(0)
    weight = torch.randn(96, k, generator=generator)
    options = CodebookOptions(mean_weight=1.0)
    plain = quantize_layer(weight, mean_square, 64, options)
    solved = quantize_layer(weight, mean_square, 64, options, mean=mean)
    assert torch.equal(plain.indices, solved.indices) and torch.equal(plain.codebooks, solved.codebooks)

    def output_error(result) -> float:
        dense = dequantize(pack_indices(result.indices), result.scales.t().contiguous(), result.codebooks, 64)
        return (tokens(4096) @ (weight - dense).t()).pow(2).sum().item()

    assert output_error(solved) < 0.8 * output_error(plain)


def _stored_assignment(
    w: torch.Tensor, channel_weight: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random fp16 codebook pair, absmax fp16 scales and each group's assignment under them: (scale
    [N, groups, 1], the assigned entries [N, groups, G]), what the last scale solves start from."""
    codebooks = torch.sort(torch.randn(2, 16, generator=generator)).values.half().float()
    scale = (w.abs().amax(dim=-1, keepdim=True) / codebooks.abs().max()).half().float()
    _, choice, chosen = _assign(w, channel_weight, scale, codebooks)
    return scale, codebooks[choice.long().unsqueeze(-1).expand_as(chosen), chosen.long()]


def test_mean_aware_scales_never_raise_a_rows_error_and_keep_zero_groups():
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(32, 4, 64, generator=generator)
    w[5, 2] = 0
    mean_square = torch.rand(4, 64, generator=generator) + 0.5
    mean = (torch.rand(4, 64, generator=generator) - 0.5) * mean_square.sqrt()
    scale, values = _stored_assignment(w, mean_square, generator)
    solved = _mean_aware_scales(w, mean_square, mean, values, scale, mean_weight=1.0)

    def row_error(s: torch.Tensor) -> torch.Tensor:
        e = w - s * values
        return ((mean_square - mean * mean) * e * e).sum((1, 2)) + (mean * e).sum((1, 2)) ** 2

    assert (row_error(solved) <= row_error(scale)).all() and row_error(solved).sum() < 0.95 * row_error(scale).sum()
    assert solved[5, 2] == 0 and (solved[scale > 0] > 0).all()
    assert torch.equal(solved, solved.half().float())  # fp16 values: what is stored


def test_covariance_solve_is_the_means_solve_when_channels_are_independent():
    """Independent channels with means m and mean squares f have the second moment diag(f) + (m m^T off its
    diagonal): the full solve at weight 1 then minimises the means' solve's objective, so both give the same
    stored scales."""
    generator = torch.Generator().manual_seed(4)
    k = 256
    mean_square = torch.rand(k, generator=generator) + 0.5
    mean = (torch.rand(k, generator=generator) - 0.5) * mean_square.sqrt()
    second_moment = torch.outer(mean, mean)
    second_moment.diagonal().copy_(mean_square)
    weight = torch.randn(96, k, generator=generator)
    options = CodebookOptions(channel_floor=0.0, mean_weight=1.0, covariance_weight=1.0)
    by_means = quantize_layer(weight, mean_square, 64, options, mean=mean)
    by_covariance = quantize_layer(weight, mean_square, 64, options, second_moment=second_moment)
    assert torch.equal(by_means.indices, by_covariance.indices)
    # The two solves round differently (Sherman-Morrison in float32 against a dense float64 solve), so a
    # scale may land on the neighbouring fp16 value.
    assert torch.allclose(by_means.scales.float(), by_covariance.scales.float(), rtol=2e-3, atol=0)


def test_covariance_aware_scales_lower_the_output_error_on_correlated_inputs():
    """Inputs whose channels are correlated (mixed by a few shared directions, as a layer's inputs are): the
    solve with the full second moment lowers ||x W^T - x W_hat^T||^2 on fresh tokens of the same
    distribution below what the means' solve reaches."""
    generator = torch.Generator().manual_seed(5)
    k = 256
    offset, mixing = torch.randn(k, generator=generator), torch.randn(8, k, generator=generator)
    spread = torch.rand(k, generator=generator) + 0.2

    def tokens(n: int) -> torch.Tensor:
        return (
            offset + torch.randn(n, 8, generator=generator) @ mixing + spread * torch.randn(n, k, generator=generator)
        )

    x = tokens(8192)
    mean_square, mean, second_moment = x.pow(2).mean(0), x.mean(0), x.t() @ x / len(x)
    weight = torch.randn(96, k, generator=generator)
    options = CodebookOptions(covariance_weight=0.9)
    by_means = quantize_layer(weight, mean_square, 64, options, mean=mean)
    by_covariance = quantize_layer(weight, mean_square, 64, options, mean=mean, second_moment=second_moment)

    def output_error(result) -> float:
        dense = dequantize(pack_indices(result.indices), result.scales.t().contiguous(), result.codebooks, 64)
        return (tokens(8192) @ (weight - dense).t()).pow(2).sum().item()

    assert output_error(by_covariance) < 0.9 * output_error(by_means)


def test_covariance_aware_scales_never_raise_a_rows_error_and_keep_zero_groups():
    generator = torch.Generator().manual_seed(6)
    w = torch.randn(40, 4, 64, generator=generator)
    w[5, 2] = 0
    shared = torch.randn(2048, 4, generator=generator) @ torch.randn(4, 256, generator=generator)
    x = torch.randn(2048, 256, generator=generator) + shared  # correlated channels
    second_moment = x.t() @ x / len(x)
    channel_weight = second_moment.diagonal().reshape(4, 64)
    scale, values = _stored_assignment(w, channel_weight, generator)
    # A chunk of 7 rows at a time: the rows are solved in chunks, the last one partial.
    solved = _covariance_aware_scales(w, channel_weight, second_moment, values, scale, 0.5, max_bytes=7 * 4 * 256 * 4)
    a = 0.5 * second_moment
    a.diagonal().copy_(channel_weight.reshape(-1))

    def row_error(s: torch.Tensor) -> torch.Tensor:
        e = (w - s * values).reshape(len(w), -1)
        return ((e @ a) * e).sum(-1)

    assert (row_error(solved) <= row_error(scale)).all() and row_error(solved).sum() < 0.95 * row_error(scale).sum()
    assert solved[5, 2] == 0 and (solved[scale > 0] > 0).all()
    assert torch.equal(solved, solved.half().float())  # fp16 values: what is stored


def test_channel_floor_lowers_the_error_under_another_texts_statistics():
    """The mean squares of the calibration text span orders of magnitude, and another text's differ channel by
    channel: a floor under the quiet channels' error weights fits the layer for both (here: log-normal mean
    squares, and another text's scaled per channel by a log-normal factor)."""
    errors = {0.0: 0.0, 0.1: 0.0}
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        calibration = torch.exp(2.5 * torch.randn(256, generator=generator))
        other = calibration * torch.exp(1.5 * torch.randn(256, generator=generator))
        weight = torch.randn(128, 256, generator=generator)
        for floor in errors:
            result = quantize_layer(weight, calibration, 64, CodebookOptions(channel_floor=floor))
            dense = dequantize(pack_indices(result.indices), result.scales.t().contiguous(), result.codebooks, 64)
            errors[floor] += weighted_error(weight, dense, other)
    assert errors[0.1] < 0.95 * errors[0.0]

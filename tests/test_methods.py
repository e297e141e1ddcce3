"""GPTQ, AWQ, NF4, the uniform grid and the AWQ format on cases whose right answer is known."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from aaac_kernels.experts import unfuse_experts
from aaac_kernels.format import awq as awq_format
from aaac_kernels.format.errors import AAACError
from aaac_kernels.format.experts import NAMINGS
from offline_quantize import awq_search
from offline_quantize.cli import quantize_parser
from offline_quantize.codebooks import NF4, CodebookGrid, CodebookOptions, nf4_grid
from offline_quantize.compare import variants
from offline_quantize.gptq import gptq
from offline_quantize.methods import METHODS, LayerOptions, Method, MethodOptions, compared_variants
from offline_quantize.methods.registry import Flag, markdown_table, register
from offline_quantize.objectives import layer_errors, output_error
from offline_quantize.source import block_linears, block_routers
from offline_quantize.statistics import LinearStatistics
from offline_quantize.uniform_grid import UniformGrid, rtn_dequantized

G = 32
N, K = 48, 128


def _second_moment(k: int = K, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """mean(x x^T) of correlated inputs with a few loud channels, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :4] *= 8
    return x.t() @ x / tokens


def _output_error(weight, approx, h):
    return output_error(weight.float(), approx.float(), h).item()


def _on_grid(symmetric: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight already on the uniform grid (every group spans its full code range), and its codes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=g)
    codes[:, ::G], codes[:, 1::G] = 0, 15  # the min/max rule then recovers scale and zero exactly
    scale = (torch.rand(N, K // G, 1, generator=g) + 0.5).half().float() / 16
    zero = torch.full_like(scale, 8) if symmetric else torch.randint(3, 13, scale.shape, generator=g).float()
    weight = ((codes.reshape(N, K // G, G) - zero) * scale).reshape(N, K)
    return weight, codes


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reproduces_a_weight_already_on_the_grid(act_order):
    weight, codes = _on_grid(symmetric=False)
    got, (scale, zero), dense = gptq(weight, _second_moment(), G, UniformGrid(), act_order=act_order)
    assert torch.equal(got.long(), codes)
    assert torch.equal(dense, weight)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal H no error is spread to other columns: GPTQ must equal RTN exactly."""
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    h = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(2)) + 0.1)
    _, _, dense = gptq(weight, h, G, UniformGrid())
    assert torch.equal(dense, rtn_dequantized(weight, G))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_of_rtn(act_order):
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(3))
    h = _second_moment()
    _, _, dense = gptq(weight, h, G, UniformGrid(), act_order=act_order)
    assert _output_error(weight, dense, h) < 0.8 * _output_error(weight, rtn_dequantized(weight, G), h)


def test_gptq_with_learned_codebooks_reproduces_codebook_weights_and_compensates():
    g = torch.Generator().manual_seed(4)
    codebooks = torch.sort(torch.rand(2, 16, generator=g) * 1.8 - 0.9).values.half()
    codebooks[:, 0], codebooks[:, -1] = -1, 1  # entries in [-1, 1], as learned on w / absmax
    choice = torch.rand(N, K // G, 1, generator=g) < 0.5
    idx = torch.randint(1, 15, (N, K // G, G), generator=g)
    idx[..., 0] = 15
    scale = (torch.rand(N, K // G, 1, generator=g) + 0.5).half().float()
    table = codebooks.float()
    weight = (torch.where(choice, table[1][idx], table[0][idx]) * scale).reshape(N, K)
    grid = CodebookGrid(codebooks)
    h = _second_moment()
    _, (got_scale, got_choice), dense = gptq(weight, h, G, grid)
    assert torch.equal(dense, weight) and torch.equal(got_choice, choice)

    noisy = weight + 0.05 * torch.randn(N, K, generator=g)
    _, params, compensated = gptq(noisy, h, G, grid)
    plain = grid.quantize(noisy.reshape(N, K // G, G), params)[1].reshape(N, K)
    assert _output_error(noisy, compensated, h) < 0.8 * _output_error(noisy, plain, h)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_static_group_parameters(act_order):
    """Given parameters are the ones used and returned, in either column order; compensation still pays."""
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(5))
    h = _second_moment()
    grid = UniformGrid()
    static = grid.fit(weight.reshape(N, K // G, G))
    _, params, dense = gptq(weight, h, G, grid, act_order=act_order, static=static)
    assert all(torch.equal(got, given) for got, given in zip(params, static))
    plain = grid.quantize(weight.reshape(N, K // G, G), static)[1].reshape(N, K)
    assert _output_error(weight, dense, h) < 0.8 * _output_error(weight, plain, h)


def test_aaac_compensation_keeps_the_learned_scales_and_lowers_the_output_error():
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(6))
    h = _second_moment()
    stats = LinearStatistics(h.diagonal().clone(), 0.3 * h.diagonal().sqrt(), h.diagonal().sqrt(), h)
    # Compensation re-rounds onto scales and codebooks fitted to the mean squares as they are: no channel
    # floor, no scale solve with the means or H (its sweep sees the full second moment).
    as_they_are = CodebookOptions(channel_floor=0.0, mean_weight=0.0, covariance_weight=0.0)
    learned = LayerOptions("x", G, frozenset(), as_they_are)
    plain = METHODS["aaac"].quantize(weight, stats, learned)
    compensated = METHODS["aaac"].quantize(weight, stats, LayerOptions("x", G, frozenset({"compensate"})))
    for name in ("scales", "codebooks"):
        assert torch.equal(compensated.tensors[name], plain.tensors[name])
    assert not torch.equal(compensated.tensors["qweight"], plain.tensors["qweight"])
    assert _output_error(weight, compensated.dense, h) < 0.8 * _output_error(weight, plain.dense, h)


def test_uniform_grid_rules():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scale, zero = UniformGrid().fit(w)
    assert scale.item() == pytest.approx(3 / 15, rel=1e-3) and zero.item() == 5
    codes, values = UniformGrid().quantize(w, (scale, zero))
    assert codes.tolist() == [[0, 5, 8, 15]] and values[0, 0].item() == pytest.approx(-1.0, rel=1e-3)
    scale, zero = UniformGrid(symmetric=True).fit(w)
    assert zero.item() == 8 and scale.item() == pytest.approx(4 / 15, rel=1e-3)
    assert UniformGrid().fit(torch.full((1, 4), 3.0))[1].item() == 0  # zero points stay in 4 bits


def test_nf4_is_the_table_times_absmax():
    w = torch.tensor(NF4).reshape(1, 1, 16) * 0.5
    grid = nf4_grid()
    scale, choice = grid.fit(w, torch.ones(1, 16))
    codes, values = grid.quantize(w, (scale, choice))
    assert scale.item() == 0.5 and codes.flatten().tolist() == list(range(16))
    assert torch.allclose(values, torch.tensor(NF4).half().float() * 0.5)


def test_awq_search_keeps_on_grid_weights_and_finds_salient_channels():
    weight, _ = _on_grid(symmetric=False)
    h = _second_moment()
    activation = h.diagonal().sqrt()
    s, alpha = awq_search.search_scale([weight], [h], activation, G, UniformGrid())
    assert alpha == 0 and torch.equal(s, torch.ones(K))  # nothing beats exact
    assert torch.equal(awq_search.search_clip(weight, h, G, UniformGrid()), weight)

    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(5))
    s, alpha = awq_search.search_scale([weight], [h], activation, G, UniformGrid())
    assert alpha > 0 and s[:4].min() > s[4:].max()  # the loud channels get the larger scales
    scaled = rtn_dequantized(weight * s, G) / s
    assert _output_error(weight, scaled, h) < 0.9 * _output_error(weight, rtn_dequantized(weight, G), h)
    clipped = rtn_dequantized(awq_search.search_clip(weight, h, G, UniformGrid()), G)
    assert _output_error(weight, clipped, h) < _output_error(weight, rtn_dequantized(weight, G), h)


def _llama_block(kv_heads: int) -> tuple[LlamaDecoderLayer, LlamaConfig]:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        num_hidden_layers=1,
        max_position_embeddings=256,
    )
    block = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.uniform_(0.5, 1.5)
    return block, config


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_awq_scaling_leaves_the_float_block_unchanged(kv_heads):
    block, config = _llama_block(kv_heads)
    x = torch.randn(2, 16, 64)
    position = torch.arange(16).unsqueeze(0)
    rotary = LlamaRotaryEmbedding(config)(x, position)
    with torch.no_grad():
        before = block(x, position_embeddings=rotary)
        before = before[0] if isinstance(before, tuple) else before
        linears = block_linears(block)
        stats = {}
        for name, module in linears.items():
            h = torch.eye(module.in_features) + 0.1
            mean_abs = torch.rand(module.in_features) + 0.5
            stats[name] = LinearStatistics(h.diagonal().clone(), torch.zeros(module.in_features), mean_abs, h)
        folded = awq_search.scale_block(block, 0, linears, stats, 32)
        after = block(x, position_embeddings=rotary)
        after = after[0] if isinstance(after, tuple) else after
    assert ("self_attn.v_proj" in folded) == (kv_heads == 4)  # v -> o only without grouped-query attention
    assert set(folded) >= {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    assert torch.allclose(before, after, atol=1e-4)


def _moe_block(model_type: str):
    """One decoder block of a tiny Mixtral or Qwen2-MoE (with its shared expert), experts unfused into
    linears as the quantizer holds them, random weights."""
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeDecoderLayer, Qwen2MoeRotaryEmbedding

    torch.manual_seed(0)
    shared = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
    if model_type == "mixtral":
        config = MixtralConfig(**shared, intermediate_size=64, num_local_experts=4)
        block, rotary = MixtralDecoderLayer(config, layer_idx=0), MixtralRotaryEmbedding(config)
    else:
        config = Qwen2MoeConfig(**shared, moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=4)
        block, rotary = Qwen2MoeDecoderLayer(config, layer_idx=0), Qwen2MoeRotaryEmbedding(config)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
        fused = block.mlp.experts
        unfuse_experts(block, NAMINGS[model_type])
        for e in range(4):  # transformers' fused gate_up_proj [E, 2I, H] holds gate's rows, then up's
            expert = block.mlp.experts.get_submodule(str(e))
            gate, up, down = (getattr(expert, part) for part in expert.naming.parts)
            gate.weight.copy_(fused.gate_up_proj[e, :64])
            up.weight.copy_(fused.gate_up_proj[e, 64:])
            down.weight.copy_(fused.down_proj[e])
    return block.eval(), rotary


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_awq_scaling_of_experts_leaves_the_float_block_unchanged(model_type):
    block, rotary_embedding = _moe_block(model_type)
    x = torch.randn(2, 16, 64)
    rotary = rotary_embedding(x, torch.arange(16).unsqueeze(0))
    with torch.no_grad():
        before = block(x, position_embeddings=rotary)
        linears = block_linears(block)
        stats = {}
        for name, module in {**linears, **block_routers(block)}.items():
            k = module.weight.shape[1]
            h = torch.eye(k) + 0.1
            stats[name] = LinearStatistics(h.diagonal().clone(), torch.zeros(k), torch.rand(k) + 0.5, h)
        folded = awq_search.scale_block(block, 0, linears, stats, 32)
        after = block(x, position_embeddings=rotary)
    naming = block.mlp.experts.get_submodule("0").naming
    experts = [f"mlp.experts.{e}.{naming.up}" for e in range(4)]
    shared = ["mlp.shared_expert.up_proj"] if model_type == "qwen2_moe" else []
    assert set(folded) == {"input_layernorm", "post_attention_layernorm", *experts, *shared}
    routers = ["mlp.gate", "mlp.shared_expert_gate"] if shared else ["mlp.gate"]
    assert folded["post_attention_layernorm"]["routers"] == routers  # the routers took the scale: same routing
    assert len(folded["post_attention_layernorm"]["linears"]) == 2 * (4 + len(shared))
    assert torch.allclose(before, after, atol=1e-4)


def test_awq_scaling_refuses_blocks_it_cannot_fold():
    block, _ = _llama_block(4)
    del block.post_attention_layernorm
    with pytest.raises(AAACError, match="block 3 of this model has no post_attention_layernorm"):
        awq_search.scaling_groups(block, 3)


def test_awq_format_matches_vllm_packing_and_round_trips():
    from vllm.model_executor.layers.quantization.utils.quant_utils import awq_pack

    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = torch.rand(N, K // G, generator=g).half().float()
    zero = torch.randint(0, 16, (N, K // G), generator=g).float()
    tensors = awq_format.pack(codes, scale, zero)
    assert torch.equal(tensors["qweight"], awq_pack(codes.t().int(), 4, K, N))
    assert torch.equal(tensors["qzeros"], awq_pack(zero.t().int(), 4, K // G, N))
    dense = awq_format.dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], torch.float32)
    expected = (codes.float().reshape(N, K // G, G) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    assert torch.equal(dense, expected.reshape(N, K))


def test_quantize_linear_dense_is_what_the_checkpoint_means():
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(7))
    h = _second_moment()
    stats = LinearStatistics(h.diagonal().clone(), 0.3 * h.diagonal().sqrt(), h.diagonal().sqrt(), h)
    for options in compared_variants():
        layer = LayerOptions("mlp.down_proj", G, options.flags)
        result = options.handler.quantize(weight, stats, layer)
        assert result.dense.shape == (N, K) and torch.isfinite(result.dense).all()
        assert layer_errors(weight, result.dense, stats)["output_error"] < 0.05, options.label
        suffixes = {"qweight", "qzeros", "scales"} if options.format == "awq" else {"qweight", "scales", "codebooks"}
        assert set(result.tensors) == suffixes


@pytest.mark.parametrize(
    "options, message",
    [
        (MethodOptions("gptq", {"awq-scale"}), "--awq-scale applies to --method aaac, not gptq"),
        (MethodOptions("rtn", {"compensate"}), "--compensate applies to --method aaac, not rtn"),
        (MethodOptions("aaac", {"act-order"}), "--act-order applies to --method gptq, not aaac"),
        (MethodOptions("aaac", {"fast"}), "unknown flag --fast"),
        (MethodOptions("int3"), "unknown method 'int3'"),
    ],
)
def test_method_options_refuse_meaningless_combinations(options, message):
    with pytest.raises(AAACError, match=message):
        options.check()


def test_a_registered_method_reaches_the_cli_compare_and_docs_table():
    """Adding a method is one module: registering it is all the CLI, aaac-compare and the docs table need."""

    class Halves(Method):
        name = "halves"
        help = "every weight rounded to a multiple of half its group's absmax (a test method)"
        format = "aaac"
        flags = (Flag("coarse", "coarse", "a flag of the test method"),)
        compared = (frozenset(), frozenset({"coarse"}))

        def quantize(self, weight, stats, options):
            raise NotImplementedError

    register(Halves)
    try:
        parser = quantize_parser()
        assert parser.parse_args(["src", "out", "--method", "halves", "--coarse"]).coarse
        assert list(variants())[-2:] == ["halves", "halves+coarse"]
        assert variants()["halves+coarse"] == ["--method", "halves", "--coarse"]
        assert "| `halves` | every weight rounded" in markdown_table()
        assert "--coarse applies to --method halves, not aaac" in str(
            pytest.raises(AAACError, MethodOptions("aaac", {"coarse"}).check).value
        )
    finally:
        del METHODS["halves"]

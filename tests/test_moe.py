"""Mixture-of-experts models (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): quantized expert by expert, loaded
packed in transformers, served by vLLM's CPU build with tensor, expert and pipeline parallel (one of
them quantized with AWQ scaling), all against the reference dequantizer."""

import itertools
import json

import pytest
import torch
from safetensors import safe_open

import aaac_kernels.routed_experts  # noqa: F401  registers torch.ops.aaac.routed_experts
from aaac_kernels.format.experts import NAMINGS
from aaac_kernels.format.serving import prepare
from aaac_kernels.hf import AAACLinear
from offline_quantize.hf_loader import load_causal_lm, load_reference
from offline_quantize.methods import MethodOptions
from offline_quantize.pipeline import Settings, quantize_model
from offline_quantize.statistics import MIN_EXPERT_TOKENS, BatchSums, ChannelStatistics, expert_statistics

from .conftest import random_layer, tiny_moe, vllm_engine
from .test_vllm import _check_close, _hf_greedy, _vllm_greedy

MODEL_TYPES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
EXPERTS, LAYERS = 4, 2
# Where each stores its experts.
MOE_BLOCK = {"mixtral": "block_sparse_moe", "olmoe": "mlp", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}
PROMPTS_IDS = [[1, 2, 3, 4, 5], [100, 2000, 30000, 17], [4000, 4001, 4002, 4003, 4004, 4005, 4006]]


# Quantized with AWQ scaling, so that vLLM serves folded routers and shared experts too (tensor and
# pipeline parallel, below); the others with plain AAAC.
AWQ_SCALED = "qwen2_moe"


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory, small_calib) -> dict[str, tuple]:
    """Each model type as a tiny random model, quantized by the pipeline at group size 32: (folder, report).
    The source model is in the folder's sibling ``source``."""
    checkpoints = {}
    for model_type in MODEL_TYPES:
        root = tmp_path_factory.mktemp(model_type)
        source = tiny_moe(root / "source", model_type, experts=EXPERTS, layers=LAYERS)
        method = MethodOptions("aaac", {"awq-scale"} if model_type == AWQ_SCALED else set())
        settings = Settings(group_size=32, nsamples=8, seqlen=128, calib=[small_calib], device="cpu", method=method)
        checkpoints[model_type] = root / "aaac", quantize_model(source, root / "aaac", settings)
    return checkpoints


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_each_expert_part_is_stored_as_a_linear_of_its_own(moe_checkpoints, model_type):
    path, report = moe_checkpoints[model_type]
    naming, block = NAMINGS[model_type], f"model.layers.1.{MOE_BLOCK[model_type]}"
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        router = f.get_tensor(f"{block}.gate.weight")
    for e in range(EXPERTS):
        for part in naming.parts:
            assert {f"{block}.experts.{e}.{part}.{t}" for t in ("qweight", "scales", "codebooks")} <= keys
            assert f"{block}.experts.{e}.{part}.weight" not in keys
    assert not any("gate_up_proj" in key for key in keys)
    # The router keeps its precision and is named as unquantized, for every loader.
    assert router.dtype == torch.bfloat16 and router.shape == (EXPERTS, 128)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert f"{block}.gate" in config["modules_to_not_convert"]
    if model_type == "qwen2_moe":  # the shared expert is an ordinary MLP; its gate is a router
        assert f"{block}.shared_expert_gate" in config["modules_to_not_convert"]
        assert {f"{block}.shared_expert.{p}.qweight" for p in naming.parts} <= keys
    summary = report["summary"]
    assert summary["expert_parts"] == LAYERS * EXPERTS * 3
    # 8 windows of 128 tokens, 2 of 4 experts per token: about 512 tokens per expert, none pooled.
    assert summary["expert_parts_with_pooled_statistics"] == 0
    tokens = [entry["calibration_tokens"] for name, entry in report["layers"].items() if ".experts." in name]
    assert min(tokens) >= MIN_EXPERT_TOKENS and sum(tokens) == LAYERS * 3 * 2 * 8 * 128


def test_awq_scaling_folds_into_the_routers_the_checkpoint_stores(moe_checkpoints):
    # Qwen2-MoE: its router is a module of its own, its shared expert's an nn.Linear (test_methods.py checks
    # that the float block is unchanged, Mixtral's too).
    model_type = AWQ_SCALED
    path, report = moe_checkpoints[model_type]
    source = path.parent / "source"
    block = MOE_BLOCK[model_type]
    routers = ["gate", "shared_expert_gate"]
    with (
        safe_open(str(source / "model.safetensors"), "pt") as old,
        safe_open(str(path / "model.safetensors"), "pt") as new,
    ):
        for i in range(LAYERS):
            layer = f"model.layers.{i}"
            entry = report["layers"][f"{layer}.post_attention_layernorm"]
            assert entry["awq_alpha"] > 0 and {f"mlp.{r}" for r in routers} <= set(entry["scales"])  # the model's names
            # The norm's output is divided by s and every router's input channels multiplied by it: their
            # product is the source's, up to the rounding of each to bf16.
            norm = (
                new.get_tensor(f"{layer}.post_attention_layernorm.weight").float(),
                old.get_tensor(f"{layer}.post_attention_layernorm.weight").float(),
            )
            assert not torch.equal(*norm)
            for router in routers:
                name = f"{layer}.{block}.{router}.weight"
                folded, plain = new.get_tensor(name).float() * norm[0], old.get_tensor(name).float() * norm[1]
                torch.testing.assert_close(folded, plain, rtol=2**-7, atol=1e-6)
            ups = [f"experts.{e}.{NAMINGS[model_type].up}" for e in range(EXPERTS)] + ["shared_expert.up_proj"]
            for up in ups:  # each expert's up feeds its own down
                assert "awq_alpha" in report["layers"][f"{layer}.{block}.{up}"]
    ids = torch.tensor(PROMPTS_IDS[2:])
    with torch.no_grad():
        logits = load_reference(path, dtype=torch.float32)(ids).logits
        plain = load_reference(source, dtype=torch.float32)(ids).logits
    # 4-bit weights of a random model: the logits stay near the source's.
    assert (logits - plain).norm() < 0.5 * plain.norm()


def test_rarely_routed_experts_take_their_layers_pooled_statistics():
    def stats(scale: float, tokens: int) -> ChannelStatistics:
        acc = ChannelStatistics(4, torch.device("cpu"))
        if tokens:
            acc.add(BatchSums.of(torch.full((tokens, 4), scale), full=False))
        return acc

    accumulators = {
        "mlp.experts.0.gate_proj": stats(1.0, 3 * MIN_EXPERT_TOKENS),
        "mlp.experts.1.gate_proj": stats(2.0, MIN_EXPERT_TOKENS - 1),  # too few: pooled
        "mlp.experts.2.gate_proj": stats(0.0, 0),  # never routed: pooled
        "mlp.experts.0.down_proj": stats(3.0, MIN_EXPERT_TOKENS),  # enough: its own
        "self_attn.q_proj": stats(5.0, 1),  # not an expert: always its own
    }
    result, pooled = expert_statistics(accumulators)
    assert pooled == ["mlp.experts.1.gate_proj", "mlp.experts.2.gate_proj"]
    tokens = 4 * MIN_EXPERT_TOKENS - 1
    expected = (3 * MIN_EXPERT_TOKENS * 1.0 + (MIN_EXPERT_TOKENS - 1) * 4.0) / tokens  # mean of x^2 over all
    for name in pooled:
        torch.testing.assert_close(result[name].mean_square, torch.full((4,), expected))
    torch.testing.assert_close(result["mlp.experts.0.gate_proj"].mean_square, torch.ones(4))
    torch.testing.assert_close(result["mlp.experts.0.down_proj"].mean_square, torch.full((4,), 9.0))
    torch.testing.assert_close(result["self_attn.q_proj"].mean_square, torch.full((4,), 25.0))


@pytest.mark.parametrize("weights_on_input", [False, True])
def test_routed_experts_op_skips_other_ranks_experts(weights_on_input):
    # Global experts 0..3, of which this rank holds 2 and 0 (expert parallel); tokens routed to 1 and 3 are
    # another rank's. fp32 activations: the decode kernels' exact weights, so only the order of sums differs.
    hidden, intermediate, group = 128, 64, 32
    experts = {
        e: (
            random_layer([intermediate] * 2, hidden, group, seed=e),
            random_layer([hidden], intermediate, group, seed=10 + e),
        )
        for e in (2, 0)
    }
    layouts = [[prepare(*layer[:3]) for layer in experts[e]] for e in (2, 0)]
    w13, w2 = ([torch.stack(t) for t in zip(*(layout[i] for layout in layouts))] for i in (0, 1))
    expert_map = torch.tensor([1, -1, 0, -1], dtype=torch.int32)
    x = torch.randn(5, hidden)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3], [2, 0], [0, 2]], dtype=torch.int32)
    weights = torch.rand(5, 2)
    got = torch.ops.aaac.routed_experts(x, weights, ids, *w13, *w2, intermediate, expert_map, weights_on_input)
    want = torch.zeros_like(x, dtype=torch.float64)
    for (t, k), e in zip(itertools.product(range(5), range(2)), ids.flatten().tolist()):
        if e in experts:
            (*_, gate_up), (*_, down) = experts[e]
            w = weights[t, k].double()
            inputs = x[t].double() * (w if weights_on_input else 1)
            g, u = (gate_up.double() @ inputs).split(intermediate)
            want[t] += (down.double() @ (torch.nn.functional.silu(g) * u)) * (1 if weights_on_input else w)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert got[2].abs().max() == 0  # both of its experts live on another rank
    # Its fake implementation (what torch.compile traces with) agrees with the kernel on shapes and dtypes.
    arguments = (x, weights, ids, *w13, *w2, intermediate, expert_map, weights_on_input)
    torch.library.opcheck(torch.ops.aaac.routed_experts.default, arguments)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_transformers_runs_the_experts_packed_as_the_reference_computes(moe_checkpoints, model_type):
    path, _ = moe_checkpoints[model_type]
    ids = torch.tensor(PROMPTS_IDS[2:])
    with torch.no_grad():
        packed = load_causal_lm(path, dtype=torch.float32)
        logits = packed(ids).logits
        reference = load_reference(path, dtype=torch.float32)(ids).logits
    experts = [m for name, m in packed.named_modules() if isinstance(m, AAACLinear) and ".experts." in name]
    assert len(experts) == LAYERS * EXPERTS * 3
    # fp32: the kernels use the reference's exact weights and differ only in the order of sums.
    assert (logits - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "model_type, parallel",
    [
        # Each expert's intermediate size split over 2 ranks, a shared expert beside the routed ones; and
        # each linear of the attention split over the ranks.
        ("qwen2_moe", {"tensor_parallel_size": 2}),
        ("mixtral", {"tensor_parallel_size": 2, "enable_expert_parallel": True}),  # 2 whole experts per rank
        # Half the blocks per rank, in compiled mode (where the experts are one op; vLLM 0.32's CPU build runs
        # pipeline parallel only compiled, docs/vllm.md).
        ("qwen2_moe", {"pipeline_parallel_size": 2, "enforce_eager": False}),
    ],
)
def test_vllm_serves_the_experts_as_the_reference_computes(moe_checkpoints, model_type, parallel, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one NUMA node here: one core per rank
    path, _ = moe_checkpoints[model_type]
    reference = _hf_greedy(load_reference(path, dtype=torch.float32), PROMPTS_IDS)
    with vllm_engine(path, dtype="float32", **parallel) as llm:
        got = _vllm_greedy(llm, PROMPTS_IDS)
    # fp32 on both sides: only the order of sums differs (attention kernels, the ranks' all-reduce).
    identical = _check_close(reference, got, [str(p) for p in PROMPTS_IDS], logprob_tol=1e-3)
    assert identical == len(PROMPTS_IDS)

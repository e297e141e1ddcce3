"""AAAC checkpoints in transformers (``aaac_kernels.hf``): loaded packed, computed by ``torch.ops.aaac.linear``,
equal to the reference dequantizer."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import aaac_kernels.hf  # noqa: F401  registers the aaac method with transformers
from aaac_kernels.hf import AAACLinear
from offline_quantize.hf_loader import load_causal_lm, load_reference


@pytest.fixture(scope="module")
def prompt_ids(quantized) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(quantized)
    return tokenizer(["The capital of France is a city that"], return_tensors="pt").input_ids


def test_from_pretrained_keeps_the_layers_packed(quantized):
    model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16, device_map="cpu")
    layers = [m for m in model.modules() if isinstance(m, AAACLinear)]
    assert len(layers) == 210  # every linear of the 30 blocks; lm_head (modules_to_not_convert) stays dense
    assert not isinstance(model.lm_head, AAACLinear)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.qweight.dtype == torch.uint8 and q_proj.qweight.shape == (576, 576 // 2)  # the CPU layout
    assert q_proj.scales.dtype == torch.float16 and q_proj.codebooks.shape == (1, 2, 16)
    assert not any(name.endswith("proj.weight") for name, _ in model.named_parameters())


def test_fp32_logits_equal_the_reference_dequantizer(quantized, prompt_ids):
    # The kernels use the reference's exact fp32 weight and differ only in the order of sums.
    with torch.no_grad():
        packed = load_causal_lm(quantized, dtype=torch.float32)(prompt_ids).logits.float()
        reference = load_reference(quantized, dtype=torch.float32)(prompt_ids).logits.float()
    assert (packed - reference).abs().max().item() < 1e-3
    assert torch.equal(packed[0, -1].topk(3).indices, reference[0, -1].topk(3).indices)


def test_bf16_logits_are_as_close_to_fp32_as_the_reference_dequantizer(quantized, prompt_ids):
    """In bf16 the kernels take the exact fp32 weight (avx2's int16 kernel: rounded 64 times finer than bf16),
    the reference its bf16 rounding, and both round activations at their own points, so the two bf16 models
    are compared with the fp32 one, the same quantized weights without roundings: the packed model must be
    about as close to it as the bf16 reference is (logits of 10-30; seen on the AVX2 machine: 0.51-0.73
    against 0.66-0.91, while the two bf16 models are up to 1.08 apart). A wrong index, scale or codebook
    moves logits by whole units and the top 3."""
    with torch.no_grad():
        exact = load_reference(quantized, dtype=torch.float32)(prompt_ids).logits.float()
        packed = load_causal_lm(quantized, dtype=torch.bfloat16)(prompt_ids).logits.float()
        reference = load_reference(quantized, dtype=torch.bfloat16)(prompt_ids).logits.float()
    packed_error, reference_error = ((m - exact).abs().max().item() for m in (packed, reference))
    assert packed_error < 1.25 * reference_error, (packed_error, reference_error)
    assert torch.equal(packed[0, -1].topk(3).indices, exact[0, -1].topk(3).indices)


def test_generate(quantized):
    tokenizer = AutoTokenizer.from_pretrained(quantized)
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    out = load_causal_lm(quantized).generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])

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


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 1.0)])
def test_logits_equal_the_reference_dequantizer(quantized, prompt_ids, dtype, tolerance):
    # fp32: the kernels use the reference's exact fp32 weight and differ only in the order of sums. bf16:
    # the reference's bf16 weights against the kernels' exact fp32 ones (or, on CPUs with a bf16 multiply,
    # the same bf16 ones), bf16 activations rounded at other points (logits of 10-30; seen: 0.59 apart on
    # the AVX2 machine). A wrong index, scale or codebook moves logits by whole units and the top 3.
    with torch.no_grad():
        packed = load_causal_lm(quantized, dtype=dtype)(prompt_ids).logits.float()
        reference = load_reference(quantized, dtype=dtype)(prompt_ids).logits.float()
    assert (packed - reference).abs().max().item() < tolerance
    assert torch.equal(packed[0, -1].topk(3).indices, reference[0, -1].topk(3).indices)


def test_generate(quantized):
    tokenizer = AutoTokenizer.from_pretrained(quantized)
    ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    out = load_causal_lm(quantized).generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])

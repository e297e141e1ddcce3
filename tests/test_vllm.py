"""The AAAC SmolLM2 in vLLM's engine (the CPU build) against transformers running the reference dequantizer."""

import pytest
import torch
from transformers import AutoTokenizer

from aaac_kernels.linear import native
from aaac_vllm.linear_method import cpu_kernel_path
from offline_quantize.hf_loader import load_reference

from .conftest import vllm_engine

PROMPTS = [
    "The capital of France is",
    "Football is a sport in which",
    "Gordon Brown said on Tuesday that the economy",
    "The new mobile phone from Nokia has",
    "def fibonacci(n):",
    "Once upon a time, there was a",
]
MAX_TOKENS = 16
TOP = 5
# Two steps of a bf16 logit of magnitude 16-32 (0.125 each), where vLLM computes its log-probabilities.
BF16_LOGPROB_TOL = 0.3


def _vllm_greedy(
    llm, prompts_ids: list[list[int]], max_tokens: int = MAX_TOKENS
) -> list[tuple[list[int], list[dict[int, float]]]]:
    from vllm import SamplingParams, TokensPrompt

    # min_tokens keeps EOS from being picked, as min_new_tokens does in _hf_greedy (ignore_eos alone would let
    # vLLM pick it where the reference cannot); the log-probabilities are the raw model's in both.
    params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens, logprobs=TOP, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids], params, use_tqdm=False)
    return [
        (list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
        for o in outputs
    ]


def _hf_greedy(model, prompts_ids: list[list[int]]) -> list[tuple[list[int], list[dict[int, float]]]]:
    results = []
    for ids in prompts_ids:
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            min_new_tokens=MAX_TOKENS,
            output_logits=True,  # the raw logits: the scores are after min_new_tokens masked EOS
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        tokens = out.sequences[0, len(ids) :].tolist()
        steps = []
        for logits in out.logits:
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            top = torch.topk(logprobs, TOP)
            steps.append(dict(zip(top.indices.tolist(), top.values.tolist())))
        results.append((tokens, steps))
    return results


def _check_close(reference, candidate, names: list[str], logprob_tol: float) -> int:
    """Greedy sequences agree token for token, or part at a near tie; returns how many agree fully.

    Two engines with different kernels (vLLM's bf16 paged attention, transformers' fp32 eager attention)
    can pick different tokens where the top two candidates are within rounding of each other. So where the
    tokens part, each token must be in the other's top 5 and the reference must rate them within
    ``logprob_tol`` of each other; after that point the texts are no longer comparable. Up to that point
    every step's top-1 log-probability must agree within ``logprob_tol``.
    """
    identical = 0
    for (ref_tokens, ref_steps), (tokens, steps), name in zip(reference, candidate, names):
        for i, (a, b) in enumerate(zip(ref_tokens, tokens)):
            if a != b:
                assert b in ref_steps[i] and a in steps[i], f"{name!r}: step {i} picks {b}, reference {a}"
                assert abs(ref_steps[i][a] - ref_steps[i][b]) < logprob_tol, f"{name!r}: step {i} is no near tie"
                break
            assert abs(ref_steps[i][a] - steps[i][b]) < logprob_tol, f"{name!r}: step {i} logprob differs"
        else:
            identical += 1
    return identical


@pytest.fixture(scope="module")
def smollm2_engine(quantized):
    """The one eager vLLM engine on the AAAC SmolLM2 that these tests share."""
    with vllm_engine(quantized) as llm:
        yield llm


def test_vllm_greedy_matches_reference_dequantizer(smollm2_engine, quantized):
    path = quantized
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts_ids = [tokenizer(p).input_ids for p in PROMPTS]
    reference = _hf_greedy(load_reference(path, dtype=torch.float32), prompts_ids)
    got = _vllm_greedy(smollm2_engine, prompts_ids)
    # bf16 activations and logits in vLLM against fp32 in the reference: most log-probabilities differ by a
    # few hundredths, a few by up to 0.25 (one step of a bf16 logit between 16 and 32 is 0.125).
    identical = _check_close(reference, got, PROMPTS, logprob_tol=BF16_LOGPROB_TOL)
    assert identical >= len(PROMPTS) // 2, f"only {identical} of {len(PROMPTS)} greedy continuations agree fully"


def test_vllm_text_is_sensible(smollm2_engine):
    from vllm import SamplingParams

    out = smollm2_engine.generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    assert "Paris" in out[0].outputs[0].text


def test_every_kernel_path_gives_the_engines_answers(smollm2_engine, quantized):
    # The engine runs the fastest C++ path of this CPU; switched to each other path this CPU runs (the
    # engine runs in this process, so it takes the switch at its next call), it must give the same text.
    # The paths use the same weights (exact in fp32, or rounded to bf16 where a path multiplies bf16
    # tiles) and differ in that rounding and the order of fp32 sums (at a batch of 6, avx2 runs its decode
    # kernel and scalar fp32 tiles and at::mm), which moves a bf16 logit by a step now and then (seen: up
    # to 0.25 in log-probability): every text must agree or part at a near tie (_check_close), and half
    # must agree fully, the bar of the test against the reference above (seen: 3 of 6 on the AVX2
    # machine). The plain-torch path that runs where the extension is not built is checked against the
    # C++ kernels in test_cpu_kernels.py.
    paths = native.supported_isas()
    assert smollm2_engine.apply_model(cpu_kernel_path) == [paths[-1]]
    tokenizer = AutoTokenizer.from_pretrained(quantized)
    prompts_ids = [tokenizer(p).input_ids for p in PROMPTS]
    fastest = _vllm_greedy(smollm2_engine, prompts_ids, max_tokens=8)
    try:
        for path in paths[:-1]:
            native.set_isa(path)
            assert smollm2_engine.apply_model(cpu_kernel_path) == [path]
            got = _vllm_greedy(smollm2_engine, prompts_ids, max_tokens=8)
            assert _check_close(fastest, got, PROMPTS, logprob_tol=BF16_LOGPROB_TOL) >= len(PROMPTS) // 2, path
    finally:
        native.set_isa(paths[-1])

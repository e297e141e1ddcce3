"""The AAAC SmolLM2 in vLLM's engine (the CPU build) against transformers running the reference dequantizer."""

import pytest
import torch
from transformers import AutoTokenizer

from aaac_kernels import cpu
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

    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=TOP, ignore_eos=True)
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
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        tokens = out.sequences[0, len(ids) :].tolist()
        steps = []
        for scores in out.scores:
            logprobs = torch.log_softmax(scores[0].float(), dim=-1)
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


def test_native_kernels_match_torch_path(smollm2_engine, quantized, monkeypatch):
    # The engine these tests share runs the C++ kernels (the fastest path of this CPU); a second engine,
    # with AAAC_CPU_ISA=torch, rebuilds each dense bf16 weight and calls F.linear. Both use the
    # reference's bf16 weights and differ only in the order of the fp32 sums, which moves a bf16 logit
    # by a step now and then (seen: up to 0.25 in log-probability): every text must agree with the other
    # path's or part from it at a near tie (_check_close asserts that), and most must agree fully (one
    # fresh-clone run here saw 4 of the 6 agree fully, two others at least 5).
    assert smollm2_engine.apply_model(cpu_kernel_path) == [native.supported_isas()[-1]]
    tokenizer = AutoTokenizer.from_pretrained(quantized)
    prompts_ids = [tokenizer(p).input_ids for p in PROMPTS]
    got = _vllm_greedy(smollm2_engine, prompts_ids, max_tokens=8)  # the torch path is slow: 8 tokens
    monkeypatch.setenv(cpu.ISA_VARIABLE, cpu.TORCH_PATH)
    with vllm_engine(quantized) as llm:
        assert llm.apply_model(cpu_kernel_path) == [cpu.TORCH_PATH]
        reference = _vllm_greedy(llm, prompts_ids, max_tokens=8)
    assert _check_close(reference, got, PROMPTS, logprob_tol=BF16_LOGPROB_TOL) >= len(PROMPTS) // 2 + 1


@pytest.fixture(scope="module")
def tiny_fp32_engine(tiny_quantized):
    """One eager fp32 engine on the small random model, on one rank: the batching test's, and the reference
    of the parallel ones."""
    with vllm_engine(tiny_quantized, dtype="float32") as llm:
        yield llm


def test_batched_answers_equal_solo_answers_in_fp32(tiny_fp32_engine, bbc_text):
    """Concurrent clients put requests of mixed lengths into one batch, so each layer runs at other row
    counts than alone (other CPU kernels, other sums). In fp32 those rounding differences are far below any
    gap between tokens: every answer in a batch of 32 must be exactly the one its request gets alone."""
    from vllm import SamplingParams

    paragraphs = [p.strip().splitlines()[0] for p in bbc_text["eval"].read_text().split("\n\n") if p.strip()]
    requests = [(paragraphs[i % 8], (8, 16, 32, 48)[i % 4]) for i in range(32)]

    def generate(batch):
        params = [SamplingParams(temperature=0, max_tokens=n) for _, n in batch]
        outputs = tiny_fp32_engine.generate([prompt for prompt, _ in batch], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    alone = {request: generate([request])[0] for request in set(requests)}
    batched = generate(requests)
    assert [alone[request] for request in requests] == batched


def test_tensor_and_pipeline_parallel_2_match_1_rank(tiny_fp32_engine, tiny_quantized, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one NUMA node here: one core per rank
    prompts_ids = [[1, 2, 3, 4, 5], [100, 2000, 30000, 17], [4000, 4001, 4002, 4003, 4004, 4005, 4006]]
    runs = {
        "tensor parallel 2": {"tensor_parallel_size": 2},
        # vLLM 0.32's CPU build runs pipeline parallel only in compiled mode (docs/vllm.md).
        "pipeline parallel 2": {"pipeline_parallel_size": 2, "enforce_eager": False},
    }
    one_rank = _vllm_greedy(tiny_fp32_engine, prompts_ids)
    for name, options in runs.items():
        with vllm_engine(tiny_quantized, dtype="float32", **options) as llm:
            parallel = _vllm_greedy(llm, prompts_ids)
        # fp32 throughout: the ranks only change the order of sums (the all-reduce) or where layers run.
        identical = _check_close(one_rank, parallel, [str(p) for p in prompts_ids], logprob_tol=1e-3)
        assert identical == len(prompts_ids), name

"""The small random model in vLLM's engine in fp32, where rounding differences are far below any gap
between tokens: batched answers equal solo ones, and pipeline parallel equals one rank."""

import pytest

from .conftest import vllm_engine
from .test_vllm import _check_close, _vllm_greedy


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


def test_pipeline_parallel_2_matches_1_rank(tiny_fp32_engine, tiny_quantized, monkeypatch):
    """Each rank loads and runs its half of the blocks. (Tensor parallel, where each AAAC linear is split
    over the ranks, is served in test_moe.py: the attention and shared-expert linears of Qwen2-MoE and the
    attention of Mixtral, against the reference dequantizer in fp32.)"""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one NUMA node here: one core per rank
    prompts_ids = [[1, 2, 3, 4, 5], [100, 2000, 30000, 17], [4000, 4001, 4002, 4003, 4004, 4005, 4006]]
    one_rank = _vllm_greedy(tiny_fp32_engine, prompts_ids)
    # vLLM 0.32's CPU build runs pipeline parallel only in compiled mode (docs/vllm.md).
    with vllm_engine(tiny_quantized, dtype="float32", pipeline_parallel_size=2, enforce_eager=False) as llm:
        parallel = _vllm_greedy(llm, prompts_ids)
    # fp32 throughout: the ranks only change where layers run.
    assert _check_close(one_rank, parallel, [str(p) for p in prompts_ids], logprob_tol=1e-3) == len(prompts_ids)

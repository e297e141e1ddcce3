"""The small random model in vLLM's engine in fp32, where rounding differences are far below any gap
between tokens: batched answers equal solo ones. (Tensor and pipeline parallel are served in
test_moe.py, against the reference dequantizer in fp32.)"""

import pytest

from .conftest import vllm_engine


@pytest.fixture(scope="module")
def tiny_fp32_engine(tiny_quantized):
    """One eager fp32 engine on the small random model."""
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

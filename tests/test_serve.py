"""aaac-serve (vllm serve) in its default compiled mode (the session's one server, conftest.server), answered
by the official openai client, put under concurrent load, then stopped. That batched answers equal solo ones
exactly in fp32 is checked in-process (test_vllm_fp32.py)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def _load(url: str, text: Path, *options: str) -> dict:
    """benchmarks/load.py against ``url``: 16 requests (4 prompts, mixed lengths, half streamed) from 8
    threads at once."""
    result = subprocess.run(
        [
            sys.executable,
            ROOT / "benchmarks" / "load.py",
            "--url",
            url,
            "--model",
            "smollm2-aaac",
            "--text",
            text,
            "--requests",
            "16",
            "--concurrency",
            "8",
            "--distinct",
            "4",
            "--timeout",
            "300",
            "--json",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused")


def test_server_ran_compiled(server):
    log = server[2].read_text()
    assert "enforce_eager=False" in log and "disabling torch.compile" not in log


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model="smollm2-aaac",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0


def test_completion(client):
    reply = client.completions.create(
        model="smollm2-aaac", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in reply.choices[0].text


def test_streamed_completion(client):
    stream = client.completions.create(
        model="smollm2-aaac", prompt="Football is a sport in which", max_tokens=16, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) > 1 and "".join(pieces).strip()
    whole = client.completions.create(
        model="smollm2-aaac", prompt="Football is a sport in which", max_tokens=16, temperature=0
    )
    assert "".join(pieces) == whole.choices[0].text


def test_concurrent_clients(server, bbc_text):
    # All complete, none errors, and each greedy answer equals the one the same request got alone, or parts
    # from it where the solo run's best two tokens were within 0.3 in log-probability (one bf16 step of
    # the logits): in bf16 a batched step may round differently (docs/reliability.md).
    summary = _load(server[0], bbc_text["eval"])
    assert summary["completed"] == 16 and summary["errors"] == 0 and summary["mismatches"] == 0, summary[
        "first_failures"
    ]
    assert summary["identical"] + summary["near_ties"] == 16


def test_shutdown_is_clean(server, client):
    _, process, log = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]

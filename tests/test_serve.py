"""aaac-serve (vllm serve) in its default compiled mode, answered by the official openai client, put under
concurrent load, then stopped."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from .conftest import BIN, ROOT

START_TIMEOUT = 900  # torch.compile of the whole model takes minutes on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(quantized, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(BIN / "aaac-serve"), str(quantized[0]), "--quantization", "aaac", "--host", "127.0.0.1",
             "--port", str(port), "--max-model-len", "1024", "--served-model-name", "smollm2-aaac"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert process.poll() is None, f"aaac-serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"aaac-serve not up after {START_TIMEOUT} s:\n{log.read_text()[-3000:]}"
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(2)
    yield url, process, log
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused")


def test_server_ran_compiled(server):
    log = server[2].read_text()
    assert "enforce_eager=False" in log and "disabling torch.compile" not in log


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model="smollm2-aaac", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0,
    )
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0


def test_completion(client):
    reply = client.completions.create(model="smollm2-aaac", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].text


def test_streamed_completion(client):
    stream = client.completions.create(
        model="smollm2-aaac", prompt="Football is a sport in which", max_tokens=16, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) > 1 and "".join(pieces).strip()
    whole = client.completions.create(model="smollm2-aaac", prompt="Football is a sport in which", max_tokens=16, temperature=0)
    assert "".join(pieces) == whole.choices[0].text


def test_concurrent_clients(server, bbc_text):
    # 32 requests (mixed lengths, half streamed) from 16 threads at once: all complete, none errors, and
    # each greedy answer equals the one the same request got alone, up to a near tie (benchmarks/load.py).
    result = subprocess.run(
        [sys.executable, ROOT / "benchmarks" / "load.py", "--url", server[0], "--model", "smollm2-aaac",
         "--text", bbc_text["eval"], "--requests", "32", "--concurrency", "16", "--distinct", "8", "--timeout", "300",
         "--json"],
        capture_output=True, text=True, timeout=900,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, summary["first_failures"]
    assert summary["completed"] == 32 and summary["errors"] == 0 and summary["mismatches"] == 0
    assert summary["identical"] + summary["near_ties"] == 32


def test_shutdown_is_clean(server, client):
    _, process, log = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]

"""Shared, session-wide fixtures: the real SmolLM2 checkpoint, real BBC text, one AAAC quantization of it."""

import gc
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when a
# kernel is defined, so it is set before any test module imports aaac_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("AAAC_TEST_MODEL", ROOT / "artifacts" / "SmolLM2-135M-Instruct"))
QUANTIZED = Path(os.environ.get("AAAC_TEST_QUANTIZED", ROOT / "artifacts" / "SmolLM2-135M-Instruct-aaac-g64"))
TEXT = Path(os.environ.get("AAAC_TEST_TEXT", ROOT / "artifacts" / "text"))
BIN = Path(sys.executable).parent
GROUP_SIZE = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def run_cli(tool: str, *args, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run an installed console script the way a user does."""
    result = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def in_process(main, *args) -> subprocess.CompletedProcess:
    """A command's ``main`` called with ``args`` in this process, its exit code and output captured. An
    exception it lets through (a traceback for a user) fails the test."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="session")
def source_model() -> Path:
    assert (MODEL / "config.json").is_file(), f"{MODEL} is missing: run `make test`, which prepares it"
    return MODEL


@pytest.fixture(scope="session")
def bbc_text() -> dict[str, Path]:
    paths = {part: TEXT / f"bbc-{part}.txt" for part in ("calib", "eval")}
    assert all(p.is_file() for p in paths.values()), f"{TEXT} is missing: run `make test`, which prepares it"
    return paths


@pytest.fixture(scope="session")
def small_calib(tmp_path_factory, bbc_text) -> Path:
    """The first 200 kB of the BBC calibration text, enough for the small runs: reading and tokenizing the
    whole 4.5 MB took about 8 s per run on the 2-core machine."""
    path = tmp_path_factory.mktemp("calib") / "bbc-calib-200k.txt"
    path.write_text(bbc_text["calib"].read_text()[:200_000])
    return path


@pytest.fixture(scope="session")
def pydoc_text() -> Path:
    path = TEXT / "pydoc-topics.txt"
    assert path.is_file(), f"{path} is missing: run `make test`, which prepares it"
    return path


@pytest.fixture(scope="session")
def smollm2_one_block(tmp_path_factory, source_model) -> Path:
    """The real SmolLM2 cut to its first decoder block (trained weights, real tokenizer): every method runs
    end to end on it in seconds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("smollm2-1") / "SmolLM2-1-block"
    config = AutoConfig.from_pretrained(source_model)
    config.num_hidden_layers = 1
    model = AutoModelForCausalLM.from_pretrained(source_model, config=config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(source_model / name, folder / name)
    saved = json.loads((folder / "config.json").read_text())
    saved["rope_theta"] = json.loads((source_model / "config.json").read_text())["rope_theta"]  # vLLM reads this key
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    return folder


@pytest.fixture(scope="session")
def quantized() -> Path:
    """SmolLM2 quantized by `aaac-quantize SmolLM2 OUT --group-size 64` (default calibration: 128 windows of
    512 BBC tokens), made by `make` before the tests (as `make demo` shows it) and shared by every test."""
    assert (QUANTIZED / "config.json").is_file(), f"{QUANTIZED} is missing: run `make test`, which prepares it"
    return QUANTIZED


def random_layer(
    parts: list[int], in_features: int, group_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A merged layer in the checkpoint layout whose parts have their own random codebooks.

    Returns (qweight, scales, codebooks [parts, 2, 16], dense fp32 weight [N, K] from the reference
    dequantizer). Both codebooks are in use, and a few scales are -0.0 (a zero group that selects C1).
    """
    from aaac_kernels.format.layout import encode_scales, pack_indices
    from aaac_kernels.format.reference import dequantize

    g = torch.Generator().manual_seed(seed)
    n, groups = sum(parts), in_features // group_size
    qweight = pack_indices(torch.randint(0, 16, (n, in_features), generator=g))
    magnitude = torch.rand(n, groups, generator=g)
    scales = encode_scales(magnitude, torch.rand(n, groups, generator=g) < 0.5).t().contiguous()
    scales.view(torch.int16)[0, :4] = -32768
    codebooks = torch.randn(len(parts), 2, 16, generator=g).half()
    bounds = [0, *torch.tensor(parts).cumsum(0).tolist()]
    dense = torch.cat(
        [
            dequantize(qweight[:, a:b], scales[:, a:b], codebooks[i], group_size)
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
        ]
    )
    return qweight, scales, codebooks, dense


def tiny_llama(folder: Path, hidden: int = 64, layers: int = 2, poison: str | None = None) -> Path:
    """A small random Llama with SmolLM2's tokenizer, for cases the real model cannot show."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if poison:
        with torch.no_grad():
            model.get_parameter(poison)[0, 0] = float("nan")
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(MODEL / name, folder / name)
    return folder


def tiny_moe(folder: Path, model_type: str, hidden: int = 128, experts: int = 4, layers: int = 2) -> Path:
    """A small random mixture-of-experts model (``mixtral``, ``olmoe``, ``qwen2_moe`` with its shared expert,
    or ``qwen3_moe``: 2 of ``experts`` per token) with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    shared = dict(
        vocab_size=49152,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        num_experts_per_tok=2,
    )
    if model_type == "mixtral":
        config = MixtralConfig(**shared, intermediate_size=hidden, num_local_experts=experts)
    elif model_type == "olmoe":
        config = OlmoeConfig(**shared, intermediate_size=hidden, num_experts=experts)
    elif model_type == "qwen2_moe":
        config = Qwen2MoeConfig(
            **shared,
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden,
            shared_expert_intermediate_size=2 * hidden,
            num_experts=experts,
        )
    else:
        config = Qwen3MoeConfig(
            **shared, intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_experts=experts, head_dim=32
        )
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(MODEL / name, folder / name)
    return folder


# vLLM's CPU build reserves this many GiB of RAM for the KV cache per engine; the default fraction of
# RAM fails at start-up on the 2-core test machines.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Lets tests ask an engine's workers which AAAC kernels they run (LLM.apply_model with a function).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@contextmanager
def vllm_engine(model: Path, **kwargs):
    """A vLLM engine on ``model`` (``aaac`` method unless told), shut down (worker processes included) on exit.

    An engine on one rank runs in this process (vLLM's engine core and its one worker, as
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor run them): it starts in seconds, where
    three processes importing vLLM take about 40 s on the 2-core machines. With several ranks the engine core
    still runs here, and each rank in a worker process of its own as vLLM runs them; the server
    (test_serve.py) keeps the process boundaries of ``vllm serve``. Two engines in this process at once would
    share vLLM's process-wide parallel groups: no test holds two.
    """
    import vllm.envs
    from vllm import LLM

    options = {"quantization": "aaac", "enforce_eager": True, **kwargs}
    in_process = options.get("tensor_parallel_size", 1) == options.get("pipeline_parallel_size", 1) == 1
    if in_process:
        options["distributed_executor_backend"] = "uni"
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(model=str(model), seed=0, max_model_len=1024, **options)
    finally:
        if saved is None:
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
        # An engine core in this process freezes the environment variables vLLM reads and the objects the
        # garbage collector tracks, for serving speed; the tests after it set their own and free theirs.
        vllm.envs.disable_envs_cache()
        gc.unfreeze()
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="session")
def tiny_quantize_run(tmp_path_factory, small_calib) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A small random Llama quantized at group size 32 by the aaac-quantize command: (source, checkpoint,
    the command's output)."""
    root = tmp_path_factory.mktemp("tiny")
    source = tiny_llama(root / "tiny", hidden=128, layers=2)
    out = root / "tiny-aaac-g32"
    options = ["--group-size", 32, "--calib", small_calib, "--nsamples", 8, "--seqlen", 128]
    return source, out, run_cli("aaac-quantize", source, out, *options)


@pytest.fixture(scope="session")
def tiny_quantized(tiny_quantize_run) -> Path:
    return tiny_quantize_run[1]


SERVER_START_TIMEOUT = 900  # torch.compile of the whole model takes minutes on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(quantized, tmp_path_factory):
    """The session's one ``aaac-serve`` of the AAAC SmolLM2 (default compiled mode, bf16) on a free loopback
    port: (url, process, log file), once it answers /health; killed at the end if still running."""
    import requests

    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = _free_port()
    command = [BIN / "aaac-serve", quantized, "--quantization", "aaac", "--host", "127.0.0.1", "--port", port]
    command += ["--max-model-len", 1024, "--served-model-name", "smollm2-aaac"]
    with open(log, "w") as out:
        process = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    try:
        while True:
            assert process.poll() is None, f"aaac-serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"aaac-serve not up after {SERVER_START_TIMEOUT} s"
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        yield url, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

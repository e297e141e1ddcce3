"""The Triton kernels against the reference dequantizer.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET) in fp16
and fp32: the interpreter's bf16 is wrong (``tl.dot`` returns garbage, ENVIRONMENT.md, and its fp32 to
bf16 conversion truncates instead of rounding). With a GPU the same tests run compiled, bf16 included.
"""

import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import aaac_kernels.linear  # noqa: F401  registers torch.ops.aaac.linear (the CUDA-graph test calls it)
from aaac_kernels import triton_gemm
from aaac_kernels.format.serving import cuda_layout

from .conftest import ROOT, random_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
PARTS = [64, 32, 40]  # a merged QKV-like layer, N = 136: no tile size divides it
K, GROUP = 512, 64  # 8 groups a row, two per K tile
# (K, group size): a group as wide as the K tile; groups that straddle tiles; K not a multiple of the tile.
SHAPES = [(512, 128), (384, 32), (576, 192)]


@functools.cache
def _layer(k: int = K, group_size: int = GROUP) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The ``prepare`` layout on DEVICE and the reference dense weight (fp32, CPU)."""
    qweight, scales, codebooks, dense = random_layer(PARTS, k, group_size)
    layout = cuda_layout(qweight.to(DEVICE), scales.to(DEVICE), codebooks.to(DEVICE))
    return layout, dense


def _check(got: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``got`` equals x @ Wᵀ (+ bias), W rounded to x.dtype as the kernels do, up to fp32 summation order
    and one rounding of the output to x.dtype."""
    assert got.dtype == x.dtype and got.device.type == DEVICE
    want = F.linear(x.cpu().double(), dense.to(x.dtype).double(), None if bias is None else bias.cpu().double())
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[x.dtype]
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=1e-3)


def test_layer_exercises_both_codebooks_and_negative_zero():
    qweight, scales, codebooks, _ = random_layer(PARTS, K, GROUP)
    bits = scales.view(torch.int16)
    assert 0.3 < (bits < 0).float().mean() < 0.7
    assert (bits == -32768).any()
    assert not torch.equal(codebooks[0], codebooks[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,group_size", SHAPES)
def test_dequantize_kernel_is_exact(k, group_size, dtype):
    layout, dense = _layer(k, group_size)
    assert torch.equal(triton_gemm.dequantize(*layout, PARTS, dtype).cpu(), dense.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
def test_fused_kernel_matches_reference(m, dtype):
    layout, dense = _layer()
    x = torch.randn(m, K, device=DEVICE).to(dtype)
    _check(triton_gemm.gemm(x, *layout, PARTS), x, dense)


@pytest.mark.parametrize("config", [config for _, config in triton_gemm.CONFIGS], ids=["small", "medium", "large"])
@pytest.mark.parametrize("k,group_size", SHAPES)
def test_every_stored_config(config, k, group_size):
    layout, dense = _layer(k, group_size)
    x = torch.randn(70, k, device=DEVICE).half()
    _check(triton_gemm.gemm(x, *layout, PARTS, config), x, dense)


@pytest.mark.parametrize("split_k", [1, 3, 5])
def test_split_k_with_uneven_tiles(split_k):
    # 576 / 128 gives 5 K tiles (the last one half full); 3 splits get 2, 2 and 1 of them.
    layout, dense = _layer(576, 64)
    config = triton_gemm.TileConfig(
        block_m=16, block_n=32, block_k=128, split_k=split_k, group_m=1, num_warps=4, num_stages=2
    )
    x = torch.randn(5, 576, device=DEVICE).half()
    _check(triton_gemm.gemm(x, *layout, PARTS, config), x, dense)


def test_parts_read_their_own_codebooks():
    qweight, scales, codebooks, _ = random_layer(PARTS, K, GROUP)
    x = torch.randn(4, K, device=DEVICE).half()
    layouts = [cuda_layout(qweight.to(DEVICE), scales.to(DEVICE), c.to(DEVICE)) for c in (codebooks, codebooks.flip(0))]
    first, swapped = (triton_gemm.gemm(x, *layout, PARTS) for layout in layouts)
    q, k, v = torch.tensor(PARTS).cumsum(0).tolist()
    # Swapping the q and v pairs changes q's and v's columns and leaves k's alone.
    assert torch.equal(first[:, q:k], swapped[:, q:k])
    assert not torch.allclose(first[:, :q], swapped[:, :q]) and not torch.allclose(first[:, k:], swapped[:, k:])


@pytest.mark.parametrize("tokens", [6, 2 * triton_gemm.DEQUANT_MATMUL_MIN_M], ids=["fused", "dequantize-matmul"])
def test_linear_entry_point_both_paths(tokens):
    # The CUDA implementation of aaac::linear: leading batch dims, a bias, and each path by M.
    layout, dense = _layer()
    x = torch.randn(2, tokens // 2, K, device=DEVICE).half()
    bias = torch.randn(sum(PARTS), device=DEVICE).half()
    got = triton_gemm.linear(x, *layout, PARTS, bias)
    assert got.shape == (2, tokens // 2, sum(PARTS))
    _check(got.reshape(tokens, -1), x.reshape(tokens, K), dense, bias.float())


def test_empty_batch():
    layout, _ = _layer()
    assert triton_gemm.gemm(torch.empty(0, K, device=DEVICE).half(), *layout, PARTS).shape == (0, sum(PARTS))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_op_under_torch_compile_and_cuda_graphs():
    layout, dense = _layer()
    x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(
        lambda t: torch.ops.aaac.linear(t, *layout, PARTS, None), fullgraph=True, mode="reduce-overhead"
    )
    for _ in range(3):  # warm-up, record, replay
        got = compiled(x)
    _check(got, x, dense)
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        static_out = torch.ops.aaac.linear(static_x, *layout, PARTS, None)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    _check(static_out, static_x, dense)


def test_kernels_compile_for_ampere_and_hopper():
    # The interpreter does not check what the compiler does (layouts, dtypes, register allocation):
    # every stored configuration is compiled to a cubin for sm_80 and sm_90 by Triton's own ptxas.
    result = subprocess.run(
        [sys.executable, ROOT / "benchmarks" / "kernel_resources.py", "--arch", "80", "90"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 80 ") or line.startswith("| 90 ")]
    assert len(rows) == 2 * (len(triton_gemm.CONFIGS) * 2 * 2 + 2)

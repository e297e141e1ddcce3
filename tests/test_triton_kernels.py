"""The Triton kernels against the reference dequantizer.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET) in fp16
and fp32: the interpreter's bf16 is wrong (``tl.dot`` returns garbage, ENVIRONMENT.md, and its fp32 to
bf16 conversion truncates instead of rounding). With a GPU the same tests run compiled, bf16 included.
"""

import functools
import itertools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import aaac_kernels.linear  # noqa: F401  registers torch.ops.aaac.linear (the CUDA-graph test calls it)
import aaac_kernels.routed_experts  # noqa: F401  registers torch.ops.aaac.routed_experts
from aaac_kernels import triton_experts, triton_gemm
from aaac_kernels.format.serving import cuda_layout

from .conftest import ROOT, random_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
PARTS = [64, 32, 40]  # a merged QKV-like layer, N = 136: no tile size divides it
K, GROUP = 512, 64  # 8 groups a row, two per K tile
# (K, group size): a group as wide as the K tile; groups that straddle tiles; K not a multiple of the tile.
SHAPES = [(512, 128), (384, 32), (576, 192)]
# The GEMV's main loop on sm_90 (benchmarks/kernel_resources.py): warp instructions per weight at M = 1,
# by group size (groups of 64 halve the K step, and the per-step work is spread over fewer weights).
GEMV_INSTRUCTIONS_PER_WEIGHT = {128: 0.175, 64: 0.23}


@functools.cache
def _layer(k: int = K, group_size: int = GROUP) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The ``prepare`` layout on DEVICE and the reference dense weight (fp32, CPU)."""
    qweight, scales, codebooks, dense = random_layer(PARTS, k, group_size)
    layout = cuda_layout(qweight.to(DEVICE), scales.to(DEVICE), codebooks.to(DEVICE))
    return layout, dense


def _check(
    got: torch.Tensor,
    x: torch.Tensor,
    dense: torch.Tensor,
    bias: torch.Tensor | None = None,
    rounded: bool = True,
    atol: float = 1e-3,
) -> None:
    """``got`` equals x @ Wᵀ (+ bias) up to fp32 summation order and one rounding of the output to x.dtype,
    with W the reference weight rounded to x.dtype (``rounded``: the GEMM and the dequantizer) or exact in
    fp32 (the GEMV, which scales each word's sum of products instead of each weight)."""
    assert got.dtype == x.dtype and got.device.type == DEVICE
    weight = dense.to(x.dtype).double() if rounded else dense.double()
    want = F.linear(x.cpu().double(), weight, None if bias is None else bias.cpu().double())
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[x.dtype]
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=atol)


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
@pytest.mark.parametrize("m", range(1, triton_gemm.GEMV_MAX_M + 1))
def test_gemv_matches_reference(m, dtype):
    layout, dense = _layer()
    x = torch.randn(m, K, device=DEVICE).to(dtype)
    _check(triton_gemm.gemv(x, *layout, PARTS), x, dense, rounded=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 16, 33, 128])
def test_gemm_matches_reference(m, dtype):
    layout, dense = _layer()
    x = torch.randn(m, K, device=DEVICE).to(dtype)
    _check(triton_gemm.gemm(x, *layout, PARTS), x, dense)


@pytest.mark.parametrize("config", [config for _, config in triton_gemm.GEMV_CONFIGS], ids=["m1-2", "m3-4"])
@pytest.mark.parametrize("k,group_size", SHAPES)
def test_every_stored_gemv_config(config, k, group_size):
    # Groups narrower than the K step (32, 192) cut the step to the layout's block.
    layout, dense = _layer(k, group_size)
    x = torch.randn(3, k, device=DEVICE).half()
    _check(triton_gemm.gemv(x, *layout, PARTS, config), x, dense, rounded=False)


@pytest.mark.parametrize("config", [config for _, config in triton_gemm.GEMM_CONFIGS], ids=["small", "medium"])
@pytest.mark.parametrize("k,group_size", SHAPES)
def test_every_stored_gemm_config(config, k, group_size):
    layout, dense = _layer(k, group_size)
    x = torch.randn(70, k, device=DEVICE).half()
    _check(triton_gemm.gemm(x, *layout, PARTS, config), x, dense)


@pytest.mark.parametrize("split_k", [1, 3, 5])
def test_split_k_with_uneven_steps(split_k):
    # 576 / 128 gives 5 K steps (the last one half full); 3 splits get 2, 2 and 1 of them, 5 one each.
    # The last program of each column block to finish adds the partials up, in the kernel.
    layout, dense = _layer(576, 64)
    x = torch.randn(5, 576, device=DEVICE).half()
    config = triton_gemm.TileConfig(
        block_m=16, block_n=32, block_k=128, split_k=split_k, group_m=1, num_warps=4, num_stages=2
    )
    _check(triton_gemm.gemm(x, *layout, PARTS, config), x, dense)
    _check(triton_gemm.gemv(x[:4], *layout, PARTS, config), x[:4], dense, rounded=False)


def test_split_without_steps_adds_nothing():
    # 4 K steps in 3 splits of 2: the third split has no step and must leave the sum alone.
    layout, dense = _layer(512, 128)
    x = torch.randn(2, 512, device=DEVICE).half()
    config = triton_gemm.pick_gemv_config(2)._replace(block_k=128, split_k=3)
    _check(triton_gemm.gemv(x, *layout, PARTS, config), x, dense, rounded=False)


@pytest.mark.parametrize("kernel", [triton_gemm.gemv, triton_gemm.gemm])
def test_parts_read_their_own_codebooks(kernel):
    qweight, scales, codebooks, _ = random_layer(PARTS, K, GROUP)
    x = torch.randn(4, K, device=DEVICE).half()
    layouts = [cuda_layout(qweight.to(DEVICE), scales.to(DEVICE), c.to(DEVICE)) for c in (codebooks, codebooks.flip(0))]
    first, swapped = (kernel(x, *layout, PARTS) for layout in layouts)
    q, k, v = torch.tensor(PARTS).cumsum(0).tolist()
    # Swapping the q and v pairs changes q's and v's columns and leaves k's alone.
    assert torch.equal(first[:, q:k], swapped[:, q:k])
    assert not torch.allclose(first[:, :q], swapped[:, :q]) and not torch.allclose(first[:, k:], swapped[:, k:])


@pytest.mark.skipif(DEVICE != "cuda", reason="the shuffle lookup runs on a GPU only")
@pytest.mark.parametrize("kernel", ["gemv", "gemm", "dequantize"])
def test_shuffle_lookup_with_parts_on_tile_boundaries(kernel):
    # Parts that start on multiples of every BLOCK_N take the shuffle lookup (PARTS above take loads
    # in the GEMM); both must give the reference.
    parts = [128, 64, 64]
    qweight, scales, codebooks, dense = random_layer(parts, K, GROUP)
    layout = cuda_layout(qweight.cuda(), scales.cuda(), codebooks.cuda())
    assert triton_gemm._layer_args(*layout[:2], parts, 64)[2]["LOOKUP"] == "shfl"
    x = torch.randn(3, K, device=DEVICE, dtype=torch.bfloat16)
    if kernel == "gemv":
        _check(triton_gemm.gemv(x, *layout, parts), x, dense, rounded=False)
    elif kernel == "gemm":
        _check(triton_gemm.gemm(x, *layout, parts), x, dense)
    else:
        assert torch.equal(triton_gemm.dequantize(*layout, parts, torch.bfloat16).cpu(), dense.bfloat16())


def test_dequantize_rows_into_a_buffer():
    layout, dense = _layer()
    buffer = torch.empty(64, K, device=DEVICE, dtype=torch.float16)
    got = triton_gemm.dequantize(*layout, PARTS, torch.float16, range(40, 100), buffer)
    assert got.data_ptr() == buffer.data_ptr() and got.shape == (60, K)
    assert torch.equal(got.cpu(), dense[40:100].half())


@pytest.mark.parametrize("tokens", [2, 6, 2 * triton_gemm.DEQUANT_MATMUL_MIN_M], ids=["gemv", "gemm", "slabs"])
def test_linear_entry_point_every_path(tokens, monkeypatch):
    # The CUDA implementation of aaac::linear: leading batch dims, a bias, and each path by M; slabs of
    # 32 rows (a tenth of the layer) make the large-M path run several, the last one short.
    monkeypatch.setattr(triton_gemm, "DEQUANT_SLAB_BYTES", 32 * K * 2)
    layout, dense = _layer()
    x = torch.randn(2, tokens // 2, K, device=DEVICE).half()
    bias = torch.randn(sum(PARTS), device=DEVICE).half()
    got = triton_gemm.linear(x, *layout, PARTS, bias)
    assert got.shape == (2, tokens // 2, sum(PARTS))
    # cuBLAS may sum fp16 products in fp16 (torch's allow_fp16_reduced_precision_reduction): a looser atol.
    atol = 3e-3 if tokens >= triton_gemm.DEQUANT_MATMUL_MIN_M else 1e-3
    _check(got.reshape(tokens, -1), x.reshape(tokens, K), dense, bias.float(), tokens > triton_gemm.GEMV_MAX_M, atol)


def test_empty_batch():
    layout, _ = _layer()
    assert triton_gemm.linear(torch.empty(0, K, device=DEVICE).half(), *layout, PARTS, None).shape == (0, sum(PARTS))


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


# Mixture-of-experts layers: global experts 0..4, of which this rank holds 3, 0 and 4 (expert parallel).
# Hidden 256 (two K steps of 128), intermediate 192 (a step and a half), groups of 64: gate and up meet
# inside a column block, and the down projection's K is not a multiple of the step.
HIDDEN, INTERMEDIATE, EXPERT_GROUP, TOP_K = 256, 192, 64, 2
EXPERT_MAP = torch.tensor([1, -1, -1, 0, 2], dtype=torch.int32)
LOCAL_EXPERTS = (3, 0, 4)


@functools.cache
def _experts() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], dict[int, tuple[torch.Tensor, ...]]]:
    """The local experts' stacked layouts on DEVICE (w13, w2) and each global expert's dense weights."""
    dense, w13, w2 = {}, [], []
    for e in LOCAL_EXPERTS:
        gate_up = random_layer([INTERMEDIATE] * 2, HIDDEN, EXPERT_GROUP, seed=e)
        down = random_layer([HIDDEN], INTERMEDIATE, EXPERT_GROUP, seed=10 + e)
        w13.append(cuda_layout(*(t.to(DEVICE) for t in gate_up[:3])))
        w2.append(cuda_layout(*(t.to(DEVICE) for t in down[:3])))
        dense[e] = gate_up[3], down[3]
    stack = lambda layouts: tuple(torch.stack(t) for t in zip(*layouts))  # noqa: E731
    return stack(w13), stack(w2), dense


def _routed_reference(x, weights, ids, dense, weights_on_input: bool) -> torch.Tensor:
    """The layer in fp64 from the dense weights rounded to x.dtype, with the gate_up output rounded to it
    as the kernels round it; pairs routed to experts that are not in ``dense`` add nothing."""
    want = torch.zeros(x.shape, dtype=torch.float64)
    for t, k in itertools.product(range(x.shape[0]), range(TOP_K)):
        e = int(ids[t, k])
        if e in dense:
            gate_up, down = (w.to(x.dtype).double() for w in dense[e])
            w = weights[t, k].to(x.dtype).double()
            inputs = x[t].cpu().double() * (w if weights_on_input else 1)
            g, u = (gate_up @ inputs).to(x.dtype).double().split(INTERMEDIATE)
            h = (F.silu(g) * u).to(x.dtype).double()
            want[t] += (down @ h) * (1 if weights_on_input else w)
    return want


def test_sort_pairs_gives_each_expert_whole_blocks():
    experts, block_m = 5, 4
    local = torch.randint(-1, experts, (37,), generator=torch.Generator().manual_seed(0))
    local[local == 3] = 1  # an expert without pairs takes no block
    slot_pairs, block_experts = (t.cpu().long() for t in triton_experts.sort_pairs(local.to(DEVICE), experts, block_m))
    pairs, counts = local.numel(), torch.bincount(local[local >= 0], minlength=experts)
    assert slot_pairs.numel() == block_experts.numel() * block_m
    assert slot_pairs.numel() <= pairs + experts * (block_m - 1) + block_m - 1  # sized from shapes alone
    # The blocks in use come first, in expert order, each expert's in as few blocks as hold its pairs.
    used = int((block_experts < experts).sum())
    assert (block_experts[used:] == experts).all()
    assert block_experts[:used].tolist() == [e for e in range(experts) for _ in range(-(-int(counts[e]) // block_m))]
    # Every local pair once, in a block of its expert and in pair order there; padding holds `pairs`.
    blocks = slot_pairs.view(-1, block_m)[:used]
    real = blocks < pairs
    assert sorted(blocks[real].tolist()) == (local >= 0).nonzero().flatten().tolist()
    assert torch.equal(local[blocks[real]], block_experts[:used, None].expand_as(blocks)[real])
    for e in range(experts):
        mine = blocks[block_experts[:used] == e]
        assert mine[mine < pairs].tolist() == (local == e).nonzero().flatten().tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights_on_input", [False, True], ids=["weights-on-output", "weights-on-input"])
@pytest.mark.parametrize("tokens,block_m", [(1, 16), (9, 16), (40, 16), (40, 64)])
def test_grouped_experts_match_reference(tokens, block_m, weights_on_input, dtype):
    # 40 tokens in blocks of 16: experts with runs of several blocks, the last one part padding.
    w13, w2, dense = _experts()
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, HIDDEN, generator=generator).to(dtype)
    ids = torch.randint(0, len(EXPERT_MAP), (tokens, TOP_K), generator=generator, dtype=torch.int32)
    ids[0] = torch.tensor([1, 2])  # token 0 goes to other ranks' experts only
    weights = torch.rand(tokens, TOP_K, generator=generator)
    config = next(c for _, c in triton_gemm.GEMM_CONFIGS if c.block_m == block_m)
    arguments = (x, weights, ids, *w13, *w2, INTERMEDIATE, EXPERT_MAP, weights_on_input)
    got = triton_experts.routed_experts(*(a.to(DEVICE) if torch.is_tensor(a) else a for a in arguments), config)
    assert got.dtype == dtype and got.shape == x.shape and got.device.type == DEVICE
    want = _routed_reference(x, weights, ids, dense, weights_on_input)
    rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))
    assert got[0].abs().max() == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_routed_experts_op_under_cuda_graphs():
    # On CUDA the op is the grouped kernels, which read nothing back to the host: a graph captured with
    # one routing replays another.
    w13, w2, dense = _experts()
    x = torch.randn(6, HIDDEN, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, len(EXPERT_MAP), (6, TOP_K), device="cuda", dtype=torch.int32)
    weights = torch.rand(6, TOP_K, device="cuda")
    expert_map = EXPERT_MAP.cuda()
    run = lambda: torch.ops.aaac.routed_experts(x, weights, ids, *w13, *w2, INTERMEDIATE, expert_map, False)  # noqa: E731
    run()  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.randint_like(ids, len(EXPERT_MAP)))
    weights.copy_(torch.rand_like(weights))
    graph.replay()
    want = _routed_reference(x.cpu(), weights.cpu(), ids.cpu(), dense, False)
    torch.testing.assert_close(static_out.cpu().double(), want, rtol=1.6e-2, atol=1.6e-2 * float(want.abs().max()))


def test_kernels_compile_for_ampere_and_hopper():
    # The interpreter does not check what the compiler does (layouts, dtypes, register allocation):
    # every kernel the op launches is compiled to a cubin by Triton's own ptxas, with the attributes of
    # real calls, for sm_90 at both group sizes and for sm_80 at 128 (bf16: fp16 differs only in the
    # conversions of x), and the decode kernel's main loop is read from its SASS.
    found = []
    for arch, group_sizes in ((90, ["128", "64"]), (80, ["128"])):
        command = [sys.executable, ROOT / "benchmarks" / "kernel_resources.py", "--arch", str(arch), "--json"]
        result = subprocess.run(
            [*command, "--dtypes", "bf16", "--group-sizes", *group_sizes], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        found += [json.loads(line) for line in result.stdout.splitlines()]
    # Per arch and group size: the GEMV for each M, every GEMM configuration, and the experts kernel (gate_up
    # and down) with each; per arch: the dequantizer.
    assert len(found) == 3 * (triton_gemm.GEMV_MAX_M + 3 * len(triton_gemm.GEMM_CONFIGS)) + 2
    assert all(k["spill_bytes"] == 0 for k in found), [k for k in found if k["spill_bytes"]]
    # Decoding (M = 1) on Hopper: what docs/kernels.md's roofline assumes of the GEMV's main loop.
    decode = [k for k in found if k["arch"] == 90 and k["kernel"] == "gemv, M = 1"]
    assert {k["group_size"] for k in decode} == {128, 64}
    for kernel in decode:
        assert kernel["instructions_per_weight"] <= GEMV_INSTRUCTIONS_PER_WEIGHT[kernel["group_size"]], kernel
        assert kernel["shuffles_per_weight"] <= 1 / 32, kernel  # one lane-shuffle per weight: the lookup
        assert kernel["barriers"] == kernel["shared_stores"] == 0, kernel
        assert kernel["widest_global_load_bits"] == 128, kernel

"""torch.ops.aaac.linear on CPU: the C++ kernels of every instruction-set path this CPU runs, the
load-time layout, the plain-torch fallback, and the op under torch.compile.

What is exact and what is not: the decode kernels (M <= 4; on the avx2 path M <= 16 and for bf16
M <= 24; for bf16 on the avx512 path M <= 16, on avx512_bf16 M <= 4; on AMX only M = 1, as bf16 batches
from 2 rows run on the tiles; decode_rows below) compute with the exact weight, entry x |scale| in fp32,
except the int16 kernels for bf16 activations (on the avx2 and avx512 paths: multiplies_in_int16),
which multiply in int16 (below); the other kernels with the reference
dequantizer's weight, bit for bit (checked directly on the dequantizers), in bf16 for bf16 activations
on the paths that multiply bf16 natively (avx512_bf16, amx_bf16) and in fp32 otherwise. All accumulate
in fp32 in their own order. So against a float64 product with the weight the kernel takes, an output
may differ by (a) the fp32 summation, at most K * 2^-24 times the sum of |w x| (the classic bound for
recursive summation, which covers any order and the products themselves), and (b) one rounding to the
output dtype, at most one unit in its last place relative to the result (2^-8 for bf16, 2^-11 for fp16,
2^-24 for fp32). The int16 kernels round x to int16 per chunk of 64 k and each codebook's entries to
int16, each rounding at most 2^-14 of the chunk's largest |x| or of the codebook's largest |entry|
(kernel_avx2.cpp, avx512_int16.h), so they may also be off by (c) 2^-14 (sum_k max_chunk|x| |w_k| +
sum_k |x_k| |scale| max|entry|), the sums in int32 being exact. A wrong index, scale, codebook or part
is off by the size of a weight and fails by orders of magnitude.
"""

import importlib
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F

from aaac_kernels import cpu
from aaac_kernels import linear as aaac_linear
from aaac_kernels.format.layout import unpack_indices
from aaac_kernels.format.serving import cpu_layout, cpu_nibble_order

from .conftest import ROOT, random_layer

NATIVE = aaac_linear.native
ISAS = ["scalar", "avx2", "avx512", "avx512_bf16", "amx_bf16"]
SUPPORTED = NATIVE.supported_isas() if NATIVE else []
# A merged QKV-like layer; N = 139 is a multiple of no column block (4, 8, 16, 128), and its last AMX
# panel holds one column tile (padded to the pair the panel blocks multiply).
PARTS = [64, 32, 43]
# Decode rows (1-5, 8, 12; the last of the avx2 path: 16 and, for bf16, 24; for bf16 of the avx512 path: 16,
# of avx512_bf16: 4), one AMX sweep or AVX512-BF16 GEMM (its row blocks of 8 at 5 and 8, of 16 from 9 to
# 64), AMX panels with an even (128) and an odd (80 = 5 x 16, padded) number of row blocks.
M_VALUES = [1, 2, 3, 4, 5, 8, 9, 12, 16, 24, 33, 64, 80, 128]
# (K, group size): blocks of 128 and a rest of 64 (SmolLM2's K = 576 is 4 x 128 + 64); groups of 32 with a
# rest of 96 (64 + 32); groups of 96 (3 planes of 32: blocks straddle groups; the AVX512-BF16 GEMM's
# segments of K are 1920 k then); a group size that is not a multiple of 32 (the scalar kernel serves it
# on every path) with a rest of 32 + 8; K past the AMX panel depth and the GEMM's segment (2048).
SHAPES = [(320, 64), (224, 32), (2304, 96), (168, 24), (4224, 128)]
OUTPUT_UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def tile_weight(dense: torch.Tensor, dtype: torch.dtype, isa: str, group_size: int) -> torch.Tensor:
    """The weight the tiled path (M past the decode kernel's, off the AMX tiles) multiplies: the
    reference's in bf16 for bf16 activations where the path multiplies bf16 natively, else the exact fp32
    one. Group sizes that are not a multiple of 32 run the scalar kernels on every path."""
    native_bf16 = isa in ("avx512_bf16", "amx_bf16") and group_size % 32 == 0
    return dense.to(dtype) if dtype == torch.bfloat16 and native_bf16 else dense


def decode_rows(isa: str, group_size: int, dtype: torch.dtype) -> int:
    """The largest batch the path's decode kernels serve (ops.cpp's kIsas; group sizes that are not a
    multiple of 32 run the scalar kernels)."""
    bf16 = dtype == torch.bfloat16
    if group_size % 32:
        return 4
    if isa == "avx2":
        return 24 if bf16 else 16
    return {"avx512": 16}.get(isa, 4) if bf16 else 4


def multiplies_in_int16(isa: str, group_size: int, dtype: torch.dtype) -> bool:
    """Whether a decoded batch runs an int16 kernel: bf16 activations on the avx2 and avx512 paths (with AMX
    the one row it decodes keeps the exact fp32 kernel)."""
    return group_size % 32 == 0 and dtype == torch.bfloat16 and isa in ("avx2", "avx512", "avx512_bf16")


@pytest.fixture
def isa(request):
    """Run the test on one kernel path, then restore the automatic choice."""
    name = request.param
    if name not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {name} path (it runs: {', '.join(SUPPORTED)})")
    chosen = NATIVE.isa()
    NATIVE.set_isa(name)
    yield name
    NATIVE.set_isa(chosen)


def _layer(k: int, group_size: int, seed: int = 0):
    qweight, scales, codebooks, dense = random_layer(PARTS, k, group_size, seed=seed)
    return cpu_layout(qweight, scales, codebooks), dense


def entry_bounds(layout, parts: list[int]) -> torch.Tensor:
    """|scale| x the largest |entry| of the group's codebook, per weight [N, K]: the int16 entries' scale."""
    _, scales, codebooks = layout  # scales [N, K / G] signed fp16, codebooks [parts, 2, 16]
    k = layout[0].shape[1] * 2
    part = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(parts))
    choice = (scales.view(torch.int16) < 0).long()
    largest = codebooks.double().abs().amax(-1)[part.unsqueeze(1), choice]
    return (scales.double().abs() * largest).repeat_interleave(k // scales.shape[1], dim=1)


def _check(
    got: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    entries: torch.Tensor | None = None,
) -> None:
    """``got`` is x @ weightᵀ + bias up to fp32 summation and one rounding (module docstring), and the
    int16 roundings given ``entries`` (``entry_bounds``)."""
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], weight.shape[0])
    x64, w64 = x.double().reshape(-1, x.shape[-1]), weight.double()
    want = x64 @ w64.t() + (0 if bias is None else bias.double())
    magnitude = x64.abs() @ w64.abs().t() + (0 if bias is None else bias.double().abs())
    bound = OUTPUT_UNIT[x.dtype] * want.abs() + x.shape[-1] * 2.0**-24 * magnitude
    if entries is not None:
        k = x64.shape[1]
        padded = F.pad(x64.abs(), (0, -k % 64)).reshape(x64.shape[0], -1, 64).amax(-1)
        chunk_largest = padded.repeat_interleave(64, dim=1)[:, :k]
        bound = bound + 2.0**-14 * (1 + 2.0**-13) * (chunk_largest @ w64.abs().t() + x64.abs() @ entries.t())
    error = (got.double().reshape(want.shape) - want).abs()
    assert (error <= bound).all(), f"worst error {(error - bound).max().item():.3g} past the bound"


def test_extension_is_built():
    # The project's install builds it (make test / make demo); a silent fallback would hide a broken build.
    assert NATIVE is not None, "aaac_kernels._C is missing: run `make test` (pip install --no-build-isolation -e .)"
    assert NATIVE.isa() == SUPPORTED[-1], "the automatic choice is the fastest path the CPU supports"


def test_layer_exercises_both_codebooks_and_negative_zero():
    _, scales, codebooks, _ = random_layer(PARTS, 256, 64)
    bits = scales.view(torch.int16)
    assert 0.3 < (bits < 0).float().mean() < 0.7 and (bits == -32768).any()
    assert not torch.equal(codebooks[0], codebooks[1])


@pytest.mark.parametrize("k,group_size", SHAPES)
def test_layout_and_torch_path_are_exact(k, group_size):
    qweight, scales, codebooks, dense = random_layer(PARTS, k, group_size)
    layout = cpu_layout(qweight, scales, codebooks)
    qbytes = layout[0]
    assert qbytes.shape == (sum(PARTS), k // 2) and qbytes.dtype == torch.uint8
    # A block of 128: word w (bytes 2w, 2w + 1) holds k = w, 32 + w, 64 + w, 96 + w in nibbles 0..3.
    indices = unpack_indices(qweight).t()
    word = qbytes[:, 2:4].long()
    word = word[:, 0] | (word[:, 1] << 8)  # word 1
    for j in range(4):
        assert torch.equal((word >> (4 * j)) & 0xF, indices[:, 1 + 32 * j])
    # The rest of K: a block of B holds k = w and w + B / 2 in byte w.
    full, tail = k // 128 * 128, k % 128
    size = 64 if tail & 64 else 32 if tail & 32 else 16 if tail & 16 else 8
    if tail:
        assert torch.equal(qbytes[:, full // 2] >> 4, indices[:, full + size // 2])
    assert sorted(cpu_nibble_order(k).tolist()) == list(range(k))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(cpu.dequantize_torch(*layout, PARTS, dtype), dense.to(dtype))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("k,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizer_is_exact(isa, k, group_size, dtype):
    layout, dense = _layer(k, group_size)
    assert torch.equal(NATIVE.dequantize(*layout, PARTS, dtype), dense.to(dtype))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("k,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_matches_reference(isa, k, group_size, dtype):
    layout, dense = _layer(k, group_size, seed=k)  # dense: the exact weight, fp32
    for m in M_VALUES:
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(sum(PARTS)).to(dtype) if m % 2 else None
        on_tiles = isa == "amx_bf16" and group_size % 32 == 0 and dtype == torch.bfloat16  # else scalar
        decodes = m == 1 or (m <= decode_rows(isa, group_size, dtype) and not on_tiles)
        weight = dense if decodes else dense.to(dtype) if on_tiles else tile_weight(dense, dtype, isa, group_size)
        entries = entry_bounds(layout, PARTS) if decodes and multiplies_in_int16(isa, group_size, dtype) else None
        _check(torch.ops.aaac.linear(x, *layout, PARTS, bias), x, weight, bias, entries)


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512_bf16"], indirect=True)
@pytest.mark.parametrize("k,group_size", [(320, 64), (224, 32)])
def test_int16_decode_of_outliers_and_non_finite_x(isa, k, group_size):
    """The int16 decode kernels scale each chunk of 64 k of x by a power of two: a 2^12 outlier costs the
    chunk's other values their low bits (bound (c)), and an Inf or NaN makes every output NaN (where the
    exact fp32 weights would give a mix of Inf and NaN). One row (the avx512 paths' one-row kernel) and
    three."""
    layout, dense = _layer(k, group_size)
    for m in (1, 3):
        x = torch.randn(m, k)
        x[:, ::64] *= 4096.0
        x = x.bfloat16()
        _check(torch.ops.aaac.linear(x, *layout, PARTS, None), x, dense, None, entry_bounds(layout, PARTS))
        for row, at in zip(range(m), (70, 200, 130), strict=False):
            x[row, at] = float("inf") if row % 2 == 0 else float("nan")
        assert torch.ops.aaac.linear(x, *layout, PARTS, None).isnan().all()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_fp16_activations_compute_in_fp32(isa):
    layout, dense = _layer(256, 64)
    for m in (1, 7):
        x = torch.randn(m, 256).half()
        _check(torch.ops.aaac.linear(x, *layout, PARTS, None), x, dense, None)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_parts_read_their_own_codebooks(isa):
    qweight, scales, codebooks, _ = random_layer(PARTS, 256, 64)
    x = torch.randn(8, 256).bfloat16()
    first, swapped = (
        torch.ops.aaac.linear(x, *cpu_layout(qweight, scales, c), PARTS, None) for c in (codebooks, codebooks.flip(0))
    )
    q, k, _ = torch.tensor(PARTS).cumsum(0).tolist()
    # Swapping the q and v pairs changes q's and v's columns and leaves k's alone.
    assert torch.equal(first[:, q:k], swapped[:, q:k])
    assert not torch.allclose(first[:, :q], swapped[:, :q]) and not torch.allclose(first[:, k:], swapped[:, k:])


def test_leading_dims_and_empty_batch():
    layout, dense = _layer(256, 64)
    x = torch.randn(2, 3, 256).bfloat16()
    isa = NATIVE.isa()
    if isa != "amx_bf16" and 6 <= decode_rows(isa, 64, x.dtype):
        entries = entry_bounds(layout, PARTS) if multiplies_in_int16(isa, 64, x.dtype) else None
        _check(torch.ops.aaac.linear(x, *layout, PARTS, None), x, dense, None, entries)
    else:
        _check(torch.ops.aaac.linear(x, *layout, PARTS, None), x, tile_weight(dense, x.dtype, isa, 64), None)
    assert torch.ops.aaac.linear(torch.empty(0, 256).bfloat16(), *layout, PARTS, None).shape == (0, sum(PARTS))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_of_a_call_under_inference_mode(isa, dtype):
    """vLLM calls the op under torch.inference_mode with a thread per core: the tiled path (M = 33 is past
    every path's decode kernel; at K = 512 a tile is 512 fp32 columns, so 2048 columns are 4 tiles) writes
    its output on every thread."""
    qweight, scales, codebooks, dense = random_layer([2048], 512, 64)
    layout = cpu_layout(qweight, scales, codebooks)
    x, bias = torch.randn(33, 512).to(dtype), torch.randn(2048).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with torch.inference_mode():
            got = torch.ops.aaac.linear(x, *layout, [2048], bias)
    finally:
        torch.set_num_threads(threads)
    _check(got, x, tile_weight(dense, dtype, isa, 64), bias)


def test_torch_path_matches_native():
    layout, dense = _layer(256, 64)
    x, bias = torch.randn(5, 256).bfloat16(), torch.randn(sum(PARTS)).bfloat16()
    assert torch.equal(cpu.linear_torch(x, *layout, PARTS, bias), F.linear(x, dense.bfloat16(), bias))
    _check(cpu.linear_torch(x, *layout, PARTS, bias), x, dense.bfloat16(), bias)


def test_bad_arguments_are_named():
    layout, _ = _layer(256, 64)
    with pytest.raises(RuntimeError, match="x has 128 features, the layer takes 256"):
        torch.ops.aaac.linear(torch.randn(1, 128), *layout, PARTS, None)
    with pytest.raises(RuntimeError, match="part_sizes sum to 140"):
        torch.ops.aaac.linear(torch.randn(1, 256), *layout, [64, 32, 44], None)
    with pytest.raises(ValueError, match="unknown AAAC CPU kernel path 'sse9'"):
        NATIVE.set_isa("sse9")


def test_isa_variable(monkeypatch):
    monkeypatch.setenv(cpu.ISA_VARIABLE, "torch")
    assert cpu.load_native() is None
    monkeypatch.setenv(cpu.ISA_VARIABLE, "sse9")
    with pytest.raises(ValueError, match="AAAC_CPU_ISA=sse9: unknown AAAC CPU kernel path"):
        cpu.load_native()
    chosen = NATIVE.isa()
    monkeypatch.setenv(cpu.ISA_VARIABLE, SUPPORTED[0])
    try:
        assert cpu.load_native().isa() == SUPPORTED[0]
    finally:
        NATIVE.set_isa(chosen)


def test_missing_extension_warns_and_falls_back(monkeypatch):
    monkeypatch.delenv(cpu.ISA_VARIABLE, raising=False)
    real_import = importlib.import_module

    def without_extension(name, *args):
        if name.endswith("._C"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_extension)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu.load_native() is None
    assert any("C++ CPU kernels are not built" in str(w.message) for w in caught)


def test_build_without_compiler_says_so_and_skips(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("aaac_setup", ROOT / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)
    monkeypatch.setenv("CXX", "no-such-c++")
    assert setup_module._extension() == {}
    assert capsys.readouterr().err.strip() == (
        "aaac-vllm: not building the C++ CPU kernels (no C++ compiler: 'no-such-c++' is not on PATH; install g++ "
        "or set CXX); aaac::linear will use its torch path on CPU"
    )


def test_op_traces_under_torch_compile():
    layout, dense = _layer(256, 64)
    compiled = torch.compile(
        lambda x: torch.ops.aaac.linear(x, *layout, PARTS, None) * 2, fullgraph=True, backend="eager"
    )
    x = torch.randn(5, 256)
    _check(compiled(x) / 2, x, dense, None)
    torch.library.opcheck(torch.ops.aaac.linear.default, (x, *layout, PARTS, None))


def test_nearest_entries_equal_bucketize():
    """The encoder's C++ search gives bucketize's indices exactly: values on the midpoints (a tie goes to
    the lower entry), repeated entries, values beyond both ends, non-contiguous input."""
    from aaac_kernels import encode

    g = torch.Generator().manual_seed(0)
    codebook = torch.sort(torch.randn(16, generator=g)).values
    codebook[7] = codebook[6]  # two equal entries: an empty cell between them
    midpoints = (codebook[1:] + codebook[:-1]) * 0.5
    u = torch.cat([torch.randn(100_003, generator=g) * 2, midpoints, codebook, torch.tensor([-1e30, 1e30])])
    u = torch.stack([u, -u], dim=1).t()[0]  # a strided view
    index, value = encode.nearest(u, codebook)
    assert torch.equal(index, torch.bucketize(u.contiguous(), midpoints)) and torch.equal(value, codebook[index])
    assert index.dtype == torch.int64 and value.dtype == torch.float32
    assert torch.equal(NATIVE.nearest(u, midpoints, codebook)[0], index)  # the extension itself, not a fallback


def test_group_errors_equal_torch(monkeypatch):
    """The encoder's C++ group errors give the torch code's indices exactly and its errors up to the order
    of each group's sum (fp32, 64 terms), on a strided w, zero-scale groups and midpoint ties."""
    from aaac_kernels import encode

    g = torch.Generator().manual_seed(0)
    codebooks = torch.sort(torch.randn(2, 16, generator=g)).values
    w = torch.randn(64, 6, 128, generator=g)[..., ::2]  # [N, groups, G = 64], strided
    w[3, 2] = 0.0
    scale = w.abs().amax(-1, keepdim=True)
    u = torch.where(scale > 0, w / scale.clamp_min(1e-30), torch.zeros_like(w))
    u[5, 1, :15] = (codebooks[0, 1:] + codebooks[0, :-1]) * 0.5
    mean_square = torch.rand(6, 64, generator=g)
    native = encode.group_errors(w, u, mean_square, scale, codebooks)
    monkeypatch.setattr(encode, "_native", lambda: None)
    torch_errors, torch_indices = encode.group_errors(w, u, mean_square, scale, codebooks)
    assert all(torch.equal(a, b) and a.dtype == torch.uint8 for a, b in zip(native[1], torch_indices))
    torch.testing.assert_close(native[0], torch_errors, rtol=64 * 2.0**-24, atol=0.0)


@pytest.mark.parametrize("isa", [name for name in ISAS if name != "scalar"], indirect=True)
@pytest.mark.parametrize("group_size", [64, 24, 20])
def test_group_errors_equal_on_every_path(isa, group_size):
    """The vector paths' group errors (the AVX2 loop where G is a multiple of 8) are the generic loop's bit for
    bit, indices and errors: the quantizer writes the same checkpoint on every machine."""
    g = torch.Generator().manual_seed(1)
    codebooks = torch.sort(torch.randn(2, 16, generator=g)).values
    codebooks[1, 9] = codebooks[1, 8]
    w = torch.randn(37, 5, group_size, generator=g) * 0.02
    w[2, 3] = 0.0
    scale = w.abs().amax(-1, keepdim=True)
    u = torch.where(scale > 0, w / scale.clamp_min(1e-30), torch.zeros_like(w))
    u[4, 0, :15] = (codebooks[1, 1:] + codebooks[1, :-1]) * 0.5  # ties go to the lower entry
    u[6, 1, 0] = float("nan")  # below no midpoint: entry 0 on both
    mean_square = torch.rand(5, group_size, generator=g) ** 4
    errors, indices = NATIVE.group_errors(w, u, mean_square, scale, codebooks)
    NATIVE.set_isa("scalar")
    generic_errors, generic_indices = NATIVE.group_errors(w, u, mean_square, scale, codebooks)
    assert torch.equal(indices, generic_indices) and torch.equal(errors, generic_errors)
    assert indices[:, 6, 1, 0].eq(0).all()

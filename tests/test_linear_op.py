"""torch.ops.aaac.linear (the CPU path) against the reference dequantizer, eager and under torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from aaac_kernels import linear as aaac_linear

from .conftest import random_layer

GROUP = 32
K = 128
PARTS = [64, 32, 40]  # a merged QKV-like layer whose parts have their own codebooks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_is_exact(dtype):
    qweight, scales, codebooks, dense = random_layer(PARTS, K, GROUP)
    layout = aaac_linear.prepare(qweight, scales, codebooks)
    assert torch.equal(aaac_linear.dequantize(*layout, PARTS, dtype), dense.to(dtype))


@pytest.mark.parametrize("m", [1, 3, 33])
def test_op_matches_reference_matmul(m):
    qweight, scales, codebooks, dense = random_layer(PARTS, K, GROUP, seed=m)
    x = torch.randn(m, K, dtype=torch.bfloat16)
    bias = torch.randn(sum(PARTS), dtype=torch.bfloat16)
    got = torch.ops.aaac.linear(x, *aaac_linear.prepare(qweight, scales, codebooks), PARTS, bias)
    assert torch.equal(got, F.linear(x, dense.to(torch.bfloat16), bias))


def test_op_traces_under_torch_compile():
    qweight, scales, codebooks, dense = random_layer(PARTS, K, GROUP)
    layout = aaac_linear.prepare(qweight, scales, codebooks)
    compiled = torch.compile(lambda x: torch.ops.aaac.linear(x, *layout, PARTS, None) * 2, fullgraph=True, backend="eager")
    x = torch.randn(5, K)
    assert torch.equal(compiled(x), 2 * F.linear(x, dense))
    torch.library.opcheck(torch.ops.aaac.linear.default, (x, *layout, PARTS, None))

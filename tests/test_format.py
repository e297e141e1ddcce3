"""The packed layout and the reference dequantizer, on hand-built cases whose answer is known."""

import torch

from aaac_kernels.format.layout import decode_scales, encode_scales, pack_indices, unpack_indices
from aaac_kernels.format.reference import dequantize

CODEBOOKS = torch.tensor(
    [[-8 + i for i in range(16)], [(-8 + i) / 8 for i in range(16)]], dtype=torch.float16
)  # C0: integers -8..7, C1: -1..0.875 in steps of 1/8


def test_pack_unpack_round_trip():
    torch.manual_seed(0)
    indices = torch.randint(0, 16, (24, 128), dtype=torch.uint8)
    packed = pack_indices(indices)
    assert packed.dtype == torch.int32 and packed.shape == (16, 24)
    assert torch.equal(unpack_indices(packed).t(), indices)


def test_packing_puts_index_k_in_nibble_k_mod_8():
    indices = torch.zeros(1, 16, dtype=torch.uint8)
    indices[0, 9] = 0xF  # row 1 of qweight, nibble 1
    indices[0, 7] = 0x8  # row 0, nibble 7: the int32 sign bit
    packed = pack_indices(indices)
    assert packed[1, 0].item() == 0xF0
    assert packed[0, 0].item() == -(2**31)


def test_scale_sign_bit_round_trip_including_negative_zero():
    scales = torch.tensor([0.5, 0.0, 0.0, 2.0], dtype=torch.float16)
    choice = torch.tensor([True, True, False, False])
    encoded = encode_scales(scales, choice)
    assert torch.signbit(encoded).tolist() == [True, True, False, False]
    assert encoded[1].item() == 0.0  # -0.0: `< 0` would miss it
    magnitude, book = decode_scales(encoded)
    assert book.tolist() == [1, 1, 0, 0]
    assert torch.equal(magnitude, scales)


def test_dequantize_hand_built_layer():
    # N = 2 outputs, K = 16 inputs, G = 8: two groups per row.
    indices = torch.arange(16, dtype=torch.uint8).repeat(2, 1)  # [N, K]
    indices[1] = indices[1].flip(0)
    magnitude = torch.tensor([[2.0, 0.5], [0.0, 4.0]], dtype=torch.float16)  # [N, groups]
    choice = torch.tensor([[False, True], [True, False]])
    qweight = pack_indices(indices)
    scales = encode_scales(magnitude, choice).t().contiguous()  # [groups, N]
    w = dequantize(qweight, scales, CODEBOOKS, group_size=8)

    expected = torch.empty(2, 16)
    for n in range(2):
        for k in range(16):
            g = k // 8
            book = int(choice[n, g])
            expected[n, k] = CODEBOOKS[book, int(indices[n, k])].float() * magnitude[n, g].float()
    assert torch.equal(w, expected)
    assert w[0, :8].tolist() == [2.0 * (-8 + i) for i in range(8)]  # group on C0
    assert w[1, :8].abs().sum() == 0  # zero scale on C1 (-0.0) decodes to zeros
    assert w[1, 8:].tolist() == [4.0 * (-8 + i) for i in range(7, -1, -1)]


def test_dequantize_dtype_and_layout():
    indices = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    scales = encode_scales(torch.rand(5, 1, dtype=torch.float16), torch.zeros(5, 1, dtype=torch.bool)).t()
    w = dequantize(pack_indices(indices), scales.contiguous(), CODEBOOKS, 32, dtype=torch.bfloat16)
    assert w.shape == (5, 32) and w.dtype == torch.bfloat16


def test_shard_writer_writes_what_safetensors_writes(tmp_path):
    """Every dtype, from memory and copied by its bytes from another file: the bytes of ``save_file``."""
    from safetensors.torch import save_file

    from aaac_kernels.format.files import ShardWriter, stored_tensors

    torch.manual_seed(0)
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16, torch.uint16]
    dtypes += [torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.float64, torch.int64]
    tensors = {f"t.{i}": torch.randint(0, 2, (3, 5 + i)).to(dtype) for i, dtype in enumerate(reversed(dtypes))}
    tensors |= {"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "expected.safetensors", metadata={"format": "pt"})
    in_file = {name: t for name, t in tensors.items() if name.startswith("t.")}
    save_file(in_file, tmp_path / "source.safetensors")
    stored = stored_tensors(tmp_path / "source.safetensors")
    assert list(stored) == sorted(in_file)

    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", 1 << 30)
    for name, tensor in tensors.items():
        writer.add(name, stored.get(name, tensor))
    assert writer.finish() == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "expected.safetensors").read_bytes()

"""Packing: byte-for-byte equality with compressed-tensors 0.19's pack_to_int32, round trips,
the documented bit positions, and bad inputs."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_slq.quant.packing import (
    PackingError,
    pack_codes,
    pack_zero_points,
    packed_width,
    unpack_codes,
    unpack_zero_points,
)

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
ALL_BITS = list(range(2, 9))


def random_codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (17, 100), (4, 576), (2, 1536), (2, 31)])
def test_codes_match_compressed_tensors_byte_for_byte(bits, shape):
    codes = random_codes(*shape, bits, seed=bits * 1000 + shape[1])
    ours = pack_codes(codes, bits)
    theirs = ct_helpers.pack_to_int32(codes, bits)
    assert ours.dtype == torch.int32 and ours.shape == (shape[0], packed_width(shape[1], bits))
    assert ours.shape == theirs.shape
    assert ours.numpy().tobytes() == theirs.contiguous().numpy().tobytes()
    assert torch.equal(unpack_codes(ours, bits, shape[1]), codes)
    # and we read what compressed-tensors writes, and vice versa
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.Size(shape)), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 5), (100, 17), (576, 3), (1536, 2)])
def test_zero_points_match_compressed_tensors_byte_for_byte(bits, shape):
    zp = random_codes(*shape, bits, seed=bits + shape[0])
    ours = pack_zero_points(zp, bits)
    theirs = ct_helpers.pack_to_int32(zp, bits, packed_dim=0)
    assert ours.shape == (packed_width(shape[0], bits), shape[1]) == theirs.shape
    assert ours.numpy().tobytes() == theirs.contiguous().numpy().tobytes()
    assert torch.equal(unpack_zero_points(ours, bits, shape[0]), zp)
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=0), zp)


def test_bit_positions_are_a_dense_little_endian_stream():
    # 3-bit: element i occupies bits [3i, 3i+3); element 10 straddles words 0 and 1
    bits = 3
    codes = torch.full((1, 32), -4, dtype=torch.int8)  # stored value 0 everywhere
    codes[0, 10] = 3  # stored value 7 = 0b111 at bits 30, 31, 32
    packed = pack_codes(codes, bits)
    assert packed.shape == (1, 3)
    assert packed[0, 0].item() == -(1 << 31) + (1 << 30)  # bits 30 and 31 set -> 0xC0000000
    assert packed[0, 1].item() == 1 and packed[0, 2].item() == 0
    # 4-bit: unchanged from the pre-0.18 nibble layout (element 1 = bits 4..7)
    codes4 = torch.tensor([[-8, -7, -8, -8, -8, -8, -8, -8]], dtype=torch.int8)
    assert pack_codes(codes4, 4).tolist() == [[1 << 4]]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    n=st.integers(1, 40),
    k=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_property_round_trip_and_agreement(bits, n, k, seed):
    codes = random_codes(n, k, bits, seed)
    packed = pack_codes(codes, bits)
    assert packed.shape == (n, (k * bits + 31) // 32)
    assert torch.equal(unpack_codes(packed, bits, k), codes)
    assert torch.equal(packed, ct_helpers.pack_to_int32(codes, bits))
    zpacked = pack_zero_points(codes, bits)
    assert torch.equal(unpack_zero_points(zpacked, bits, n), codes)
    assert torch.equal(zpacked, ct_helpers.pack_to_int32(codes, bits, packed_dim=0))


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 16), k=st.integers(1, 100))
def test_property_extreme_values_round_trip(bits, n, k):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for value in (lo, hi):
        codes = torch.full((n, k), value, dtype=torch.int8)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, k), codes)


def test_row_chunking_is_seamless(monkeypatch):
    import vllm_slq.quant.packing as packing

    monkeypatch.setattr(packing, "_ROW_CHUNK_ELEMENTS", 50)  # forces many small chunks
    codes = random_codes(37, 23, 5, seed=3)
    packed = pack_codes(codes, 5)
    assert torch.equal(packed, ct_helpers.pack_to_int32(codes, 5))
    assert torch.equal(unpack_codes(packed, 5, 23), codes)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 2.0, "4"])
def test_bits_outside_2_to_8_rejected(bits):
    codes = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(PackingError, match="bits must be an integer in 2..8"):
        pack_codes(codes, bits)
    with pytest.raises(PackingError, match="bits"):
        unpack_codes(torch.zeros(2, 1, dtype=torch.int32), bits, 8)


def test_out_of_range_codes_rejected():
    codes = torch.zeros(2, 8, dtype=torch.int8)
    codes[1, 3] = 4  # 3-bit range is [-4, 3]
    with pytest.raises(PackingError, match=r"values span \[0, 4\], outside the 3-bit range \[-4, 3\]"):
        pack_codes(codes, 3)
    with pytest.raises(PackingError, match="pack_zero_points"):
        pack_zero_points(codes, 3)


def test_wrong_dtypes_and_shapes_rejected():
    with pytest.raises(PackingError, match="int8"):
        pack_codes(torch.zeros(2, 8, dtype=torch.int32), 4)
    with pytest.raises(PackingError, match="2-D"):
        pack_codes(torch.zeros(8, dtype=torch.int8), 4)
    with pytest.raises(PackingError, match="need 3 words along dim 1"):
        unpack_codes(torch.zeros(2, 2, dtype=torch.int32), 3, 32)
    with pytest.raises(PackingError, match="int32"):
        unpack_codes(torch.zeros(2, 1, dtype=torch.int64), 4, 8)
    with pytest.raises(PackingError, match="along dim 0"):
        unpack_zero_points(torch.zeros(2, 4, dtype=torch.int32), 4, 32)

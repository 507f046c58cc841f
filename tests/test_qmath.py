"""Quantization arithmetic and bit packing: properties that must hold for every input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ptqlite.qmath import (
    asymmetric_params,
    bits_for,
    code_groups,
    dequantize,
    pack_bits,
    pack_code_groups,
    qrange,
    quantize,
    round_half_away,
    symmetric_params,
    unpack_bits,
    unpack_code_groups,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def test_qrange_and_rounding():
    assert qrange(8) == (-128, 127)
    assert qrange(1) == (-1, 0)
    assert qrange(4, signed=False) == (0, 15)
    np.testing.assert_array_equal(round_half_away(np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])),
                                  [-3, -2, -1, 1, 2, 3])


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)), elements=finite),
       st.integers(2, 16), st.sampled_from([None, 0, 1]))
def test_asymmetric_error_is_at_most_half_a_step(w, bits, axis):
    params = asymmetric_params(w, bits, axis)
    w_hat = dequantize(quantize(w, params), params)
    # every value lies inside the quantized range, so only rounding error remains: half a step, plus the float32
    # rounding of the dequantized value (at 15 bits and |w| ~ 1e3 half a step is ~500 float32 ulps, not many more)
    bound = np.broadcast_to(params.scale / 2, w.shape) * (1 + 1e-5) + np.abs(w) * np.finfo(np.float32).eps + 1e-6
    assert np.all(np.abs(w_hat - w) <= bound)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)), elements=finite), st.integers(2, 8))
def test_zero_is_exact_and_codes_in_range(w, bits):
    params = asymmetric_params(w, bits, 0)
    q = quantize(w, params)
    assert q.min() >= params.qmin and q.max() <= params.qmax
    assert np.all(dequantize(params.zero_point, params) == 0)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, st.integers(1, 50), elements=finite), st.integers(2, 8))
def test_symmetric_has_zero_point_zero_and_bounded_error(w, bits):
    params = symmetric_params(w, bits, None)
    q = quantize(w, params)
    assert np.all(params.zero_point == 0) and q.min() >= -params.qmax
    assert np.all(np.abs(dequantize(q, params) - w) <= params.scale / 2 * (1 + 1e-5) + 1e-6)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 16), st.data())
def test_pack_unpack_round_trip_every_width(bits, data):
    codes = data.draw(arrays(np.int64, st.integers(0, 200), elements=st.integers(0, (1 << bits) - 1)))
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, codes.size), codes)


def test_pack_rejects_codes_that_do_not_fit():
    try:
        pack_bits(np.array([4]), 2)
    except ValueError as exc:
        assert "2 bits" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_bits_for():
    assert [bits_for(n) for n in (1, 2, 3, 4, 5, 256, 257)] == [1, 1, 2, 2, 3, 8, 9]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.integers(1, 41), st.data())
def test_code_groups_pack_each_group_as_a_little_endian_bit_stream(bits, rows, width, data):
    """pack_code_groups: a row padded with zero codes to `count` parts of `groups` codes; group g is code g of
    each part, its bits lowest first packed lowest bit first into whole bytes, and the row stores byte j of every
    group together (planes); unpack_code_groups inverts it, for any row width."""
    codes = data.draw(arrays(np.int64, (rows, width), elements=st.integers(0, (1 << bits) - 1)))
    packed = pack_code_groups(codes, bits)
    count, size = code_groups(bits)
    groups = -(-width // count)
    assert packed.dtype == np.uint8 and packed.shape == (rows, groups * size)
    padded = np.zeros((rows, count * groups), np.int64)
    padded[:, :width] = codes
    by_group = padded.reshape(rows, count, groups).transpose(0, 2, 1)  # [rows, groups, count]
    stream = (by_group[..., None] >> np.arange(bits)) & 1  # each code's bits, lowest first
    group_bytes = np.packbits(stream.reshape(rows, groups, -1).astype(np.uint8), axis=2, bitorder="little")
    np.testing.assert_array_equal(packed, group_bytes.transpose(0, 2, 1).reshape(rows, -1))
    np.testing.assert_array_equal(unpack_code_groups(packed, bits, width), codes)


def test_code_groups_of_6_bits():
    assert code_groups(6) == (4, 3) and code_groups(3) == (8, 3) and code_groups(5) == (8, 5)
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])  # two groups: (1, 3, 5, 7) and (2, 4, 6, 8)
    words = [1 | 3 << 6 | 5 << 12 | 7 << 18, 2 | 4 << 6 | 6 << 12 | 8 << 18]
    np.testing.assert_array_equal(pack_code_groups(codes, 6), [[w >> shift & 255 for shift in (0, 8, 16)
                                                                for w in words]])
    with pytest.raises(ValueError, match="does not fit in 6 bits"):
        pack_code_groups(np.array([[64]]), 6)
    with pytest.raises(ValueError, match="1..8 bit codes, not 9"):
        code_groups(9)

"""Quantization arithmetic and bit packing: properties that must hold for every input."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ptqlite.qmath import (
    asymmetric_params,
    bits_for,
    dequantize,
    pack_bits,
    qrange,
    quantize,
    round_half_away,
    symmetric_params,
    unpack_bits,
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

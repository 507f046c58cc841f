"""Activation observers: exact values by hand, the vectorised KL search against a plain loop, and streaming
properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ptqlite.observers import (
    KLObserver,
    MinMaxObserver,
    Observer,
    OutlierRemovalObserver,
    kl_divergences,
    kl_threshold_bins,
    make_observer,
    quantiles,
)

samples = st.lists(arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e4, 1e4, width=32)),
                   min_size=1, max_size=6)


def feed(observer: Observer, xs) -> Observer:
    for x in xs:
        observer.update(x)
    return observer


def test_make_observer():
    assert isinstance(make_observer("MAX_MIN"), MinMaxObserver)
    assert isinstance(make_observer("KL"), KLObserver)
    assert isinstance(make_observer("REMOVAL_OUTLIER"), OutlierRemovalObserver)
    for method in ("MAX_MIN", "KL", "REMOVAL_OUTLIER"):
        assert isinstance(make_observer(method), Observer)
        assert make_observer(method).range() == (0.0, 0.0)  # nothing seen yet
    with pytest.raises(ValueError, match="MAX_MIN, KL, REMOVAL_OUTLIER"):
        make_observer("PERCENTILE")


def test_max_min_exact():
    observer = feed(MinMaxObserver(), [np.array([[0.5, 2.0]]), np.array([-1.25, 0.0]), np.array([3.5])])
    assert observer.range() == (-1.25, 3.5)


def test_non_finite_values_are_ignored():
    observer = feed(MinMaxObserver(), [np.array([1.0, np.nan, -np.inf, -2.0]), np.array([np.inf])])
    assert observer.range() == (-2.0, 1.0)


def test_removal_outlier_by_hand():
    # 10001 evenly spaced values: the 0.01% quantile is at position 1, the 99.99% one at position 9999
    first = np.arange(10001, dtype=np.float32)
    second = np.arange(10001, dtype=np.float32) * 2 - 5000
    np.random.default_rng(0).shuffle(second)
    observer = feed(OutlierRemovalObserver(), [first, second])
    lo, hi = observer.range()
    assert lo == pytest.approx((1 + (2 - 5000)) / 2)
    assert hi == pytest.approx((9999 + (2 * 9999 - 5000)) / 2)
    expected = np.mean([np.quantile(x, [0.0001, 0.9999]) for x in (first, second)], axis=0)
    assert (lo, hi) == pytest.approx(tuple(expected))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 30000), elements=st.floats(-100, 100, width=32)),
       st.sampled_from([(0.0001, 0.9999), (0.0, 1.0), (0.25, 0.5, 0.999)]))
def test_quantiles_match_numpy(x, qs):
    np.testing.assert_allclose(quantiles(x, qs), np.quantile(x, qs), rtol=1e-6, atol=1e-6)


def test_quantiles_on_large_sorted_and_tied_data():
    rng = np.random.default_rng(3)
    for x in (np.sort(rng.standard_normal(200_000)), np.sort(rng.standard_normal(200_000))[::-1],
              np.repeat(rng.standard_normal(500), 400), np.maximum(rng.standard_normal(200_000), 0)):
        x = x.astype(np.float32)
        np.testing.assert_allclose(quantiles(x, (0.0001, 0.9999)), np.quantile(x, (0.0001, 0.9999)), rtol=1e-6)


def brute_force_kl(hist: np.ndarray, quantized_bins: int = 128) -> np.ndarray:
    """One candidate at a time, written out plainly."""
    h = hist.astype(np.float64)
    result = []
    for i in range(quantized_bins, h.size + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        group = np.arange(i) * quantized_bins // i
        q = np.zeros(i)
        for g in range(quantized_bins):
            members = group == g
            nonzero = members & (p > 0)
            if nonzero.any():
                q[nonzero] = max(h[:i][members].sum(), 1e-12) / nonzero.sum()
        p, q = p / p.sum(), q / h[:i].sum()
        kept = p > 0
        result.append(np.sum(p[kept] * np.log(p[kept] / q[kept])))
    return np.array(result)


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_kl_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, 40, 300)
    hist[rng.random(300) < 0.4] = 0  # empty bins, including possibly the ones at a threshold
    hist[-1] = 2
    candidates, divergences = kl_divergences(hist)
    np.testing.assert_array_equal(candidates, np.arange(128, 301))
    np.testing.assert_allclose(divergences, brute_force_kl(hist), rtol=1e-9, atol=1e-12)


def test_kl_gaussian_with_outliers_clips_them():
    rng = np.random.default_rng(0)
    observer = KLObserver()
    for _ in range(8):
        x = rng.standard_normal(20000).astype(np.float32)
        x[:3] = [60.0, -55.0, 48.0]
        observer.update(x)
    lo, hi = observer.range()
    assert lo == -hi
    assert 2.5 < hi < 0.2 * 60.0  # well inside max|x|, still covering the bulk of the Gaussian


def test_kl_uniform_keeps_nearly_everything():
    rng = np.random.default_rng(1)
    observer = feed(KLObserver(), [rng.uniform(-3, 3, 20000).astype(np.float32) for _ in range(4)])
    lo, hi = observer.range()
    assert hi > 0.95 * 3 and lo < -0.95 * 3


def test_kl_relu_output_keeps_zero_as_lower_bound():
    rng = np.random.default_rng(2)
    xs = [np.maximum(rng.standard_normal(5000), 0) for _ in range(3)]
    observer = feed(KLObserver(), xs)
    lo, hi = observer.range()
    assert lo == 0.0 and 0 < hi <= max(x.max() for x in xs)
    assert observer.hist.sum() == sum(np.count_nonzero(x) for x in xs)  # the zeros are not counted


def test_kl_counts_no_zeros_and_grows_exactly():
    observer = KLObserver()
    observer.update(np.array([0.0, 0.0, 1.0, 2.0]))
    # the smallest power-of-two width with 2048 bins strictly above max|x|: 2 / 2048 = 2**-10 -> 2**-9
    assert observer.hist.sum() == 2 and observer.bin_width == 2**-9
    observer.update(np.array([0.0, 9.0]))  # needs a wider histogram: groups of 4 bins merge
    assert observer.hist.sum() == 3 and observer.bin_width == 2**-7
    one_shot = KLObserver()
    one_shot.update(np.array([1.0, 2.0, 9.0, 0.0]))
    np.testing.assert_array_equal(observer.hist, one_shot.hist)


def test_kl_all_zero_and_narrow_data():
    assert feed(KLObserver(), [np.zeros(10)]).range() == (0.0, 0.0)
    # values filling fewer than 128 bins: no clipping at all
    assert kl_threshold_bins(np.array([5, 0, 3])) == 3
    assert feed(KLObserver(), [np.array([-1.0, 0.5, 1.0])]).range() == (-1.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(samples)
def test_max_min_covers_every_value_and_streams_like_one_shot(xs):
    lo, hi = feed(MinMaxObserver(), xs).range()
    everything = np.concatenate(xs)
    assert lo == everything.min() and hi == everything.max()
    assert feed(MinMaxObserver(), [everything]).range() == (lo, hi)


@settings(max_examples=25, deadline=None)
@given(samples, st.randoms(use_true_random=False))
def test_update_order_does_not_matter(xs, rnd):
    shuffled = list(xs)
    rnd.shuffle(shuffled)
    assert feed(MinMaxObserver(), xs).range() == feed(MinMaxObserver(), shuffled).range()
    assert feed(OutlierRemovalObserver(), xs).range() == pytest.approx(
        feed(OutlierRemovalObserver(), shuffled).range(), rel=1e-9, abs=1e-9)
    # the KL histogram sits on a power-of-two grid, so it is exactly the same in any order
    a, b = feed(KLObserver(), xs), feed(KLObserver(), shuffled)
    np.testing.assert_array_equal(a.hist, b.hist)
    assert a.range() == b.range()


@settings(max_examples=25, deadline=None)
@given(samples)
def test_ranges_stay_inside_what_was_seen(xs):
    everything = np.concatenate(xs)
    for method in ("KL", "REMOVAL_OUTLIER"):
        lo, hi = feed(make_observer(method), xs).range()
        assert everything.min() - 1e-3 <= lo <= hi <= everything.max() + 1e-3


@pytest.mark.parametrize("scale", [1e-42, 1e-30, 1.0, 1e30])
def test_kl_handles_tiny_and_huge_magnitudes(scale):
    rng = np.random.default_rng(4)
    x = (rng.uniform(-1, 1, 5000) * scale).astype(np.float32)
    observer = feed(KLObserver(), [x])
    assert observer.hist.sum() == np.count_nonzero(x)
    lo, hi = observer.range()
    assert x.min() <= lo < 0 < hi <= x.max() and hi > 0.9 * x.max()

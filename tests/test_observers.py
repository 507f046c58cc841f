"""Activation observers: exact values by hand, the vectorised KL search against a plain loop, and streaming
properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ptqlite.observers import (
    ERROR_LEVELS,
    FALLBACK_FACTOR,
    OUTLIER_SHARE,
    Histogram,
    KLObserver,
    MinMaxObserver,
    Observer,
    OutlierRemovalObserver,
    fallback_notes,
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
    lo, hi = observer.candidate()
    assert lo == pytest.approx((1 + (2 - 5000)) / 2)
    assert hi == pytest.approx((9999 + (2 * 9999 - 5000)) / 2)
    expected = np.mean([np.quantile(x, [0.0001, 0.9999]) for x in (first, second)], axis=0)
    assert (lo, hi) == pytest.approx(tuple(expected))
    # Averaging two samples of different ranges cuts off a quarter of the second one: far worse than MAX_MIN.
    assert observer.range() == (-5000.0, 15000.0) and observer.fell_back
    same = feed(OutlierRemovalObserver(), [first, first[::-1]])
    assert same.range() == pytest.approx((1.0, 9999.0)) and not same.fell_back


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
    for i in range(8):
        x = rng.standard_normal(20000).astype(np.float32)
        if i == 3:
            x[:3] = [60.0, -55.0, 48.0]  # 3 outliers in 160 000 values
        observer.update(x)
    lo, hi = observer.range()
    assert lo == -hi and not observer.fell_back
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
    np.testing.assert_array_equal(a.histogram.negative, b.histogram.negative)
    assert a.range() == b.range() and a.fell_back == b.fell_back


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


# ---------------------------------------------------------------- clipped ranges never far worse than MAX_MIN


def quantization_error(x: np.ndarray, lo: float, hi: float, power: int = 2) -> float:
    """The mean error of x on the grid the fallback rule assumes: ERROR_LEVELS codes over [lo, hi] widened to hold
    0, 0 exact, values outside clipped."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    x = x.astype(np.float64)
    step = (hi - lo) / (ERROR_LEVELS - 1)
    q = np.clip(np.round(x / step) * step, lo, hi) if step else np.zeros_like(x)
    return float(np.mean(np.abs(x - q) ** power))


def mixture(rng: np.random.Generator, bulk: str, fraction: float, scale: float, sign: float, relu: bool,
            count: int = 4, size: int = 5000) -> list[np.ndarray]:
    """Samples of a bulk distribution with a `fraction` of rare values about `scale` times larger."""
    xs = []
    draw = {"normal": lambda n: rng.standard_normal(n), "uniform": lambda n: rng.uniform(-1, 1, n),
            "exponential": lambda n: rng.exponential(1.0, n), "laplace": lambda n: rng.laplace(0.0, 1.0, n)}[bulk]
    for _ in range(count):
        x = draw(size)
        rare = rng.random(size) < fraction
        x[rare] = sign * rng.uniform(0.5, 1.0, rare.sum()) * scale
        xs.append((np.maximum(x, 0) if relu else x).astype(np.float32))
    return xs


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["normal", "uniform", "exponential", "laplace"]), st.floats(0, 0.05), st.floats(1, 300),
       st.sampled_from([1.0, -1.0]), st.booleans(), st.integers(0, 2**32 - 1))
def test_clipped_ranges_are_never_far_worse_than_max_min(bulk, fraction, scale, sign, relu, seed):
    """Rare large values that carry the signal (a detector's boxes and scores): whatever KL or REMOVAL_OUTLIER find,
    the range they give costs at most FALLBACK_FACTOR times MAX_MIN's squared error on the data itself (a little
    more allowed for the histogram's resolution)."""
    xs = mixture(np.random.default_rng(seed), bulk, fraction, scale, sign, relu)
    everything = np.concatenate(xs)
    baseline = quantization_error(everything, everything.min(), everything.max())
    for method in ("KL", "REMOVAL_OUTLIER"):
        observer = feed(make_observer(method), xs)
        lo, hi = observer.range()
        assert quantization_error(everything, lo, hi) <= FALLBACK_FACTOR * 1.1 * baseline + 1e-12
        if observer.fell_back:
            assert (lo, hi) == (everything.min(), everything.max())


def test_rare_large_values_are_kept():
    """0.4% of the values 50 to 100 times the bulk's scale (a detector's box sizes): KL's threshold (8.5) would
    clip them all, at over 1000 times MAX_MIN's squared error, so KL falls back to MAX_MIN's range."""
    xs = mixture(np.random.default_rng(5), "exponential", 0.004, 100.0, 1.0, relu=False, count=8)
    observer = feed(KLObserver(), xs)
    seen = feed(MinMaxObserver(), xs).range()
    assert observer.candidate()[1] < 0.1 * seen[1]
    assert observer.range() == seen and observer.fell_back


def test_removal_outlier_with_objects_in_some_samples_only():
    """Large values in two samples of eight (objects in a few images): the per-sample quantiles averaged over all
    eight cut them to a third, so REMOVAL_OUTLIER falls back to MAX_MIN's range."""
    rng = np.random.default_rng(12)
    xs = mixture(rng, "exponential", 0.0, 1.0, 1.0, relu=False, count=8)
    for x in xs[:2]:
        x[:100] = rng.uniform(50, 100, 100)
    observer = feed(OutlierRemovalObserver(), xs)
    seen = feed(MinMaxObserver(), xs).range()
    assert observer.candidate()[1] < 0.4 * seen[1]
    assert observer.range() == seen and observer.fell_back


def test_a_clipped_population_must_beat_max_min_outright():
    """0.05% of the values at 3 to 6 standard deviations (a detector's objects; YOLOv8's SiLU activations had
    0.02-0.06% clipped): KL's threshold clips 0.02% of them at about twice MAX_MIN's squared error. That is within
    the factor, but more than outliers (0.01% a side), so the tensor falls back; 3 far outliers in 160 000 values
    are still clipped (test_kl_gaussian_with_outliers_clips_them)."""
    xs = mixture(np.random.default_rng(13), "normal", 0.0005, 6.0, 1.0, relu=False, count=8)
    observer = feed(KLObserver(), xs)
    found, histogram = observer.candidate(), observer.histogram
    seen = histogram.lo, histogram.hi
    assert histogram.error(*seen) < histogram.error(*found) <= FALLBACK_FACTOR * histogram.error(*seen)
    below, above = histogram.clipped_shares(*found)
    assert below == 0.0 and 1.5 * OUTLIER_SHARE < above < 3 * OUTLIER_SHARE
    everything = np.concatenate(xs)
    assert above == pytest.approx(np.mean(everything > found[1]), rel=0.1)
    assert observer.range() == seen and observer.fell_back


def test_clipped_shares_from_the_histogram():
    rng = np.random.default_rng(14)
    xs = [rng.laplace(0.0, 1.0, 20000).astype(np.float32) for _ in range(4)]
    everything = np.concatenate(xs)
    histogram = feed(KLObserver(), xs).histogram
    for lo, hi in ((-3.0, 2.0), (-6.0, 7.5), (everything.min(), everything.max())):
        below, above = histogram.clipped_shares(lo, hi)
        assert below == pytest.approx(np.mean(everything < lo), rel=0.02, abs=1e-12)
        assert above == pytest.approx(np.mean(everything > hi), rel=0.02, abs=1e-12)


@pytest.mark.parametrize("bulk", ["normal", "laplace"])
def test_kl_still_clips_where_clipping_helps(bulk):
    """A handful of outliers in 160 000 values: the KL range stays far inside MAX_MIN's; the bulk gets 8 times
    finer steps, so the mean absolute error is smaller, and the squared error stays within the allowed factor."""
    rng = np.random.default_rng(6)
    xs = mixture(rng, bulk, 0.0, 1.0, 1.0, relu=False, count=8, size=20000)
    xs[2][:4] = [40.0, -35.0, 30.0, 45.0]
    everything = np.concatenate(xs)
    observer = feed(KLObserver(), xs)
    lo, hi = observer.range()
    assert not observer.fell_back and hi - lo < 0.3 * (everything.max() - everything.min())
    seen = everything.min(), everything.max()
    assert quantization_error(everything, lo, hi, power=1) < 0.5 * quantization_error(everything, *seen, power=1)
    assert quantization_error(everything, lo, hi) <= FALLBACK_FACTOR * quantization_error(everything, *seen)


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("bulk,relu", [("normal", False), ("exponential", False), ("laplace", True)])
def test_histogram_error_matches_quantizing_the_data(bulk, relu, power):
    """The error the rule compares, read from the streamed histogram, against quantizing the data itself: for
    ranges that clip nothing, a little, or a lot, on both sides."""
    xs = mixture(np.random.default_rng(7), bulk, 0.01, 12.0, -1.0, relu)
    everything = np.concatenate(xs)
    histogram = Histogram()
    for x in xs:
        histogram.update(x.reshape(-1), float(x.min()), float(x.max()))
    lo, hi = everything.min(), everything.max()
    for found in ((lo, hi), (0.5 * lo, 0.5 * hi), (0.1 * lo, 0.9 * hi), (0.0, 0.2 * hi), (0.9 * lo, 0.3 * hi)):
        expected = quantization_error(everything, *found, power=power)
        assert histogram.error(*found, power=power) == pytest.approx(expected, rel=0.03)


def test_histogram_keeps_the_sign_and_the_zeros():
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.uniform(0, 6, 9000), -rng.uniform(0, 40, 30), np.zeros(970)]).astype(np.float32)
    histogram = Histogram()
    histogram.update(x, float(x.min()), float(x.max()))
    assert histogram.negative.sum() == 30 and histogram.hist.sum() == 9030 and histogram.zeros == 970
    # a mostly positive tensor with a rare negative tail: cutting the tail to [-6, 6] costs more than MAX_MIN
    assert histogram.error(-6.0, 6.0) > 100 * histogram.error(float(x.min()), float(x.max()))
    # while a range that keeps the tail and cuts the positive side a little stays close to MAX_MIN
    assert histogram.error(float(x.min()), 5.9) < 2 * histogram.error(float(x.min()), float(x.max()))


def test_kl_on_mostly_zero_relu_outputs():
    """99% exact zeros (a ReLU that is mostly off): the zeros neither enter the KL histogram nor change the
    decision, since they are exact on every grid."""
    rng = np.random.default_rng(9)
    sparse = [np.where(rng.random(20000) < 0.01, np.abs(rng.standard_normal(20000)) * 3, 0.0) for _ in range(4)]
    dense = [x[x != 0] for x in sparse]
    a, b = feed(KLObserver(), sparse), feed(KLObserver(), dense)
    assert a.threshold() == b.threshold() and a.range()[1] == b.range()[1] and a.fell_back == b.fell_back
    assert a.range()[0] == 0.0
    assert a.histogram.zeros == sum(x.size for x in sparse) - sum(x.size for x in dense)


def test_few_distinct_values():
    """Class indices or counts: a few exact values, one of them rare and large. Clipping the rare one would cost
    more than the finer steps save, so KL keeps MAX_MIN's range; without it, KL keeps every value."""
    rng = np.random.default_rng(10)
    xs = [rng.integers(0, 4, 5000).astype(np.float32) for _ in range(4)]
    assert feed(KLObserver(), xs).range() == (0.0, 3.0)
    xs[1][:40] = 100.0
    observer = feed(KLObserver(), xs)
    assert observer.range() == (0.0, 100.0)


def test_fallback_notes():
    rng = np.random.default_rng(11)
    # 8 x 20 000 values: KL clips only the Gaussian's outermost 0.005% (on 5 000 values it would clip 0.06%, at
    # twice MAX_MIN's squared error, and fall back)
    kept = feed(KLObserver(), [rng.standard_normal(20000) for _ in range(8)])
    fell = feed(KLObserver(), mixture(rng, "exponential", 0.004, 100.0, 1.0, relu=False, count=8))
    observers = [kept, fell, fell]
    for observer in observers:
        observer.range()
    assert fallback_notes("KL", observers) == [
        "KL: 2 of 3 tensors fell back to MAX_MIN ranges (clipping would have cost more than it saved)"]
    assert fallback_notes("KL", [kept]) == []
    assert fallback_notes("MAX_MIN", [feed(MinMaxObserver(), [np.ones(3)])]) == []

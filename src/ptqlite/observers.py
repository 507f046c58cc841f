"""Activation statistics gathered one sample at a time ([full_quant_param] activation_quant_method).

Every observer keeps a fixed-size summary (a few floats, or two 2048-bin histograms) and never the activations, so
memory does not grow with the number of samples. range() gives the float range to quantize; making it contain 0
and turning it into a scale and zero point is the caller's job. docs/calibration.md explains the methods.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np

from .config import ACTIVATION_METHODS

HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128
OUTLIER_QUANTILES = (0.0001, 0.9999)
# A clipped range (KL, REMOVAL_OUTLIER) is kept only when its mean squared error on the tensor's own histogram is
# at most MAX_MIN's, or at most FALLBACK_FACTOR times MAX_MIN's (4: one bit of signal-to-noise ratio) while it
# clips only outliers: at most OUTLIER_SHARE of the values on each side, the share REMOVAL_OUTLIER's quantiles
# cut (a larger clipped share is a population that carries signal, such as a detector's objects); the error is
# measured on a grid of ERROR_LEVELS codes (8 bits).
FALLBACK_FACTOR = 4.0
OUTLIER_SHARE = OUTLIER_QUANTILES[0]
ERROR_LEVELS = 256


@runtime_checkable
class Observer(Protocol):
    def update(self, x: np.ndarray) -> None: ...  # one sample's activation; never keeps x

    def range(self) -> tuple[float, float]: ...  # (lo, hi) float range to quantize


def make_observer(method: str) -> Observer:
    """A fresh observer for activation_quant_method `method`: MAX_MIN, KL or REMOVAL_OUTLIER."""
    if method == "MAX_MIN":
        return MinMaxObserver()
    if method == "KL":
        return KLObserver()
    if method == "REMOVAL_OUTLIER":
        return OutlierRemovalObserver()
    raise ValueError(f"unknown activation_quant_method {method!r}; expected one of {', '.join(ACTIVATION_METHODS)}")


def _finite(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """x as a flat float array with NaN/Inf dropped (copied only when there are any), and its min and max."""
    x = np.asarray(x).reshape(-1)
    if x.dtype.kind != "f" or x.dtype.itemsize < 4:
        x = x.astype(np.float32)
    if not x.size:
        return x, math.inf, -math.inf
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        x = x[np.isfinite(x)]
        return _finite(x) if x.size else (x, math.inf, -math.inf)
    return x, lo, hi


def quantiles(x: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """np.quantile's default (linear) quantiles, fast for quantiles near 0 or 1.

    np.partition is slowest exactly there (slower than a full sort), so each tail is first cut down to a few
    candidates with a threshold taken from a strided subsample, then partitioned exactly. Small tensors, central
    quantiles and thresholds that keep too few values fall back to one full sort: the result is exact either
    way.
    """
    flat = np.asarray(x).reshape(-1)
    n = flat.size
    position = np.asarray(qs, np.float64) * (n - 1)
    below = np.floor(position).astype(np.intp)
    ranks = np.concatenate((below, np.minimum(below + 1, n - 1)))
    if n <= 8192:  # small: one sort costs less than the calls that avoid it
        values = np.sort(flat)[ranks].astype(np.float64)
        low, high = values[: below.size], values[below.size:]
        return (low + (position - below) * (high - low)).tolist()
    values = np.empty(ranks.size, np.float64)
    top = ranks >= n - 1 - ranks  # each rank is read from its nearer tail
    for side in (False, True):
        chosen = top == side
        if chosen.any():
            depths = n - 1 - ranks[chosen] if side else ranks[chosen]  # 0 = the extreme value itself
            values[chosen] = _tail_values(flat, depths, side)
    low, high = values[: below.size], values[below.size:]
    return (low + (position - below) * (high - low)).tolist()


def _tail_values(flat: np.ndarray, depths: np.ndarray, top: bool) -> np.ndarray:
    """The values `depths` places from the largest (top) or smallest end of flat."""
    n, depth = flat.size, int(depths.max())
    if depth * 64 < n:
        sub = flat[:: max(1, n // (256 * (depth + 1)))]
        # A cut at about twice the needed share of the subsample, plus a margin, keeps enough values in practice.
        j = min(sub.size - 1, 2 * (depth + 1) * sub.size // n + 8)
        cut = np.partition(sub, sub.size - 1 - j)[sub.size - 1 - j] if top else np.partition(sub, j)[j]
        if np.count_nonzero(flat >= cut if top else flat <= cut) > depth:
            # Values strictly beyond the cut are few; every other wanted value equals the cut. Splitting off
            # the ties matters: a ReLU output has half its values equal to the cut 0.
            beyond = flat[flat > cut] if top else flat[flat < cut]
            out = np.full(depths.size, float(cut))
            inner = depths < beyond.size
            if inner.any():
                local = beyond.size - 1 - depths[inner] if top else depths[inner]
                out[inner] = np.partition(beyond, np.unique(local))[local]
            return out
    local = n - 1 - depths if top else depths
    return np.sort(flat)[local].astype(np.float64)  # central quantiles: a sort copes with ties, partition not


class MinMaxObserver:
    """MAX_MIN: the smallest and largest value seen over all samples."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf

    def update(self, x: np.ndarray) -> None:
        _, lo, hi = _finite(x)
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:  # nothing seen
            return 0.0, 0.0
        return self.lo, self.hi


class Histogram:
    """A streaming histogram of |x| (exact zeros counted apart) and, beside it, of the negative values alone.

    2048 bins of width 2**k, k the smallest integer with 2048 * 2**k > max|x| seen so far. When a larger |x|
    arrives, k grows and neighbouring bins merge exactly (old bin i -> new bin i >> shift): no first pass over the
    data, no approximation, and the result depends only on the values, not on the order of the samples. The data
    then always fills more than half the bins (1024..2048 of them). The negative part lets the error of a range
    that is not symmetric be measured on each side (positive counts = hist - negative).
    """

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        self.bins = bins
        self.hist = np.zeros(bins, np.int64)  # of |x|, zeros left out
        self.negative = np.zeros(bins, np.int64)  # of |x| for x < 0
        self.zeros = 0
        self.exponent: int | None = None  # bin width is 2**exponent
        self.lo = math.inf  # the extremes seen
        self.hi = -math.inf

    @property
    def bin_width(self) -> float:
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    def update(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Count x (flat, finite, as given by _finite with its min and max)."""
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        top = max(-lo, hi)
        if not x.size:
            return
        if top == 0.0:
            self.zeros += x.size
            return
        self._grow_to(top)
        scale = math.ldexp(1.0, -self.exponent)
        magnitude = np.abs(x, dtype=np.float64 if scale > 1e38 else None)  # float64 when 1/width overflows f32
        # Zeros (+0 after abs) are counted on the integer view: several times faster than on floats.
        zeros = x.size - np.count_nonzero(magnitude.view(np.uint64 if magnitude.itemsize == 8 else np.uint32))
        # Scaling by a power of two is exact and |x| < bins * width, so every index is its true bin < bins.
        magnitude *= scale
        index = magnitude.astype(np.uint16 if self.bins <= 65536 else np.intp)  # narrow: a cheaper cast
        counts = np.bincount(index, minlength=self.bins)
        counts[0] -= zeros  # zeros fell in bin 0; drop them
        self.hist += counts
        self.zeros += zeros
        if lo < 0:  # outputs of a ReLU (most activations) skip this
            self.negative += np.bincount(index[x < 0], minlength=self.bins)

    def _grow_to(self, top: float) -> None:
        # top / bins = mantissa * 2**needed with mantissa in [0.5, 1): 2**needed is the smallest power of two
        # strictly above top / bins, so even the largest value has a bin of its own (no clamping).
        needed = math.frexp(top / self.bins)[1]
        if self.exponent is None:
            self.exponent = needed
        elif needed > self.exponent:
            shift = needed - self.exponent
            for name in ("hist", "negative"):
                merged = np.zeros(self.bins, np.int64)
                np.add.at(merged, np.arange(self.bins) >> shift, getattr(self, name))
                setattr(self, name, merged)
            self.exponent = needed

    def clipped_shares(self, lo: float, hi: float) -> tuple[float, float]:
        """The fractions of the values (zeros included) below lo and above hi, values spread evenly inside a bin
        whose last one ends at the extreme seen (as in range_error), so that MAX_MIN's own range clips nothing."""
        total = self.zeros + int(self.hist.sum())
        if not total:
            return 0.0, 0.0
        lower = np.arange(self.bins, dtype=np.float64) * self.bin_width
        shares = []
        for counts, limit, extreme in ((self.negative, max(-lo, 0.0), -self.lo),
                                       (self.hist - self.negative, max(hi, 0.0), self.hi)):
            upper = np.minimum(lower + self.bin_width, np.maximum(extreme, lower))
            span = upper - lower
            beyond = np.where(span > 0, np.clip((upper - limit) / np.where(span > 0, span, 1.0), 0.0, 1.0),
                              lower > limit)
            shares.append(float(np.dot(counts, beyond)) / total)
        return shares[0], shares[1]

    def error(self, lo: float, hi: float, power: int = 2) -> float:
        """Mean |x - dequantize(quantize(x))|**power per value (zeros included) for the range [lo, hi]: rounding
        inside, clipping outside; see range_error."""
        if self.lo > self.hi:
            return 0.0
        return range_error(self.hist - self.negative, self.negative, self.bin_width, lo, hi, (self.lo, self.hi),
                           self.zeros, power=power)


def range_error(positive: np.ndarray, negative: np.ndarray, width: float, lo: float, hi: float,
                seen: tuple[float, float] | None = None, zeros: int = 0, levels: int = ERROR_LEVELS,
                power: int = 2) -> float:
    """Mean quantization error (|error|**power; 2: squared) of the values counted in two magnitude histograms
    (bin i holds |x| in [i * width, (i + 1) * width), values spread evenly inside a bin) on a grid of `levels`
    codes over [lo, hi] widened to hold 0, 0 exactly representable: a value inside the range is off by its
    distance to the nearest multiple of the step, a value outside by its distance to the end it is clipped to.
    `seen` (the smallest and largest value) trims the last bin of each side so that MAX_MIN's own range clips
    nothing. Zeros are exact."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = (hi - lo) / (levels - 1)
    total = zeros + float(positive.sum()) + float(negative.sum())
    if total == 0:
        return 0.0
    seen_lo, seen_hi = seen if seen is not None else (-math.inf, math.inf)
    error = 0.0
    for counts, limit, extreme in ((positive, hi, seen_hi), (negative, -lo, -seen_lo)):
        used = np.flatnonzero(counts)
        if not used.size:
            continue
        counts = counts[: used[-1] + 1].astype(np.float64)
        lower = np.arange(counts.size, dtype=np.float64) * width
        upper = np.minimum(lower + width, max(extreme, lower[-1]))  # the last bin ends at the extreme seen
        span = upper - lower
        inner = np.clip(upper, lower, limit)  # [lower, inner] is inside the range, [inner, upper] is clipped
        rounding = (_rounding_integral(inner, step, power)
                    - _rounding_integral(np.minimum(lower, inner), step, power))
        clipping = (np.maximum(upper - limit, 0.0) ** (power + 1)
                    - np.maximum(lower - limit, 0.0) ** (power + 1)) / (power + 1)
        # A last bin that ends where it starts holds only the extreme itself: its error is that value's.
        point = np.where(lower > limit, lower - limit,
                         np.abs(lower - step * np.round(lower / step)) if step else lower) ** power
        error += float(np.dot(counts, np.where(span > 0, (rounding + clipping) / np.where(span > 0, span, 1.0),
                                               point)))
    return error / total


def _rounding_integral(x: np.ndarray, step: float, power: int = 1) -> np.ndarray:
    """The integral from 0 to x of d(t)**power, d(t) the distance from t to the nearest multiple of step (a
    triangle wave)."""
    k = power + 1
    if step <= 0.0:
        return x**k / k  # no grid: everything rounds to 0
    periods = np.floor(x / step)
    r = x - periods * step
    period = 2 * (step / 2) ** k / k
    return periods * period + np.where(r <= step / 2, r**k / k, period - (step - r) ** k / k)


class OutlierRemovalObserver:
    """REMOVAL_OUTLIER: each sample's 0.01% and 99.99% quantiles, averaged over samples; the MAX_MIN range
    instead when that range would lose more to clipping than it saves in rounding (see accepts)."""

    def __init__(self) -> None:
        self.lo_sum = 0.0
        self.hi_sum = 0.0
        self.count = 0
        self.histogram = Histogram()
        self.fell_back = False  # set by range(): the last range() returned the MAX_MIN range

    def update(self, x: np.ndarray) -> None:
        x, lo, hi = _finite(x)
        if x.size:
            q_lo, q_hi = quantiles(x, OUTLIER_QUANTILES)
            self.lo_sum += q_lo
            self.hi_sum += q_hi
            self.count += 1
            self.histogram.update(x, lo, hi)

    def candidate(self) -> tuple[float, float]:
        """The averaged quantiles, before the fallback rule."""
        if not self.count:
            return 0.0, 0.0
        return self.lo_sum / self.count, self.hi_sum / self.count

    def range(self) -> tuple[float, float]:
        found = self.candidate()
        self.fell_back = bool(self.count) and not accepts(self.histogram, found)
        return (self.histogram.lo, self.histogram.hi) if self.fell_back else found


def accepts(histogram: Histogram, found: tuple[float, float], factor: float = FALLBACK_FACTOR,
            share: float = OUTLIER_SHARE) -> bool:
    """Whether a clipped range `found` may replace MAX_MIN's (the extremes seen): its mean squared error on the
    tensor's own histogram, clipping included, must be at most MAX_MIN's, or at most `factor` times MAX_MIN's
    when it clips at most `share` of the values on each side.

    Squared error, because the layers after a tensor are mostly linear: what they see of a clipped value grows
    with the square of the cut, so rare large values that carry the signal (a detector's objects) weigh what they
    weigh in the outputs. The factor is for outliers only: a handful among many values (at most 0.01% on a
    side, what REMOVAL_OUTLIER cuts) may cost up to `factor` times more, so KL still clips them and the bulk gets
    finer steps; a larger clipped share is a population the later layers read (YOLOv8's SiLU activations:
    0.02-0.06% of their values clipped at 1.5 to 4 times MAX_MIN's error, and the detector lost 11 of 13
    boxes), so it must beat MAX_MIN outright."""
    seen = histogram.lo, histogram.hi
    if found == seen:
        return True
    error, baseline = histogram.error(*found), histogram.error(*seen)
    if error <= baseline:
        return True
    return error <= factor * baseline and max(histogram.clipped_shares(*found)) <= share


def fallback_notes(method: str, observers: Iterable[Observer]) -> list[str]:
    """The summary line counting the observers whose last range() fell back to MAX_MIN's (none for MAX_MIN, or
    when none fell back)."""
    observers = list(observers)
    fell_back = sum(bool(getattr(o, "fell_back", False)) for o in observers)
    if not fell_back:
        return []
    return [(f"{method}: {fell_back} of {len(observers)} tensors fell back to MAX_MIN ranges (clipping would "
             "have cost more than it saved)")]


class KLObserver:
    """KL: entropy calibration on a histogram of |x| (see Histogram), symmetric threshold T, range [-T, T] clipped
    to what was seen; the MAX_MIN range instead when the threshold would lose more to clipping than it saves in
    rounding (see accepts). Exact zeros are not in the KL histogram (ReLU outputs would swamp bin 0).
    """

    def __init__(self, bins: int = HISTOGRAM_BINS, quantized_bins: int = QUANTIZED_BINS) -> None:
        self.quantized_bins = quantized_bins
        self.histogram = Histogram(bins)
        self.fell_back = False  # set by range(): the last range() returned the MAX_MIN range

    @property
    def hist(self) -> np.ndarray:
        return self.histogram.hist

    @property
    def bin_width(self) -> float:
        return self.histogram.bin_width

    def update(self, x: np.ndarray) -> None:
        x, lo, hi = _finite(x)
        self.histogram.update(x, lo, hi)

    def threshold(self) -> float:
        """The clipping threshold T on |x| (0 when only zeros were seen)."""
        used = np.flatnonzero(self.hist)
        if not used.size:
            return 0.0
        return kl_threshold_bins(self.hist[: used[-1] + 1], self.quantized_bins) * self.bin_width

    def candidate(self) -> tuple[float, float]:
        """[-T, T] clipped to what was seen, before the fallback rule."""
        lo, hi = self.histogram.lo, self.histogram.hi
        if lo > hi:  # nothing seen
            return 0.0, 0.0
        t = self.threshold()
        if t == 0.0:
            return lo, hi
        # Clipped to what was seen, so a ReLU output keeps lo = 0 instead of wasting half the codes.
        return max(-t, lo), min(t, hi)

    def range(self) -> tuple[float, float]:
        found = self.candidate()
        seen = self.histogram.lo, self.histogram.hi
        self.fell_back = seen[0] <= seen[1] and not accepts(self.histogram, found)
        return seen if self.fell_back else found


def kl_divergences(hist: np.ndarray, quantized_bins: int = QUANTIZED_BINS) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every candidate threshold of a histogram whose last bin is non-empty.

    Candidate i keeps bins [0, i): P is hist[:i] with the clipped tail hist[i:] added to bin i-1; Q merges
    hist[:i] into `quantized_bins` groups (bin j goes to group j * quantized_bins // i) and spreads each group's
    count evenly over the group's bins where P is non-zero. Both are normalised. All candidates are evaluated
    at once from prefix sums, so the cost is O(candidates x quantized_bins) rather than O(candidates x bins).
    Returns (candidates, divergences).
    """
    h = np.asarray(hist, np.float64)
    n = h.size
    candidates = np.arange(quantized_bins, n + 1)
    total = h.sum()
    counts = np.concatenate(([0.0], np.cumsum(h)))
    nonzero = np.concatenate(([0.0], np.cumsum(h > 0)))
    h_log_h = np.concatenate(([0.0], np.cumsum(np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0))))

    # Group g of candidate i covers bins [ceil(g*i/qb), ceil((g+1)*i/qb)).
    groups = np.arange(quantized_bins + 1)
    edges = (groups[None, :] * candidates[:, None] + quantized_bins - 1) // quantized_bins
    group_sum = np.diff(np.take(counts, edges), axis=1)
    group_nonzero = np.diff(np.take(nonzero, edges), axis=1)

    kept = counts[candidates]
    tail = total - kept
    last = h[candidates - 1]
    # The clipped tail makes P's last bin non-empty even where the histogram bin is empty.
    group_nonzero[:, -1] += (last == 0) & (tail > 0)
    p_mass = group_sum.copy()
    p_mass[:, -1] += tail
    # A group with P mass but no histogram count gives Q = 0 there: a tiny floor turns that into a large
    # penalty instead of an infinite (or silently skipped) term.
    q = np.maximum(group_sum, 1e-12) / (np.maximum(group_nonzero, 1.0) * np.maximum(kept, 1.0)[:, None])
    cross = (p_mass * np.log(q)).sum(axis=1)  # q > 0 everywhere, so groups without P mass add exactly 0

    # sum p log p: bins below i-1 come straight from the histogram; bin i-1 holds last + tail.
    last_p = total - counts[candidates - 1]
    self_term = h_log_h[candidates - 1] + last_p * np.log(last_p)
    divergences = (self_term - cross) / total - math.log(total)
    return candidates, divergences


def kl_threshold_bins(hist: np.ndarray, quantized_bins: int = QUANTIZED_BINS) -> int:
    """Number of histogram bins below the KL-optimal threshold.

    Ties (within float noise) go to the widest candidate: with only a few distinct values, clipping them all
    onto one bin scores as well as keeping them, and keeping them is what the data needs."""
    if hist.size <= quantized_bins:
        return int(hist.size)  # everything fits in the quantized bins: no reason to clip
    candidates, divergences = kl_divergences(hist, quantized_bins)
    best = np.flatnonzero(divergences <= divergences.min() + 1e-9)
    return int(candidates[best[-1]])

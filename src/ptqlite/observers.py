"""Activation statistics gathered one sample at a time ([full_quant_param] activation_quant_method).

Every observer keeps a fixed-size summary (a few floats, or one 2048-bin histogram) and never the activations, so
memory does not grow with the number of samples. range() gives the float range to quantize; making it contain 0
and turning it into a scale and zero point is the caller's job. docs/calibration.md explains the methods.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from .config import ACTIVATION_METHODS

HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128
OUTLIER_QUANTILES = (0.0001, 0.9999)


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


class OutlierRemovalObserver:
    """REMOVAL_OUTLIER: each sample's 0.01% and 99.99% quantiles, averaged over samples."""

    def __init__(self) -> None:
        self.lo_sum = 0.0
        self.hi_sum = 0.0
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x, _, _ = _finite(x)
        if x.size:
            lo, hi = quantiles(x, OUTLIER_QUANTILES)
            self.lo_sum += lo
            self.hi_sum += hi
            self.count += 1

    def range(self) -> tuple[float, float]:
        if not self.count:
            return 0.0, 0.0
        return self.lo_sum / self.count, self.hi_sum / self.count


class KLObserver:
    """KL: entropy calibration on a histogram of |x|, symmetric threshold T, range [-T, T] clipped to what was
    seen.

    The histogram has 2048 bins of width 2**k, k the smallest integer with 2048 * 2**k > max|x| seen so far.
    When a larger |x| arrives, k grows and neighbouring bins merge exactly (old bin i -> new bin i >> shift):
    no first pass over the data, no approximation, and the final histogram depends only on the data, not on
    the order of the samples. The data then always fills more than half the bins (1024..2048 of them).
    Exact zeros are not counted (ReLU outputs would swamp bin 0).
    """

    def __init__(self, bins: int = HISTOGRAM_BINS, quantized_bins: int = QUANTIZED_BINS) -> None:
        self.bins = bins
        self.quantized_bins = quantized_bins
        self.hist = np.zeros(bins, np.int64)
        self.exponent: int | None = None  # bin width is 2**exponent
        self.lo = math.inf  # what was seen, to clip [-T, T] to
        self.hi = -math.inf

    @property
    def bin_width(self) -> float:
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    def update(self, x: np.ndarray) -> None:
        x, lo, hi = _finite(x)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        top = max(-lo, hi)
        if not x.size or top == 0.0:
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

    def _grow_to(self, top: float) -> None:
        # top / bins = mantissa * 2**needed with mantissa in [0.5, 1): 2**needed is the smallest power of two
        # strictly above top / bins, so even the largest value has a bin of its own (no clamping).
        needed = math.frexp(top / self.bins)[1]
        if self.exponent is None:
            self.exponent = needed
        elif needed > self.exponent:
            shift = needed - self.exponent
            merged = np.zeros(self.bins, np.int64)
            np.add.at(merged, np.arange(self.bins) >> shift, self.hist)
            self.hist = merged
            self.exponent = needed

    def threshold(self) -> float:
        """The clipping threshold T on |x| (0 when only zeros were seen)."""
        used = np.flatnonzero(self.hist)
        if not used.size:
            return 0.0
        return kl_threshold_bins(self.hist[: used[-1] + 1], self.quantized_bins) * self.bin_width

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:  # nothing seen
            return 0.0, 0.0
        lo, hi = self.lo, self.hi
        t = self.threshold()
        if t == 0.0:
            return lo, hi
        # Clipped to what was seen, so a ReLU output keeps lo = 0 instead of wasting half the codes.
        return max(-t, lo), min(t, hi)


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

"""Ways to get the order statistics of a debug-report row (min, Q1, median, Q3, max) on one tensor, timed against
the float32 sort the reports use (report._Flat.ordered). Each method is checked to give exactly the sorted
values at the ranks numpy's linear quantiles read, so only exact methods are timed.

    PYTHONPATH=src .venv/bin/python bench/report_order_stats.py [--size 401408] [--repeat 21]

Tensors: a ReLU6 output (N(0, 2) clipped to [0, 6], about half zeros), its per-tensor 8-bit dequantized copy
(256 levels), and N(0, 1) without ties. Best of --repeat, the methods taking turns.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

BINS = 2048


def ranks_of(n: int) -> list[int]:
    """The ranks numpy's linear Q1, median and Q3 interpolate between."""
    return sorted({r for q in (0.25, 0.5, 0.75) for r in (int((n - 1) * q), min(int((n - 1) * q) + 1, n - 1))})


def by_sort(values: np.ndarray, ranks: list[int], buffer: np.ndarray) -> list:
    np.copyto(buffer, values)
    buffer.sort()
    return [buffer[r] for r in ranks]


def by_partition(values: np.ndarray, ranks: list[int], buffer: np.ndarray) -> list:
    np.copyto(buffer, values)
    buffer.partition(ranks)
    return [buffer[r] for r in ranks]


def by_nonzero(values: np.ndarray, ranks: list[int], buffer: np.ndarray) -> list:
    """Zeros counted, negatives and positives gathered and sorted apart."""
    negative = np.sort(values[values < 0])
    positive = np.sort(values[values > 0])
    zeros = values.size - negative.size - positive.size
    out = []
    for r in ranks:
        if r < negative.size:
            out.append(negative[r])
        elif r < negative.size + zeros:
            out.append(values.dtype.type(0))
        else:
            out.append(positive[r - negative.size - zeros])
    return out


def by_buckets(values: np.ndarray, ranks: list[int], buffer: np.ndarray) -> list:
    """Values put in BINS buckets by a monotone map (x - min) * scale, truncated; only the buckets holding the
    ranks are gathered and sorted (or not, when the rank falls on the ties at the bucket's minimum)."""
    low, high = values.min(), values.max()
    if low == high:
        return [low] * len(ranks)
    np.subtract(values, low, out=buffer)
    np.multiply(buffer, values.dtype.type(BINS / (float(high) - float(low))), out=buffer)
    np.minimum(buffer, values.dtype.type(BINS - 1), out=buffer)
    buckets = buffer.astype(np.intp)
    ends = np.cumsum(np.bincount(buckets, minlength=BINS))
    out, gathered = [], {}
    for r in ranks:
        bucket = int(np.searchsorted(ends, r, "right"))
        start = int(ends[bucket - 1]) if bucket else 0
        if bucket not in gathered:
            gathered[bucket] = values[buckets == bucket]
        sub = gathered[bucket]
        sub_low = sub.min()
        if r - start < np.count_nonzero(sub == sub_low):  # ties at the bucket's low end (a ReLU's zeros): counted
            out.append(sub_low)
        else:
            out.append(np.sort(sub)[r - start])
    return out


SAMPLE = 1 << 14
MARGIN = 5.0  # standard errors of a sample quantile each side of a rank


def by_sample_brackets(values: np.ndarray, ranks: list[int], buffer: np.ndarray) -> list:
    """A strided sample of SAMPLE values, sorted, gives each quartile's two ranks a bracket [low, high] (MARGIN
    standard errors each side); one mask takes out the values strictly above low and up to high for all brackets,
    which are sorted, and the values at or below each low are counted (a ReLU's zeros are counted, not taken out).
    A bracket the counts show to have missed its rank falls back to the sort."""
    n = values.size
    sample = np.sort(values[::max(n // SAMPLE, 1)])
    m = sample.size
    groups = [ranks[i:i + 2] for i in range(0, len(ranks), 2)]
    bounds = []
    for group in groups:
        p0, p1 = group[0] / (n - 1), group[-1] / (n - 1)
        low = max(math.floor(p0 * (m - 1) - MARGIN * math.sqrt(m * p0 * (1 - p0)) - 2), 0)
        high = min(math.ceil(p1 * (m - 1) + MARGIN * math.sqrt(m * p1 * (1 - p1)) + 2), m - 1)
        bounds.append((sample[low], sample[high]))
    inside = np.zeros(n, np.bool_)
    for low, high in bounds:
        inside |= (values > low) & (values <= high)
    taken = np.sort(values[inside])
    out = []
    for group, (low, high) in zip(groups, bounds):
        through = np.count_nonzero(values <= low)
        below = np.count_nonzero(values < low)
        start = int(np.searchsorted(taken, low, "right"))
        for r in group:
            k = start + r - through
            if below <= r < through:
                out.append(low)
            elif r >= through and k < taken.size and taken[k] <= high:
                out.append(taken[k])
            else:  # the sample misled this bracket
                return by_sort(values, ranks, buffer)
    return out


METHODS = {"float32 sort (used)": by_sort, "np.partition at the ranks": by_partition,
           "zeros counted, rest sorted": by_nonzero, "2048 buckets, hit ones sorted": by_buckets,
           "sample-bracketed selection": by_sample_brackets}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=401408)  # 112 x 112 x 32, an early MobileNet V2 activation
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    relu6 = np.clip(rng.standard_normal(args.size).astype(np.float32) * 2, 0, 6)
    step = np.float32(6 / 255)
    tensors = {"ReLU6 output": relu6, "its 8-bit dequant": (np.round(relu6 / step) * step).astype(np.float32),
               "N(0, 1)": rng.standard_normal(args.size).astype(np.float32)}
    buffer = np.empty(args.size, np.float32)
    ranks = ranks_of(args.size)
    for name, values in tensors.items():
        expected = [float(v) for v in np.sort(values)[ranks]]
        best = dict.fromkeys(METHODS, float("inf"))
        for _ in range(args.repeat):
            for method, function in METHODS.items():
                start = time.perf_counter()
                got = function(values, ranks, buffer)
                best[method] = min(best[method], time.perf_counter() - start)
                assert [float(v) for v in got] == expected, (method, name)
        base = best["float32 sort (used)"]
        print(f"{name}, {args.size} values: " + "; ".join(
            f"{method} {t * 1e3:.2f} ms ({t / base:.2f}x)" for method, t in best.items()))


if __name__ == "__main__":
    main()

"""Block-wise weight quantization: one scale and zero point per block of `block` consecutive elements along a
weight's input axis (and per output channel), as DequantizeLinear's `block_size` stores them (pure numpy, no loops
over elements).

Each block's scale is searched rather than taken from its minimum and maximum: for every clipping factor of
CLIP_GRID the block is quantized and the least-squares scale of those codes taken (zero point fixed), the factor
whose refitted error is least is kept per block, and a Lloyd step (codes, then their least-squares scale) follows.
At 4 bits round-to-nearest of the full range spends most of the 16 levels on a few outliers; clipping them trades
a large error on one element for a smaller error on all the others. The result is never worse than round to
nearest, block by block (both are measured exactly and the better kept).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .qmath import qrange, round_half_away


@dataclass(frozen=True)
class BlockQuant:
    """Signed codes in the weight's shape; scale and zero point in the weight's shape with the block axis
    shortened to ceil(length / block), the layout of DequantizeLinear's block-wise parameters."""

    codes: np.ndarray  # int8 (int16 above 8 bits), in qrange(bits)
    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int64
    axis: int
    block: int
    bits: int
    squared_error: float  # sum over the tensor of (dequantized - w)^2
    squared_norm: float  # sum over the tensor of w^2 (float64, by chunk)

    def expand(self, params: np.ndarray) -> np.ndarray:
        """Per-block parameters repeated to the weight's shape."""
        length = self.codes.shape[self.axis]
        return np.repeat(params, self.block, axis=self.axis).take(np.arange(length), axis=self.axis)

    def dequantized(self) -> np.ndarray:
        """float32 (q - zero_point) * scale, what DequantizeLinear computes."""
        return (self.codes - self.expand(self.zero_point)).astype(np.float32) * self.expand(self.scale)


def quantize_blocks(w: np.ndarray, bits: int, axis: int, block: int, search: bool = True,
                    release: Callable[[int, int], None] | None = None,
                    scale_grid: Callable[[np.ndarray], np.ndarray] | None = None,
                    importance: np.ndarray | None = None) -> BlockQuant:
    """Asymmetric block-wise quantization of `w` along `axis` (0 always representable, as the per-channel scheme).

    The weight is viewed as [before, length, after] (no transposed copy): blocks are slices [block, after] of it,
    reduced over their middle axis, and processed in chunks small enough for the CPU caches, since the search
    passes over each chunk a few dozen times. `release(start, stop)` is told each range of `w`'s flat elements
    that is no longer read (a streaming conversion drops its memory-mapped pages). `scale_grid` rounds the scales to
    the values the file will store: the codes and errors are those of the stored scale. `importance` (length
    w.shape[axis], non-negative; e.g. the mean square of the input channel each weight row multiplies, from
    calibration data) weights the error the search minimises: sum(importance * (w - dequantized)^2), the diagonal
    of the layer's output error; squared_error stays the plain error."""
    qmin, qmax = qrange(bits)
    axis %= w.ndim
    shape = w.shape
    before, length = int(np.prod(shape[:axis])), shape[axis]
    after = int(np.prod(shape[axis + 1:]))
    blocks = -(-length // block)
    x = np.asarray(w, np.float32).reshape(before, length, after)
    padded = blocks * block != length
    if padded:  # zeros are coded exactly (0 is always in range): padding adds no error
        x = np.concatenate([x, np.zeros((before, blocks * block - length, after), np.float32)], axis=1)
        if release is not None:
            release(0, w.size)
    if importance is not None:  # per element along the block axis, padded with zeros as x is
        weights = np.zeros(blocks * block, np.float32)
        weights[:length] = np.asarray(importance, np.float32).reshape(length)
        weights = weights.reshape(blocks, block)
    # blocks along the last axis: [n, block] (numpy reduces a contiguous last axis fastest), else [n, block, after]
    x = x.reshape(before * blocks, block) if after == 1 else x.reshape(before * blocks, block, after)
    scale = np.empty((x.shape[0], 1, after)[:x.ndim], np.float32)
    zero = np.empty_like(scale)
    codes = np.empty(x.shape, np.int8 if bits <= 8 else np.int16)
    # rows of blocks per chunk: _CHUNK values, but at least one chunk per thread where the weight has the rows
    step = max(1, min(_CHUNK // (block * after), -(-x.shape[0] // _THREADS)))
    width = _tile_width(after, block)

    def tile(rows: slice, cols: slice) -> float:
        part = x[rows] if x.ndim == 2 else x[rows, :, cols]
        if x.ndim == 2:  # blocks [m, block] searched as [1, block, m]: reductions over a contiguous last axis of
            part = np.ascontiguousarray(part.T)[None]  # length `block` are several times slower than across rows
        h = None
        if importance is not None:  # row r of x is block r % blocks of its channel
            h = weights[np.arange(rows.start, min(rows.stop, x.shape[0])) % blocks]
            h = h.T[None] if x.ndim == 2 else h[:, :, None]
        c, s, z, e = _search(part, qmin, qmax, search, scale_grid, h)
        if x.ndim == 2:
            c, s, z = c[0].T, s[0].T, z[0].T
            scale[rows], zero[rows], codes[rows] = s, z, c
        else:
            scale[rows, :, cols], zero[rows, :, cols], codes[rows, :, cols] = s, z, c
        return float(e.sum(dtype=np.float64)), float(_block_dot(part, part).sum(dtype=np.float64))

    def chunk(start: int) -> tuple[float, float]:
        rows = slice(start, start + step)
        sums = [tile(rows, slice(col, col + width)) for col in range(0, after, width)]
        if release is not None and not padded and x.base is not None:
            release(start * block * after, min(x.shape[0], start + step) * block * after)
        return sum(e for e, _ in sums), sum(n for _, n in sums)

    starts = range(0, x.shape[0], step)
    # Chunks are independent and numpy releases the GIL in its loops: the CPU's cores share them. The sums are
    # added in chunk order, so the result does not depend on the number of threads.
    workers = min(_THREADS, len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            sums = list(pool.map(chunk, starts))
    else:
        sums = [chunk(start) for start in starts]
    total = norm = 0.0
    for error, squares in sums:
        total += error
        norm += squares
    codes = codes.reshape(before, blocks * block, after)[:, :length].reshape(shape)
    params = (*shape[:axis], blocks, *shape[axis + 1:])
    return BlockQuant(codes, scale.reshape(params), zero.reshape(params).astype(np.int64), axis, block, bits, total,
                      norm)


# values per chunk (2 MiB of float32): a tile costs about 150 numpy calls whatever its size, which at 128K values
# cost more than the larger tile's cache misses (2048 x 2048 at block 32: 0.8x the CPU time of 128K-value tiles)
_CHUNK = 1 << 19
_THREADS = min(8, os.cpu_count() or 1)


def _tile_width(after: int, block: int) -> int:
    """Columns of one tile of a [blocks, block, after] view. A whole row of blocks up to twice _CHUNK is one tile:
    it is contiguous, and numpy's passes over a strided tile (plus a narrow remainder tile) cost more than the
    larger tile's cache misses (a 2048 x 5632 weight at block 32: 0.7x the CPU time of tiles of 4096 columns);
    wider rows are cut into equal tiles of at most _CHUNK values. Every block is searched alone: the tiling changed
    no code, scale or zero point on the shapes measured (tests/test_blockwise_tiles.py); the reported error sum may
    differ in its last bits (einsum's order of adding a block's products can follow the tile's shape)."""
    if after * block <= 2 * _CHUNK:
        return after
    return -(-after // -(-after * block // _CHUNK))


def float16_grid(scale: np.ndarray) -> np.ndarray:
    """Scales rounded to the nearest float16 (as float32), kept within float16's positive range: a scale stored as
    float16 is exactly what the search measured. Callers check for the top of the range (FLOAT16_MAX): such a
    weight needs float32 scales."""
    # maximum and minimum are clip's values here (no NaN scale) without its Python wrapper: a call per tile
    clipped = np.minimum(np.maximum(scale, FLOAT16_TINY), FLOAT16_MAX)
    if clipped.dtype != np.float32 or (clipped.size and clipped.min() < _FLOAT16_NORMAL):
        # float16's subnormals (and other float types): numpy's conversion
        return clipped.astype(np.float16).astype(np.float32)
    # In float16's normal range the nearest float16 (ties to even) is the float32 with its 13 low mantissa bits
    # rounded off, ties to even, carrying into the exponent: the same values as numpy's float16 conversion (every
    # float32 of [2^-14, 65504] checked), several times faster (numpy converts one value at a time).
    bits = clipped.view(np.uint32)
    rounded = bits >> np.uint32(13)
    rounded &= np.uint32(1)
    rounded += bits
    rounded += np.uint32(0x0FFF)
    rounded &= np.uint32(0xFFFFE000)
    return rounded.view(np.float32)


FLOAT16_TINY, FLOAT16_MAX = np.float32(2.0 ** -24), np.float32(65504.0)
_FLOAT16_NORMAL = np.float32(2.0 ** -14)


def _search(x: np.ndarray, qmin: int, qmax: int, search: bool,
            grid: Callable[[np.ndarray], np.ndarray] | None = None, h: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per block (x[i, :, j]): codes (float32, in [qmin, qmax]), scale, zero point and squared error.

    The block is measured in units of its round-to-nearest scale s1 (y = x / s1): the zero point is the same for
    every clipping factor f (clipping lo and hi by f scales the span by f), so a candidate is only the scale g (in
    units of s1) and codes q = clip(rint(y / g), qmin - z, qmax - z). For each factor the codes are made once and
    their least-squares scale g = sum(y q) / sum(q^2) taken, whose error is sum(y^2) - sum(y q)^2 / sum(q^2): the
    best factor is kept by that figure, without a pass that measures the error. Lloyd steps follow (codes for
    the scale, least-squares scale for the codes): each lowers the error or keeps it. The codes and the error of
    the result are then measured exactly, and round to nearest is kept where it is as good (never worse).
    With element weights h (broadcast to x) every sum is weighted: the error minimised, and compared with round to
    nearest's, is sum(h (x - dequantized)^2); the error returned is the plain one."""
    lo = np.minimum(x.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(x.max(axis=1, keepdims=True), 0.0)
    span = hi - lo
    s1 = np.where(span > 0, span / np.float32(qmax - qmin), np.float32(1.0)).astype(np.float32)
    if grid is not None:  # the zero point is chosen for the stored scale
        s1 = grid(s1)
    z = np.clip(round_half_away(qmin - lo / s1), qmin, qmax).astype(np.float32)
    a, b = qmin - z, qmax - z  # the code range around the zero point
    y = x * (np.float32(1.0) / s1)
    rtn = np.rint(y)
    np.maximum(rtn, a, out=rtn)
    np.minimum(rtn, b, out=rtn)
    rtn_e = _error(x, rtn, s1, h=h)
    if not search:
        e = rtn_e if h is None else _error(x, rtn, s1)
        rtn += z
        return rtn, s1, z, e
    q, p = np.empty_like(y), np.empty_like(y)  # scratch for the candidates' codes and the errors
    best_g = best_gain = None
    for factor in CLIP_GRID:
        f = np.float32(factor)
        g, gain = _least_squares(*_moments(y, rtn if factor == 1.0 else _codes(y, f, a, b, q), h), f)
        if best_gain is None:
            best_g, best_gain = g, gain
        else:  # the first factor of the largest gain (the least error) per block
            np.copyto(best_g, g, where=gain > best_gain)
            np.maximum(best_gain, gain, out=best_gain)
    for _ in range(_LLOYD_STEPS):
        best_g, _ = _least_squares(*_moments(y, _codes(y, best_g, a, b, q), h), best_g)
    s = best_g * s1
    if grid is not None:
        s = grid(s)
    codes = _codes(x, s, a, b, q)  # the codes of the stored scale
    e = _error(x, codes, s, p, h)
    take = e < rtn_e
    # rtn where round to nearest is kept, as arithmetic on the integer-valued codes (exact): a copy masked by a
    # per-block condition broadcast over the block costs ten passes over the tile
    codes -= rtn
    codes *= take.astype(np.float32)
    codes += rtn
    s = np.where(take, s, s1)
    e = np.where(take, e, rtn_e) if h is None else _error(x, codes, s, p)  # the plain error of the result
    codes += z
    return codes, s, z, e


# Fractions of the block's range tried (1.0: plain min/max round-to-nearest); a finer or wider grid gained less
# than 0.1% of relative error on Gaussian and t(4) weights at 4 bits, block 32, and costs time per weight.
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_LLOYD_STEPS = 1
_LEAST = np.finfo(np.float32).smallest_subnormal


def _codes(y: np.ndarray, g, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """clip(rint(y / g), a, b) into `out` (numpy's clip with array bounds is several times slower than this)."""
    np.multiply(y, np.float32(1.0) / g, out=out)
    np.rint(out, out=out)
    np.maximum(out, a, out=out)
    return np.minimum(out, b, out=out)


def _moments(y: np.ndarray, q: np.ndarray, h: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per block sum(h y q) and sum(h q^2) (h = 1 when None)."""
    hq = q if h is None else h * q
    return _block_dot(y, hq), _block_dot(q, hq)


def _least_squares(num: np.ndarray, den: np.ndarray, g) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares scale of codes with moments (num, den) (blocks without a non-zero code, or whose fitted
    scale is not positive, keep g), and its gain num * scale: the block's sum(y^2) less its error, so the largest
    gain is the least error. num and den are overwritten.

    den is a sum of squared (weighted) codes: 0 only where every code (or its weight) is 0, and then num is 0 too;
    raised to the least positive float32 it is unchanged wherever it is positive and makes the quotient 0 (not
    positive: g kept) where it is not. These per-block arrays are made a dozen times per tile, and their calls cost
    more than their arithmetic: few calls, no copies."""
    fitted = np.divide(num, np.maximum(den, _LEAST, out=den), out=den)
    fitted = np.where(fitted > 0, fitted, g)
    num *= fitted
    return fitted, num


def _block_dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per block sum(u v) over axis 1, kept."""
    if u.ndim == 3:  # einsum multiplies and adds in one pass
        return np.einsum("ijk,ijk->ik", u, v)[:, None, :]
    return np.einsum("ij,ij->i", u, v)[:, None]


def _error(x: np.ndarray, centred: np.ndarray, scale: np.ndarray, scratch: np.ndarray | None = None,
           h: np.ndarray | None = None) -> np.ndarray:
    """Per block, the squared error of the codes (zero point taken off) at `scale` against x (weighted by h)."""
    d = np.multiply(centred, scale, out=scratch)
    d -= x
    return _block_dot(d, d if h is None else d * h)

"""Block-wise weight quantization: one scale and zero point per block of `block` consecutive elements along a
weight's input axis (and per output channel), as DequantizeLinear's `block_size` stores them (pure numpy, no loops
over elements).

Each block's range is searched rather than taken from its minimum and maximum: for every clipping factor of
CLIP_GRID the block is quantized and its squared error measured, the best factor is kept per block, and the scale is
then refitted by least squares to the codes it chose (zero point fixed), kept where that lowers the error. At 4 bits
round-to-nearest of the full range spends most of the 16 levels on a few outliers; clipping them trades a large
error on one element for a smaller error on all the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .qmath import qrange, round_half_away

# Fractions of the block's range tried (1.0: plain min/max round-to-nearest); a finer or wider grid gained less
# than 0.1% of relative error on Gaussian and t(4) weights at 4 bits, block 32, and costs time per weight.
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_REFITS = 2


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
                    scale_grid: Callable[[np.ndarray], np.ndarray] | None = None) -> BlockQuant:
    """Asymmetric block-wise quantization of `w` along `axis` (0 always representable, as the per-channel scheme).

    The weight is viewed as [before, length, after] (no transposed copy): blocks are slices [block, after] of it,
    reduced over their middle axis, and processed in chunks small enough for the CPU caches, since the search
    passes over each chunk a few dozen times. `release(start, stop)` is told each range of `w`'s flat elements
    that is no longer read (a streaming conversion drops its memory-mapped pages). `scale_grid` rounds every
    scale the search tries to the values the file will store (float16_grid), so the codes are chosen for the
    stored scale."""
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
    # blocks along the last axis: [n, block] (numpy reduces a contiguous last axis fastest), else [n, block, after]
    x = x.reshape(before * blocks, block) if after == 1 else x.reshape(before * blocks, block, after)
    scale = np.empty((x.shape[0], 1, after)[:x.ndim], np.float32)
    zero = np.empty_like(scale)
    codes = np.empty(x.shape, np.int8 if bits <= 8 else np.int16)
    step = max(1, _CHUNK // (block * after))

    def chunk(start: int) -> tuple[float, float]:
        part = slice(start, start + step)
        s, z, e = _search(x[part], qmin, qmax, search, scale_grid)
        scale[part], zero[part] = s, z
        codes[part] = _quantized(x[part], s, z, qmin, qmax)
        sums = float(e.sum(dtype=np.float64)), float(np.square(x[part], dtype=np.float64).sum())
        if release is not None and not padded and x.base is not None:
            release(start * block * after, min(x.shape[0], start + step) * block * after)
        return sums

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


_CHUNK = 1 << 17  # values per chunk (512 KiB of float32)
_THREADS = min(8, os.cpu_count() or 1)


def float16_grid(scale: np.ndarray) -> np.ndarray:
    """Scales rounded to the nearest float16 (as float32), kept within float16's positive range: a scale stored as
    float16 is exactly what the search measured. Callers check for the top of the range (FLOAT16_MAX): such a
    weight needs float32 scales."""
    return np.clip(scale, FLOAT16_TINY, FLOAT16_MAX).astype(np.float16).astype(np.float32)


FLOAT16_TINY, FLOAT16_MAX = np.float32(2.0 ** -24), np.float32(65504.0)


def _search(x: np.ndarray, qmin: int, qmax: int, search: bool,
            grid: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block (x[i, :, j]): scale, zero point and squared error. The clipping factor of CLIP_GRID with the least squared error, then least-squares
    refits of the scale to the codes it gives (zero point fixed), each kept only where it lowers the error."""
    lo = np.minimum(x.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(x.max(axis=1, keepdims=True), 0.0)
    best_s, best_z, best_e = None, None, None
    for factor in CLIP_GRID if search else (1.0,):
        s, z = _params(lo * np.float32(factor), hi * np.float32(factor), qmin, qmax, grid)
        e = _error(x, s, z, qmin, qmax)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
            continue
        take = e < best_e
        best_s, best_z, best_e = np.where(take, s, best_s), np.where(take, z, best_z), np.minimum(e, best_e)
    for _ in range(_REFITS if search else 0):
        centred = _quantized(x, best_s, best_z, qmin, qmax)
        centred -= best_z
        num, den = (x * centred).sum(axis=1, keepdims=True), np.square(centred).sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            fitted = np.where(den > 0, num / den, best_s).astype(np.float32)
        fitted = np.where(fitted > 0, fitted, best_s)
        if grid is not None:
            fitted = grid(fitted)
        e = _error(x, fitted, best_z, qmin, qmax)
        take = e < best_e
        best_s, best_e = np.where(take, fitted, best_s), np.minimum(e, best_e)
    return best_s, best_z, best_e


def _params(lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int,
            grid: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    span = hi - lo
    scale = np.where(span > 0, span / np.float32(qmax - qmin), np.float32(1.0)).astype(np.float32)
    if grid is not None:  # the zero point is chosen for the stored scale
        scale = grid(scale)
    zero = np.clip(round_half_away(qmin - lo / scale), qmin, qmax).astype(np.float32)
    return scale, zero


def _quantized(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Codes as float32, rounded half away from zero and clamped (in place on one temporary)."""
    q = x / scale
    sign = np.copysign(np.float32(0.5), q)
    q += sign
    np.trunc(q, out=q)
    q += zero
    return np.clip(q, qmin, qmax, out=q)


def _error(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Per block, the squared error of quantizing x with scale and zero."""
    d = _quantized(x, scale, zero, qmin, qmax)
    d -= zero
    d *= scale
    d -= x
    np.square(d, out=d)
    return d.sum(axis=1, keepdims=True)

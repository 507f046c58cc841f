"""Quantization arithmetic and bit packing, pure numpy (no loops over elements)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """Full integer range of a `bits`-wide integer."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (the reference's std::round), unlike numpy's ties-to-even.

    trunc(x + copysign(0.5, x)) equals sign(x) * floor(|x| + 0.5) value for value (the addition rounds the same
    magnitude either way) with one temporary instead of four: this runs on whole weights many times per layer."""
    x = np.asarray(x)
    if x.ndim == 0:
        return np.sign(x) * np.floor(np.abs(x) + 0.5)
    out = np.copysign(0.5, x)
    out += x
    return np.trunc(out, out=out)


def reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    """Axes to reduce over so that one value remains per slice along `axis` (None: one value in all)."""
    if axis is None:
        return tuple(range(ndim))
    axis %= ndim
    return tuple(a for a in range(ndim) if a != axis)


def channel_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """Broadcast shape of per-channel parameters along `axis` (all ones for per-tensor)."""
    out = [1] * len(shape)
    if axis is not None:
        out[axis % len(shape)] = shape[axis % len(shape)]
    return tuple(out)


@dataclass(frozen=True)
class QParams:
    """scale and zero_point broadcastable against the tensor they quantize."""

    scale: np.ndarray  # float64
    zero_point: np.ndarray  # int64
    qmin: int
    qmax: int

    @property
    def bits(self) -> int:
        return int(np.log2(self.qmax - self.qmin + 1))


def asymmetric_params(x: np.ndarray, bits: int, axis: int | None, signed: bool = True) -> QParams:
    """Asymmetric full-range parameters; the range always holds 0 and 0 is exactly representable."""
    axes = reduce_axes(x.ndim, axis)
    return asymmetric_params_of_range(x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True), bits, signed)


def asymmetric_params_of_range(low: np.ndarray, high: np.ndarray, bits: int, signed: bool = True) -> QParams:
    """asymmetric_params from the per-channel minimum and maximum (a weight reduced a block at a time)."""
    qmin, qmax = qrange(bits, signed)
    lo = np.minimum(np.asarray(low).astype(np.float64), 0.0)
    hi = np.maximum(np.asarray(high).astype(np.float64), 0.0)
    span = hi - lo
    scale = np.where(span > 0, span / (qmax - qmin), 1.0)
    zero_point = np.clip(round_half_away(qmin - lo / scale), qmin, qmax).astype(np.int64)
    return QParams(scale, zero_point, qmin, qmax)


def symmetric_params(x: np.ndarray, bits: int, axis: int | None, narrow: bool = True) -> QParams:
    """Symmetric parameters, zero point 0; `narrow` uses [-(2^(b-1)-1), 2^(b-1)-1] as TensorRT and the
    int8 kernels of ONNX Runtime expect."""
    qmin, qmax = qrange(bits, True)
    if narrow:
        qmin = -qmax
    axes = reduce_axes(x.ndim, axis)
    amax = np.abs(x).max(axis=axes, keepdims=True).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return QParams(scale, np.zeros_like(scale, dtype=np.int64), qmin, qmax)


def quantize(x: np.ndarray, params: QParams) -> np.ndarray:
    """Float -> integer codes (int64), clamped to the integer range."""
    q = round_half_away(x.astype(np.float64) / params.scale) + params.zero_point
    return np.clip(q, params.qmin, params.qmax).astype(np.int64)


def dequantize(q: np.ndarray, params: QParams) -> np.ndarray:
    return ((q - params.zero_point) * params.scale).astype(np.float32)


ROW_CHUNK = 1 << 20  # values quantized at a time by quantize_rows


def quantize_rows(x: np.ndarray, params: QParams, dtype: type) -> tuple[np.ndarray, float]:
    """quantize(x, params) as `dtype` codes (which must hold [qmin, qmax]) and relative_error of x against its
    dequantized codes, computed ROW_CHUNK values of rows at a time: a large table (an embedding's 11.7M values)
    would otherwise have five whole float64/int64 temporaries alive at once. The codes are the same values; the
    error is summed chunk by chunk (equal to relative_error's up to float64 rounding)."""
    out = np.empty(x.shape, dtype)
    if x.ndim == 0 or x.size == 0:
        out[...] = quantize(x, params)
        return out, relative_error(x, dequantize(out, params))
    rows = max(1, ROW_CHUNK // max(1, x.size // x.shape[0]))
    per_row = params.scale.ndim == x.ndim and params.scale.shape[0] == x.shape[0] > 1
    denom = err = 0.0
    for start in range(0, x.shape[0], rows):
        part = slice(start, start + rows)
        chunk = QParams(params.scale[part] if per_row else params.scale,
                        params.zero_point[part] if per_row and params.zero_point.ndim == x.ndim
                        else params.zero_point, params.qmin, params.qmax)
        out[part] = quantize(x[part], chunk)
        work = x[part].astype(np.float64)
        denom += float(np.sum(np.square(work, out=work)))
        work[...] = x[part]
        work -= dequantize(out[part], chunk)
        err += float(np.sum(np.square(work, out=work)))
    return out, float(np.sqrt(err / denom)) if denom > 0 else float(err > 0)


# ---------------------------------------------------------------- bit packing
# Codes are unsigned integers < 2^bits written MSB first into one contiguous bit stream, ceil(n*bits/8) bytes.
# The ONNX decoder in encoding.py reads exactly this layout.


PACK_CHUNK = 1 << 20  # codes packed at a time (a multiple of 8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (each < 2^bits) into a uint8 bit stream."""
    codes = np.asarray(codes).ravel()
    if codes.size and (int(codes.max()) >> bits or int(codes.min()) < 0):
        raise ValueError(f"a code does not fit in {bits} bits")
    if bits <= 16:
        # the codes' bytes, big-endian, unpacked to bits (MSB first): the last `bits` of each row are the code's.
        # PACK_CHUNK codes at a time (a multiple of 8, so each chunk ends on a byte): the same bytes, with the
        # unpacked bits (8-16 bytes a code) of one chunk at a time.
        width = 8 if bits <= 8 else 16
        parts = []
        for start in range(0, max(codes.size, 1), PACK_CHUNK):
            part = codes[start:start + PACK_CHUNK]
            as_bytes = part.astype(np.uint8 if width == 8 else ">u2").view(np.uint8).reshape(-1, width // 8)
            parts.append(np.packbits(np.unpackbits(as_bytes, axis=1)[:, width - bits:]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    codes = codes.astype(np.uint32)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    stream = ((codes[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    return np.packbits(stream)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: the first `count` codes as int64."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8))[: count * bits]
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return stream.reshape(count, bits).astype(np.int64) @ weights


def code_groups(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one whole group of `bits`-bit codes (1..8): 4 codes of 6 bits in 3 bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"code groups hold 1..8 bit codes, not {bits}")
    span = math.lcm(bits, 8)
    return span // bits, span // 8


def group_layout(bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per code of a group: the byte its lowest bit is in, the byte after it (the same byte for the group's last
    byte) and the bit its lowest bit is at. A code of at most 8 bits spans at most two bytes, so it is
    (group[lo] | group[hi] << 8) >> shift, masked to `bits` (what pack_code_groups writes and the graph reads)."""
    count, size = code_groups(bits)
    starts = np.arange(count) * bits
    lo = starts // 8
    return lo, np.minimum(lo + 1, size - 1), starts % 8


def pack_code_groups(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [rows, width] (each < 2^bits, bits 1..8) packed along each row by groups of
    code_groups(bits) codes in as many whole bytes (4 codes of 6 bits in 3 bytes), planar: a row padded with zero
    codes to `count` parts of `groups` codes; group g holds code g of each part, the first part's lowest, its
    bits filling the group's bytes from the lowest bit up (6 bits: c0 | c1 << 6 | c2 << 12 | c3 << 18), and byte
    j of every group is stored together: the row is [byte 0 of each group, byte 1 of each group, ...]. So the
    graph unpacks a row with whole planes of `groups` values (no per-code gather) and the codes come out in
    order. uint8 [rows, groups * bytes]."""
    codes = np.asarray(codes)
    rows, width = codes.shape
    if codes.size and (int(codes.max()) >> bits or int(codes.min()) < 0):
        raise ValueError(f"a code does not fit in {bits} bits")
    count, size = code_groups(bits)
    groups = -(-width // count)
    lo, hi, shift = group_layout(bits)
    out = np.zeros((rows, size, groups), np.uint8)
    step = max(1, PACK_CHUNK // max(width, 1))  # rows at a time: the uint16 temporaries stay small
    for start in range(0, rows, step):
        part = np.zeros((min(step, rows - start), count * groups), np.uint16)
        part[:, :width] = codes[start:start + step]
        part = part.reshape(part.shape[0], count, groups)
        target = out[start:start + step]
        for k in range(count):
            word = part[:, k] << np.uint16(shift[k])  # at most 15 bits: the code's two bytes
            target[:, lo[k]] |= (word & np.uint16(0xFF)).astype(np.uint8)
            if shift[k] + bits > 8:
                target[:, hi[k]] |= (word >> np.uint16(8)).astype(np.uint8)
    return out.reshape(rows, size * groups)


def unpack_code_groups(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Inverse of pack_code_groups: the codes [rows, width] as int64."""
    size = code_groups(bits)[1]
    packed = np.asarray(packed, np.uint8)
    planes = packed.reshape(packed.shape[0], size, -1).astype(np.int64)
    lo, hi, shift = group_layout(bits)
    codes = ((planes[:, lo] | (planes[:, hi] << 8)) >> shift[:, None]) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :width]


def bits_for(count: int) -> int:
    """Bits needed to index `count` distinct values (at least 1)."""
    return max(1, int(np.ceil(np.log2(max(count, 2)))))


# ---------------------------------------------------------------- x86 int8 kernels without VNNI
# The rows come from plan.gemm_rows: each weight as [output channel, K] in the kernel's summation order.


def int16_pair_limit(rows: np.ndarray) -> np.ndarray:
    """Per row, the largest |w_a + w_b| over the weights the x86 kernels multiply in one pair.

    Without VNNI, MLAS multiplies u8 activations by s8 weights with VPMADDUBSW, which adds the products of
    neighbouring K positions (2i, 2i+1) in int16 with saturation: with activation codes up to 255, a pair of
    same-sign weight codes must sum to at most 128 (255 * 128 = 32640). Opposite signs never overflow. With an
    odd K the pairs of a Conv may straddle kernel taps, so any two weights of a row count as a pair."""
    if rows.shape[1] % 2 == 0:
        return np.abs(rows.reshape(rows.shape[0], -1, 2).sum(axis=2)).max(axis=1)
    if rows.shape[1] < 2:
        return np.abs(rows).max(axis=1)
    top = np.sort(np.maximum(rows, 0), axis=1)[:, -2:].sum(axis=1)
    bottom = np.sort(np.maximum(-rows, 0), axis=1)[:, -2:].sum(axis=1)
    return np.maximum(top, bottom)


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """||w - w_hat|| / ||w|| in float64 (1.0 for an all-zero w that w_hat does not match, else 0.0)."""
    # one float64 temporary, reused: the same values as sum(w64 ** 2) and sum((w64 - w_hat) ** 2)
    work = w.astype(np.float64)
    denom = float(np.sum(np.square(work, out=work)))
    work[...] = w
    work -= w_hat
    err = float(np.sum(np.square(work, out=work)))
    del work
    return float(np.sqrt(err / denom)) if denom > 0 else float(err > 0)


def relative_error_by_ranges(w: np.ndarray, w_hat: Callable[[int, int], np.ndarray], leaf: int = 1 << 20,
                             release: Callable[[int, int], None] | None = None) -> float:
    """relative_error(w, w_hat) without w_hat whole: `w_hat(start, stop)` gives its flat elements [start, stop).

    numpy sums a contiguous float64 array pairwise (pairwise_sum: above 128 values, the first half cut at a
    multiple of 8, each half summed alike), so the sums of the halves cut at the same points, down to ranges of
    at most `leaf` values each summed by numpy, are the same float64 values bit for bit. `release(start, stop)`
    is told each range once read (a mapped weight's pages)."""
    flat = w.reshape(-1)
    # a module function, not a closure: a closure calling itself is a reference cycle that would keep the caller's
    # arrays (its w_hat's codes) until the garbage collector runs
    denom, err = _pairwise_sums(flat, w_hat, 0, flat.size, max(leaf, 128), release)
    return float(np.sqrt(err / denom)) if denom > 0 else float(err > 0)


def _pairwise_sums(flat: np.ndarray, w_hat: Callable[[int, int], np.ndarray], start: int, stop: int, leaf: int,
                   release: Callable[[int, int], None] | None) -> tuple[float, float]:
    """(sum of w^2, sum of (w - w_hat)^2) over flat elements [start, stop), cut as numpy's pairwise sum cuts."""
    count = stop - start
    if count > leaf:
        half = count // 2
        half -= half % 8
        d1, e1 = _pairwise_sums(flat, w_hat, start, start + half, leaf, release)
        d2, e2 = _pairwise_sums(flat, w_hat, start + half, stop, leaf, release)
        return d1 + d2, e1 + e2
    decoded = w_hat(start, stop)  # before the float64 work array, as relative_error's callers made it
    work = flat[start:stop].astype(np.float64)
    denom = np.sum(np.square(work, out=work))
    work[...] = flat[start:stop]
    work -= decoded
    del decoded
    err = np.sum(np.square(work, out=work))
    if release is not None:
        release(start, stop)
    return denom, err


def pack_int4(values: np.ndarray) -> bytes:
    """Signed or unsigned 4-bit values (each in [-8, 15]) as ONNX int4/uint4 raw data: two per byte, the first
    element in the low nibble, an odd count padded with a zero nibble."""
    return pack_int4_array(values).tobytes()


def pack_int4_array(values: np.ndarray) -> np.ndarray:
    """pack_int4's bytes as a uint8 array (a streaming conversion writes it to the data file as it is)."""
    flat = np.asarray(values).ravel()
    packed = np.empty((flat.size + 1) // 2, np.uint8)
    # values at a time (even): the temporaries stay in the CPU's cache (and in the heap, not fresh pages)
    step = 1 << 18
    for start in range(0, flat.size, step):
        part = flat[start:start + step]
        # the low 4 bits of the two's complement (int8 codes are viewed as bytes, not widened)
        nibbles = part.view(np.uint8) if part.dtype in (np.int8, np.uint8) else (
            part.astype(np.int16) & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        # two bytes read as one little-endian 16-bit word: the low nibble of each byte kept, the high byte's moved
        # down next to the low byte's; the word's low byte is the packed pair
        word = np.ascontiguousarray(nibbles).view("<u2") & np.uint16(0x0F0F)
        word |= word >> np.uint16(4)
        packed[start // 2:start // 2 + word.size] = word
    return packed

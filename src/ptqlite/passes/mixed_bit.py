"""WEIGHT_QUANT mixed bit (bit_num=0): per layer, the coarsest step whose error stays within init_scale.

For each weight the pass searches a symmetric step s (zero point 0, q = round(w / s), never clipped) so that
the relative error sqrt(sum((w - q*s)^2) / sum(w^2)) lands within 1% below the target t = init_scale. Two ways
of measuring it compete, and the smaller file wins at the same error:

- "per-tensor": one step for the whole tensor, error measured over the tensor (the reference's way);
- "per-channel": one step per output channel, each channel's own relative error at t (so the tensor's is too).

The integer codes are then stored in the smallest form: the packed / indexed / sparse forms of encoding.py,
or a Rice code (an entropy code close to the codes' entropy, see rice_encode) decoded by standard ONNX ops.
Every form is folded back into the float weight by ONNX Runtime when the session loads. A layer whose target
cannot be met with codes of at most 16 bits falls back to 8-bit fixed quantization.

auto_tune=true searches init_scale itself (tune_init_scale, with the search of ptqlite.autotune). docs/mixed_bit.md has details and figures.
In a streaming conversion (stream.py) a layer keeps only its steps and plan once its form is chosen (_park), and
each decoder's data goes to the output's data file when it is final.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..autotune import (
    MAX_COARSE,
    MAX_FINE,
    TARGET_COSINE,
    MappedCandidate,
    OutputComparer,
    evaluation_inputs,
    search_scale,
)
from ..config import QuantConfig
from ..encoding import (
    MIN_OPSET,
    SPLIT_OPSET,
    Builder,
    Decoder,
    SharedConstants,
    SplitPlan,
    build_decoder,
    plan_split,
    signed_split_codes,
    signed_split_fits,
    split_codes,
    split_type,
)
from ..model import (
    GraphIndex,
    attribute,
    ensure_opset,
    opset_version,
    subgraph_inputs,
    too_large_for_one_file,
)
from ..plan import WeightSpec, plan_weights, weight_quant_rules
from ..qmath import bits_for, channel_shape, reduce_axes, round_half_away
from ..result import ConversionResult, QuantizedTensor, SkippedTensor
from ..stream import spill, streaming, trim_heap
from .weight import decode_on_consumers, quantize_weight, relative_error, replace_weights

log = logging.getLogger(__name__)

SEARCH_ITERATIONS = 100  # the reference's bound on the step search
SEARCH_TOLERANCE = 0.01  # stop once the error is within 1% below the target
MAX_CODE_BITS = 16  # a step needing wider codes counts as "cannot meet the target"
SEARCH_CHUNK = 1 << 18  # values of a large weight's rows the search computes at a time (row_blocks)
FALLBACK_BITS = 8
RICE_CHUNK = 1 << 20  # values per Rice stream: bounds the scratch memory of each TopK at load
MAX_QUOTIENT = 254  # the integer decoder takes quotients (+1) as uint8 differences of bit positions
# Rice is kept only where its file is this much smaller than the best lean form (split or fixed-width): its
# decoder needs TopK positions at load (docs/mixed_bit.md "Choosing the form" has the measurements).
RICE_MARGIN = 0.10
RICE_LAYER_BYTES = 250  # a Rice layer's own nodes in the file (its slice, index and Gather; docs/mixed_bit.md)
# Values joined into one shared decoder at most (split and Rice groups; a larger layer has its own): the encoder's
# temporaries of a group, and ONNX Runtime's folded outputs of its decoder at load, follow the group's size, so a
# model-wide group would make both follow the model. Above MiniLM's 22.7M values, so its bytes are unchanged.
GROUP_VALUES = 1 << 25
# split layers of at least this many values decode in the signed form (split_decoder, docs/mixed_bit.md)
SIGNED_MIN_VALUES = 1 << 16


# ---------------------------------------------------------------- step search


def _reconstruct(q: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The float32 weight the decoders rebuild: code times step, in float32 like the runtime does."""
    return q.astype(np.float32) * step.astype(np.float32)


def row_blocks(w: np.ndarray, axis: int | None = 0) -> list[slice]:
    """Row ranges (slices) of at most SEARCH_CHUNK values to compute a large weight by, so that its float64
    temporaries stay small; one range (all rows) for small weights and where the values per slice along `axis`
    would not be the same. Sums per slice are cut only when the slices are the rows (axis 0): numpy reduces each
    row's contiguous values the same way whether the row comes alone or with others, so they are bit-identical
    to those over the whole weight. Elementwise work passes axis=0: any cut gives the same values."""
    if w.ndim < 2 or w.size <= SEARCH_CHUNK or axis is None or axis % w.ndim != 0:
        return [Ellipsis]  # w[...]: the whole weight (0-d ones too)
    rows = w.shape[0]
    per = max(1, SEARCH_CHUNK // max(1, w.size // rows))
    return [slice(start, min(start + per, rows)) for start in range(0, rows, per)]


def _rows_of(step: np.ndarray, rows: slice) -> np.ndarray:
    """The steps that broadcast against w[rows]: a step per row is cut with the weight, others are shared."""
    return step[rows] if step.ndim and step.shape[0] > 1 else step


def slice_sums(w: np.ndarray, axis: int | None, values_of: Callable[[slice], np.ndarray]) -> np.ndarray:
    """The sums of values_of(rows) (float64 values of w[rows], elementwise) over each slice along `axis`, shaped
    like the steps, a block of rows at a time so that a large weight's float64 temporaries stay small.

    Bit-identical to one sum over the whole weight: slices that are rows (axis 0) are summed within their rows
    (row_blocks); slices that are the columns of a 2-D weight (a MatMul's output channels) are summed over the
    rows with the running sums carried, as the first row of the next block: numpy adds the rows of an axis-0 sum
    one after another, so this adds the same values in the same order (tests/test_conversion_memory.py)."""
    if w.ndim == 2 and axis is not None and axis % 2 == 1 and w.size > SEARCH_CHUNK:
        total = None
        for rows in row_blocks(w, 0):
            block = values_of(rows)
            if total is not None:
                block = np.concatenate([total, block])
            total = np.sum(block, axis=0, keepdims=True)
            del block
        return total
    axes = reduce_axes(w.ndim, axis)
    parts = [np.sum(values_of(rows), axis=axes, keepdims=True) for rows in row_blocks(w, axis)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def slice_energy(w: np.ndarray, axis: int | None) -> np.ndarray:
    """sum(w * w) in float64 per slice along `axis` (one value for None), shaped like the steps."""

    def squares(rows: slice) -> np.ndarray:
        w64 = np.array(w[rows], np.float64)  # a copy even of float64 weights: squared in place
        return np.multiply(w64, w64, out=w64)

    return slice_sums(w, axis, squares)


def channel_errors(w: np.ndarray, step: np.ndarray, axis: int | None,
                   energy: np.ndarray | None = None) -> np.ndarray:
    """Relative error per slice along `axis` (one value for axis None), shaped like `step`. `energy` (the sums
    of w * w over the slices, slice_energy) may be given when the caller computes it once for many steps."""
    if energy is None:
        energy = slice_energy(w, axis)

    def squared_errors(rows: slice) -> np.ndarray:
        w64 = np.asarray(w[rows], np.float64)
        part = _rows_of(step, rows)
        # The same arithmetic as w - _reconstruct(round_half_away(w / step), step), in place: these run on whole
        # weights at every step of the search, and their temporaries set the conversion's peak memory.
        q = round_half_away(np.divide(w64, part))
        decoded = q.astype(np.float32)
        decoded *= part.astype(np.float32)
        diff = np.subtract(w64, decoded, out=q)
        del decoded, w64
        return np.square(diff, out=diff)

    err = slice_sums(w, axis, squared_errors)
    # An all-zero slice is exact when it decodes to zeros, and fully wrong otherwise.
    ratio = np.sqrt(err / np.where(energy > 0, energy, 1.0))
    return np.where(energy > 0, ratio, (err > 0).astype(np.float64))


def codes_error(w: np.ndarray, q: np.ndarray, step: np.ndarray) -> float:
    """relative_error(w, _reconstruct(q, step)), a block of rows at a time: no float32 copy of the weight and no
    float64 temporaries of its size (the sums of a large weight's blocks add in another order than numpy's sum
    over the whole, so the error may differ in its last bits)."""
    energy = error = 0.0
    for rows in row_blocks(w, 0):
        work = np.asarray(w[rows], np.float64)
        energy += float(np.sum(np.square(work)))
        work -= _reconstruct(q[rows], _rows_of(step, rows))
        error += float(np.sum(np.square(work, out=work)))
    return float(np.sqrt(error / energy)) if energy > 0 else float(error > 0)


def distinct_codes(q: np.ndarray) -> int:
    """np.unique(q).size without sorting or a temporary of q's size: the codes seen, marked SEARCH_CHUNK at a time
    (the codes span at most 2^MAX_CODE_BITS + 1 values)."""
    if not q.size:
        return 0
    low = int(q.min())
    seen = np.zeros(int(q.max()) - low + 1, bool)
    flat = q.reshape(-1)
    for at in range(0, flat.size, SEARCH_CHUNK):
        seen[flat[at:at + SEARCH_CHUNK].astype(np.int32) - low] = True
    return int(np.count_nonzero(seen))


def codes_for(w: np.ndarray, step: np.ndarray) -> np.ndarray:
    """round_half_away(w / step), a block of rows at a time (elementwise, so the values are those of the whole
    weight at once), as int16 where every code lies in (-2^15, 2^15), else int32 (the steps the search returns
    keep every code within +-2^MAX_CODE_BITS / 2). The range is known before the codes are made: rounding and
    dividing by a positive step are monotone, so each slice's extreme codes are those of its extreme weights."""
    reduced = tuple(a for a in range(w.ndim) if step.ndim < w.ndim or step.shape[a] == 1)
    steps = np.asarray(step, np.float64)
    top = round_half_away(np.asarray(w.max(axis=reduced, keepdims=True), np.float64) / steps)
    bottom = round_half_away(np.asarray(w.min(axis=reduced, keepdims=True), np.float64) / steps)
    narrow = w.size and -(1 << 15) < bottom.min() and top.max() < 1 << 15
    q = np.empty(w.shape, np.int16 if narrow else np.int32)
    for rows in row_blocks(w, 0):
        q[rows] = round_half_away(np.asarray(w[rows], np.float64) / _rows_of(step, rows))
    return q


def search_step(w: np.ndarray, target: float, axis: int | None,
                error_axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Largest step (per slice along `axis`, or one for the tensor) whose relative error is <= target.

    With `error_axis` (one step for the tensor only) the error is that of the worst slice along it, so that one
    common step cannot meet the target by wiping out the channels whose weights are small.

    Starts at (max - min) * target, doubles or halves until the target is bracketed, then bisects (geometric
    mean) until the error is within SEARCH_TOLERANCE below the target. Steps are float32 values, so the error
    measured here is the error of the stored weight. Returns (step, met): met is False for slices where no
    step with codes of at most MAX_CODE_BITS bits meets the target.
    """
    shape = channel_shape(w.shape, axis)
    axes = reduce_axes(w.ndim, axis)
    # max, min and |w| of the float32 values are exact in float64: no float64 copy of the weight is needed
    span = (w.max(axis=axes, keepdims=True).astype(np.float64)
            - w.min(axis=axes, keepdims=True).astype(np.float64)).reshape(shape)
    # |w|'s maximum from the extremes: no float32 copy of the weight
    amax = np.maximum(np.abs(w.max(axis=axes, keepdims=True)),
                      np.abs(w.min(axis=axes, keepdims=True))).astype(np.float64).reshape(shape)
    # The finest step allowed: codes of MAX_CODE_BITS bits over [-amax, amax].
    finest = np.where(amax > 0, 2 * amax / ((1 << MAX_CODE_BITS) - 2), 1.0)
    step = np.where(span > 0, span * target, np.where(amax > 0, amax, 1.0))
    step = np.maximum(step, finest).astype(np.float32).astype(np.float64)
    low = np.zeros(shape)  # largest step known to meet the target (0: none yet)
    high = np.full(shape, np.inf)  # smallest step known to miss it
    done = np.zeros(shape, dtype=bool)
    slices = error_axis if axis is None and error_axis is not None else axis
    energy = slice_energy(w, slices)
    for _ in range(SEARCH_ITERATIONS):
        if axis is None and error_axis is not None:
            err = channel_errors(w, step, error_axis, energy).max().reshape(shape)
        else:
            err = channel_errors(w, step, axis, energy)
        ok = err <= target
        low = np.where(~done & ok & (step > low), step, low)
        high = np.where(~done & ~ok & (step < high), step, high)
        done |= ok & (err >= target * (1 - SEARCH_TOLERANCE))
        # Converged brackets (float32 neighbours) and slices stuck at the finest step are done too.
        done |= np.isfinite(high) & (low > 0) & (high <= np.nextafter(low.astype(np.float32), np.inf))
        done |= ~ok & (step <= finest)
        if done.all():
            break
        grow = np.where(np.isinf(high), step * 2, np.sqrt(np.maximum(low, 1e-300) * high))
        nxt = np.where(low > 0, grow, np.maximum(step / 2, finest))
        step = np.where(done, step, nxt.astype(np.float32).astype(np.float64))
    met = low > 0
    return np.where(met, low, finest).astype(np.float32).astype(np.float64), met


# ---------------------------------------------------------------- Rice code


def zigzag(q: np.ndarray) -> np.ndarray:
    """Signed codes -> unsigned, small magnitudes first: 0, -1, 1, -2, 2 ... -> 0, 1, 2, 3, 4 ..."""
    q = np.asarray(q, dtype=np.int64)
    return (q << 1) ^ (q >> 63)  # 2q for q >= 0, -2q - 1 below (the sign bit spread over all bits)


def zigzag32(q: np.ndarray) -> np.ndarray:
    """zigzag(q) as int32, for codes within +-2^30 (the step search's are within +-2^MAX_CODE_BITS / 2)."""
    return _zigzag_as(q, np.int32)


def zigzag_narrow(q: np.ndarray) -> np.ndarray:
    """zigzag(q) as uint16 where every value fits (max zigzag < 2^16), else int32
    (zigzag32): the same values in half the memory of int32 for 16-bit codes."""
    return _zigzag_as(q, np.uint16 if zigzag_max(q) < 1 << 16 else np.int32)


def _zigzag_as(q: np.ndarray, dtype: type) -> np.ndarray:
    """zigzag(q) in `dtype` (which must hold every value), computed in int32 a block at a time: no temporaries
    of a large weight's size."""
    q = np.asarray(q)
    flat, z = q.reshape(-1), np.empty(q.shape, dtype)
    out = z.reshape(-1)
    for at in range(0, flat.size, SEARCH_CHUNK):
        part = flat[at:at + SEARCH_CHUNK].astype(np.int32)
        out[at:at + SEARCH_CHUNK] = (part << 1) ^ (part >> 31)
    return z


def zigzag_max(q: np.ndarray) -> int:
    """max(zigzag(q)) from q's extremes (2 max q for q >= 0, -2 min q - 1 below), without a zigzag copy."""
    if not q.size:
        return 0
    return max(2 * max(int(q.max()), 0), -2 * min(int(q.min()), 0) - 1, 0)


def rice_parameter(z: np.ndarray) -> int:
    """The k that makes the Rice code of `z` shortest: each value costs k + 1 + (z >> k) bits.

    Only k whose largest quotient z >> k is at most MAX_QUOTIENT are considered (the decoder's uint8 limit;
    the shortest k almost always meets it)."""
    z = _unsigned(z)
    zmax = int(z.max()) if z.size else 0
    top = max(1, zmax.bit_length())
    lowest = next(k for k in range(top + 1) if zmax >> k <= MAX_QUOTIENT)
    costs = [z.size * (k + 1) + _quotient_sum(z, k) for k in range(lowest, top + 1)]
    return lowest + int(np.argmin(costs))


def _quotient_sum(z: np.ndarray, k: int) -> int:
    """sum(z >> k) of flat unsigned values, SEARCH_CHUNK at a time (no temporary of a large weight's size; an
    integer sum, so the same value)."""
    return sum(int(np.sum(z[at:at + SEARCH_CHUNK] >> k)) for at in range(0, z.size, SEARCH_CHUNK))


def rice_encode(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned values -> (unary stream, remainders): value = (ones before its 0) * 2^k + remainder.

    The unary stream is a packed bit string (MSB first) where value i adds (z_i >> k) ones then one zero;
    the padding of the last byte is ones, so the stream holds exactly len(z) zeros.
    """
    z = np.asarray(z, dtype=np.int64).ravel()
    quotient = z >> k
    stops = np.cumsum(quotient + 1) - 1  # where each value's terminating zero sits
    length = int(stops[-1]) + 1 if z.size else 0
    bits = np.ones(-(-length // 8) * 8, dtype=np.uint8)
    bits[stops] = 0
    return np.packbits(bits), z & ((1 << k) - 1)


def rice_decode(stream: np.ndarray, remainders: np.ndarray, k: int, count: int) -> np.ndarray:
    """Inverse of rice_encode (numpy; the ONNX decoder does the same with graph ops)."""
    stops = np.flatnonzero(np.unpackbits(stream) == 0)[:count]
    quotient = np.diff(stops, prepend=-1) - 1
    return (quotient << k) + np.asarray(remainders, dtype=np.int64)


def unzigzag(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.int64)
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


def rice_bits(z: np.ndarray, k: int) -> int:
    """Length in bits of the Rice code of unsigned values `z` with parameter k."""
    z = _unsigned(z)
    return int(z.size * (k + 1) + _quotient_sum(z, k))


def _unsigned(z: np.ndarray) -> np.ndarray:
    """Zigzag values, flat, as int64 unless already int32 or uint16 (zigzag32, zigzag_narrow; np.sum adds them
    in 64 bits)."""
    z = np.asarray(z)
    return z.ravel() if z.dtype in (np.int32, np.uint16) else z.astype(np.int64, copy=False).ravel()


def rice_decoders(index: GraphIndex, shared: SharedConstants, layers: list[MixedLayer],
                  sites: dict[str, str] | None = None, outputs: dict[str, str] | None = None) -> list[Decoder]:
    """Decoders for the Rice-coded layers: one integer decoding graph per Rice parameter k, shared by its layers
    (_rice_integer). sites and outputs: as for split_group_decoders.
    """
    sites = sites or {}
    outputs = {} if outputs is None else outputs
    decoders = []
    for k in sorted({layer.rice_k for layer in layers}):
        for group in bounded_groups([layer for layer in layers if layer.rice_k == k]):
            decoders.append(_rice_integer(index, shared, group, k, sites, outputs))
            decoders[-1].initializers = spill(decoders[-1].initializers)  # streaming: into the output's data file
    return decoders


def bounded_groups(layers: list[MixedLayer]) -> list[list[MixedLayer]]:
    """`layers` (which could share one decoder) cut in order into runs of at most GROUP_VALUES values; a layer
    larger than that is a run of its own."""
    runs: list[list[MixedLayer]] = []
    total = 0
    for layer in layers:
        if not runs or total + layer.size > GROUP_VALUES:
            runs.append([])
            total = 0
        runs[-1].append(layer)
        total += layer.size
    return runs


def _rice_quotients(b: Builder, z: np.ndarray, k: int) -> str:
    """uint8 [len(z)]: each value's quotient plus one, from its Rice stream (integer ops only).

    The positions of the stream's 0 bits: TopK (smallest first, k = number of values) over the uint8 bits selects
    them, and a second TopK over those indices sorts them (the spec lets equal keys come out lowest index first,
    but OpenVINO orders ties otherwise). Cast to uint8 (the ONNX rule for a narrower integer Cast keeps the low
    8 bits), neighbouring positions differ by quotient + 1 modulo 256, exact because quotients are at most
    MAX_QUOTIENT. That difference is taken without wrapping (runtimes disagree on uint8 overflow): |a - b| from
    Max and Min, and 256 - |a - b| where the position crossed a multiple of 256. Folded outputs: 2.5 bytes a
    stream bit, about 40 a value (the TopKs' int64 outputs).
    """
    stream, _ = rice_encode(z, k)
    bits = b.node("Reshape", [b.bits(b.const(stream)), b.shape_of([-1])])
    count = b.shape_of([z.size])
    b.node("TopK", [bits, count], largest=0)  # 1-D: the default axis
    zeros = b.name()
    b.decoder.nodes[-1].output.append(zeros)  # TopK's second output: the indices
    stops = b.node("TopK", [zeros, count], largest=0)  # its values: the positions in order
    b.decoder.nodes[-1].output.append(b.name())
    stops = b.node("Cast", [stops], to=TensorProto.UINT8)
    previous = b.node("Concat", [b.shared.get(np.array([255], np.uint8)),
                                 b.node("Slice", [stops, b.shape_of([0]), b.shape_of([z.size - 1])])], axis=0)
    distance = b.node("Sub", [b.node("Max", [stops, previous]), b.node("Min", [stops, previous])])
    crossed = b.node("Add", [b.node("Sub", [b.uint8(255), distance]), b.uint8(1)])  # 256 - distance, >= 1
    return b.node("Where", [b.node("Less", [stops, previous]), crossed, distance])


def _layer_slice(b: Builder, flat: str, start: int, layer: MixedLayer, whole: bool) -> str:
    """The layer's values of an integer vector of its group, in the layer's shape, as int32 (Gather's index type)."""
    piece = flat if whole else b.node("Slice", [flat, b.shape_of([start]), b.shape_of([start + layer.size])])
    return b.node("Cast", [b.node("Reshape", [piece, b.shape_of(layer.shape)])], to=TensorProto.INT32)


def _unzigzag_table(b: Builder, first: int, last: int) -> str:
    """unzigzag(z) for z = first .. at least `last` as a float vector, computed at load by Range and four float
    ops on that small vector: the table that the integer decoders gather weights from. One per model and range;
    `last` is rounded up to 2^n - 1 so that layers with similar ranges share it (entries past it are never read).
    """
    last = (1 << max(last, 0).bit_length()) - 1

    def build(t: Builder) -> str:
        get = t.shared.get
        z_range = t.node("Range", [get(np.array(first, np.float32)), get(np.array(last + 1, np.float32)),
                                   get(np.array(1, np.float32))])
        odd = t.node("Mod", [z_range, get(np.array([2.0], np.float32))], fmod=1)
        sign = t.node("Sub", [get(np.array([0.5], np.float32)), odd])
        return t.node("Mul", [t.node("Add", [z_range, odd]), sign])

    return b.shared.value(("unzigzag", first, last), build)


def _gather_weight(b: Builder, table: str, index: str, step: np.ndarray, target: str, site: str = "load") -> str:
    """The weight table[index] * step as `target`; bit-identical to _reconstruct (float32 code times step).

    site (see _decode_sites): "MatMul": only the codes as float, table[index] (the step is applied to the MatMul
    output); "Gather": the signed integer codes (int8 or int16), the gathered rows are decoded at run time."""
    if site == "MatMul":
        return b.node("Gather", [table, index])
    if site == "Gather":
        return b.node("Gather", [_integer_table(b, table), index])
    if step.size == 1:  # scale the small table, not the weight: the only float copy is the weight
        return b.node("Gather", [b.node("Mul", [table, b.const(step.astype(np.float32).reshape(()))]), index],
                      output=target)
    return b.node("Mul", [b.node("Gather", [table, index]), b.const(step.astype(np.float32))],
                  output=target)


def _integer_table(b: Builder, table: str) -> str:
    """The unzigzag `table` cast to int16, once per table: the codes of every layer fit (MAX_CODE_BITS)."""
    return b.shared.value(("integer", table), lambda t: t.node("Cast", [table], to=TensorProto.INT16))


def split_decoder(index: GraphIndex, shared: SharedConstants, target: str, q: np.ndarray, step: np.ndarray,
                  plan: SplitPlan, site: str = "load", signed: bool | None = None) -> Decoder:
    """The weight q * step from the split form of zigzag(q).

    Where it fits (encoding.signed_split_fits: low parts of 1 to 8 bits, codes within int16) the signed form
    (encoding.signed_split_codes): the signed codes are rebuilt in q's shape in int8/int16 and cast to float
    once (_signed_weight), about half the bytes at load of the unsigned form. Else the unsigned form
    (encoding.split_codes): integer values, reshaped and cast to int32, gather the weight from the unzigzag
    table. Both store the same bytes, and both are bit-identical to _reconstruct. signed: force one form (None:
    the signed one where it fits)."""
    b = Builder(index, shared, f"split k={plan.k}")
    if signed is None:
        signed = signed_form_fits(q, plan)
    if signed:
        codes, _ = signed_split_codes(b, q, plan)
        b.decoder.output = _signed_weight(b, codes, step, target, site)
        return b.decoder
    z = zigzag32(q)  # int32: the same values as zigzag's int64, half the encoder's temporaries
    flat = split_codes(b, z, plan)
    position = b.node("Cast", [b.node("Reshape", [flat, b.shape_of(q.shape)])], to=TensorProto.INT32)
    b.decoder.output = _gather_weight(b, _unzigzag_table(b, 0, int(z.max())), position, step, target, site)
    return b.decoder


def _signed_weight(b: Builder, codes: str, step: np.ndarray, target: str, site: str) -> str:
    """From signed integer codes in the weight's shape: "MatMul": the codes as float; "Gather": the integer codes;
    "load": the weight float(codes) * step as `target` (one rounding, as _reconstruct)."""
    if site == "Gather":  # the rows are cast to float after the Gather (_decode_after)
        return codes
    as_float = b.node("Cast", [codes], to=TensorProto.FLOAT)
    if site == "MatMul":
        return as_float
    factor = step.astype(np.float32).reshape(()) if step.size == 1 else step.astype(np.float32)
    return b.node("Mul", [as_float, b.const(factor)], output=target)


def signed_form_fits(q: np.ndarray, plan: SplitPlan) -> bool:
    """Whether split codes q with `plan` get the signed form (_signed_fits)."""
    return _signed_fits(q.size, q.ndim, max(int(q.max()), -int(q.min())) if q.size else 0, plan)


def _signed_fits(size: int, ndim: int, qmax: int, plan: SplitPlan) -> bool:
    """From the codes' size, rank and largest magnitude (a streaming conversion's layers make their codes again
    when asked for them): encoding.signed_split_fits, and at least SIGNED_MIN_VALUES values (its own decoder
    costs about 1 KB more file than a layer of a shared unsigned one, while it saves about 9 bytes a value at
    load)."""
    return size >= SIGNED_MIN_VALUES and ndim > 0 and signed_split_fits(qmax, plan)


def split_group_decoders(index: GraphIndex, shared: SharedConstants, layers: list[MixedLayer],
                         sites: dict[str, str] | None = None,
                         outputs: dict[str, str] | None = None) -> list[Decoder]:
    """Decoders of the split layers: layers of the unsigned form with the same plan widths (k, gap and value
    bits) and value type share one decoding graph over their joined values, cut by one Split; a layer then adds
    only its Reshape, Cast, Gather and Mul (about 5 nodes instead of about 27). A layer alone, and every layer of
    the signed form (split_decoder), keeps its own decoder (rebuilt when its site is not "load").

    sites: tensor -> where its step is applied (_decode_sites; default "load"); outputs receives, for each layer
    whose site is not "load", the value its consumers read instead of the weight."""
    sites = sites or {}
    outputs = {} if outputs is None else outputs
    groups: dict[tuple, list[MixedLayer]] = {}
    tops = {}  # each layer's largest zigzag value (its codes are made again for it in a streaming conversion)
    for layer in layers:
        plan = layer.split
        top = tops[layer.spec.tensor] = zigzag_max(layer.q)
        if _signed_fits(layer.size, len(layer.shape), (top + 1) // 2, plan):
            key = ("signed", layer.spec.tensor)  # its own decoder: the values are rebuilt in the layer's shape
        else:
            key = (plan.k, plan.gap_bits, plan.value_bits, split_type(top))
        groups.setdefault(key, []).append(layer)
    decoders = []
    for key, same in groups.items():
        signed = key[0] == "signed"
        for group in [same] if signed else bounded_groups(same):
            plan = same[0].split if signed else SplitPlan(key[0], key[1], key[2], 0)
            decoders.append(_split_group(index, shared, group, plan, tops, sites, outputs))
            decoders[-1].initializers = spill(decoders[-1].initializers)  # streaming: into the output's data file
    return decoders


def _split_group(index: GraphIndex, shared: SharedConstants, group: list[MixedLayer], plan: SplitPlan,
                 tops: dict[str, int], sites: dict[str, str], outputs: dict[str, str]) -> Decoder:
    """The decoder of split layers with the same widths (split_group_decoders)."""
    if len(group) == 1:
        layer = group[0]
        site = sites.get(layer.spec.tensor, "load")
        # A streaming conversion dropped the layer's own decoder data once the form was chosen: made again here.
        if site == "load" and not streaming():
            return layer.decoder
        decoder = split_decoder(index, shared, layer.spec.tensor, layer.q, layer.step, layer.split, site)
        if site != "load":
            outputs[layer.spec.tensor] = decoder.output
        return decoder
    b = Builder(index, shared, f"split k={plan.k}")
    joined = _joined_zigzag(group)
    flat = split_codes(b, joined, plan)
    del joined
    parts = [b.name() for _ in group]
    sizes = shared.get(np.array([layer.size for layer in group], np.int64))
    b.decoder.nodes.append(helper.make_node("Split", [flat, sizes], parts))
    for layer, part in zip(group, parts):
        position = b.node("Cast", [b.node("Reshape", [part, b.shape_of(layer.shape)])], to=TensorProto.INT32)
        site = sites.get(layer.spec.tensor, "load")
        out = _gather_weight(b, _unzigzag_table(b, 0, tops[layer.spec.tensor]), position, layer.step,
                             layer.spec.tensor, site)
        if site != "load":
            outputs[layer.spec.tensor] = out
    return b.decoder


def _joined_zigzag(layers: list[MixedLayer]) -> np.ndarray:
    """zigzag of every layer's codes, flat and joined in order (int32, zigzag32), filled layer by layer: a list
    of the layers' copies and their concatenation would hold the group twice."""
    joined = np.empty(sum(layer.size for layer in layers), np.int32)
    start = 0
    for layer in layers:
        joined[start:start + layer.size] = zigzag32(layer.q).ravel()
        start += layer.size
    return joined


def _rice_integer(index: GraphIndex, shared: SharedConstants, layers: list[MixedLayer], k: int,
                  sites: dict[str, str], outputs: dict[str, str]) -> Decoder:
    """One decoder for the Rice-coded `layers` that share k, kept in integers up to each layer's final Gather.

    The values are cut into streams of RICE_CHUNK values (each TopK's scratch stays small) whose quotients (uint8)
    and remainders (uint8, the k-bit packed forms of encoding.py) are joined into the index (quotient + 1) * 2^k +
    remainder = z + 2^k (uint16 for k <= 8, else per layer in int32); each layer takes its slice, cast to int32,
    and gathers its weight from a table of
    unzigzag(z) * step (per-channel steps: gathers unzigzag(z), then Mul). So the only float tensors made at
    load are the weights themselves (and the product for per-channel steps), bit-identical to _reconstruct.
    """
    b = Builder(index, shared, f"rice k={k}")
    z = _joined_zigzag(layers)
    cuts = range(0, z.size, RICE_CHUNK)
    parts = [_rice_quotients(b, z[at:at + RICE_CHUNK], k) for at in cuts]
    quotients = parts[0] if len(parts) == 1 else b.node("Concat", parts, axis=0)
    remainders = None
    if k:
        low = z & ((1 << k) - 1)
        parts = [b.unpack_codes(low[at:at + RICE_CHUNK], k) for at in cuts]
        remainders = parts[0] if len(parts) == 1 else b.node("Concat", parts, axis=0)
    # unzigzag(z) over z = -2^k .. max z, computed at load (a few ops on a small vector, no file bytes): the
    # table the layers gather from, indexed by z + 2^k (its first 2^k entries are never read).
    table = _unzigzag_table(b, -(1 << k), int(z.max()))
    if 0 < k <= 8:  # the index of the whole group in uint16 (at most 255 * 2^8 + 255), then cut per layer
        quotients = b.node("Add", [b.node("Mul", [b.node("Cast", [quotients], to=TensorProto.UINT16),
                                                  shared.get(np.array(1 << k, np.uint16))]),
                                   b.node("Cast", [remainders], to=TensorProto.UINT16)])
    start = 0
    for layer in layers:
        position = _layer_slice(b, quotients, start, layer, len(layers) == 1)
        if k > 8:
            position = b.node("Add", [b.node("Mul", [position, shared.get(np.array(1 << k, np.int32))]),
                                      _layer_slice(b, remainders, start, layer, len(layers) == 1)])
        site = sites.get(layer.spec.tensor, "load")
        out = _gather_weight(b, table, position, layer.step, layer.spec.tensor, site)
        if site != "load":
            outputs[layer.spec.tensor] = out
        start += layer.size
    return b.decoder


# ---------------------------------------------------------------- one layer


@dataclass
class MixedLayer:
    """How one weight is stored: codes and step(s), Rice-coded or in `decoder`, or the 8-bit fallback."""

    spec: WeightSpec
    measure: str  # "per-tensor", "per-channel" or "fallback"
    bits: int  # width of the codes' range (what fixed-width storage would need)
    step: np.ndarray  # per channel or scalar (fallback: the 8-bit scale)
    # signed codes (fallback: unsigned 8-bit codes); None in a streaming conversion, where `remake` makes them again
    # from the weight's memory map when asked for (held for every layer until the graph is written, they would
    # add half the float model)
    stored_q: np.ndarray | None
    # float32 weight the decoder rebuilds; None where that is q * step (split, Rice), made when asked for: a
    # model's layers are all held until the graph is written, and this copy would double their memory
    stored_decoded: np.ndarray | None
    relative_error: float
    stored_bytes: int  # bytes of its data in the file (Rice: its share of the shared stream, plus its steps)
    decoder: Decoder | None = None  # None: Rice-coded, decoded by rice_decoders()
    rice_k: int | None = None
    split: SplitPlan | None = None  # split form: decoder is the layer's own, split_group_decoders may share one
    zero_point: np.ndarray | None = None
    correction_var: np.ndarray | None = None
    correction_mean: np.ndarray | None = None
    remake: Callable[[], np.ndarray] | None = None

    @property
    def q(self) -> np.ndarray:
        return self.stored_q if self.stored_q is not None else self.remake()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.spec.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.spec.shape, dtype=np.int64))

    @property
    def decoded(self) -> np.ndarray:
        """The float32 weight the decoder rebuilds."""
        if self.stored_decoded is not None:
            return self.stored_decoded
        return _reconstruct(self.q, self.step)

    @property
    def encoding(self) -> str:
        return f"rice k={self.rice_k}" if self.decoder is None else self.decoder.encoding

    @property
    def storage(self) -> str:
        bits_per_weight = 8 * self.stored_bytes / max(1, self.size)
        return f"{self.encoding}, {bits_per_weight:.2f} bits/weight"

    @property
    def scheme(self) -> str:
        if self.measure == "fallback":
            axis = self.spec.axis
            where = f"per-channel axis {axis}" if axis is not None else "per-tensor"
            return f"fallback {FALLBACK_BITS}-bit asymmetric {where} (init_scale not reachable)"
        if self.measure == "per-channel":
            return f"symmetric step per channel axis {self.spec.axis}, error measured per channel"
        if self.spec.axis is not None and len(self.shape) > 1:
            return f"symmetric step per tensor, error measured per channel axis {self.spec.axis}"
        return "symmetric step per tensor, error measured per tensor"


def quantize_layer(index: GraphIndex, shared: SharedConstants, spec: WeightSpec, w: np.ndarray, target: float,
                   per_channel: bool = True, bias_correction: bool = True) -> MixedLayer:
    """Search the step(s) for one weight and keep the smallest stored form that meets `target`.

    Forms are compared by file bytes (data and decoder nodes), except that a Rice code must be RICE_MARGIN
    smaller than the lean forms (split, fixed-width) to be chosen, for its load-time memory."""
    best: MixedLayer | None = None
    best_key = np.inf

    def weigh(layer: MixedLayer) -> None:
        nonlocal best, best_key
        if layer.decoder is None:
            key = (layer.stored_bytes + RICE_LAYER_BYTES) / (1 - RICE_MARGIN)
        else:
            key = layer.stored_bytes + sum(node.ByteSize() for node in layer.decoder.nodes)
        if key < best_key:
            best, best_key = layer, key

    measures = [("per-tensor", None)]
    if per_channel and spec.axis is not None and w.shape[spec.axis] > 1:
        measures.append(("per-channel", spec.axis))
    for measure, axis in measures:
        # Every output channel is held to the target, also under one common step (see search_step).
        step, met = search_step(w, target, axis, spec.axis if w.ndim > 1 else None)
        if not met.all():
            continue
        step32 = step.astype(np.float32)
        # what the layer keeps, and what the forms below read: the codes in the narrowest type that holds them
        # (codes_for: int16 where they fit, a block of rows at a time); every use widens a block at a time where
        # it needs to
        q = kept = codes_for(w, step)
        bits = bits_for(int(q.max()) - int(q.min()) + 1)
        error = codes_error(w, q, step32)
        # Rice: the model shares one decoding graph per k, so a layer costs its bits and its steps.
        z = zigzag_narrow(q)  # only sizes and plans are computed from it: uint16 or int32 halve their memory
        k = rice_parameter(z)
        rice_bytes = -(-rice_bits(z, k) // 8) + step32.nbytes
        if (rice_bytes + RICE_LAYER_BYTES) / (1 - RICE_MARGIN) < best_key:
            weigh(MixedLayer(spec, measure, bits, step32, kept, None, error,
                             rice_bytes, rice_k=k, zero_point=np.zeros(step.size, np.int64)))
        plan = plan_split(z) if shared.opset >= SPLIT_OPSET else None
        del z  # before the split encoder's temporaries
        if plan is not None and plan.stored_bytes + step32.nbytes < best_key:
            decoder = split_decoder(index, shared, spec.tensor, q, step32, plan)
            weigh(MixedLayer(spec, measure, bits, step32, kept, None, error,
                             decoder.stored_bytes, decoder=decoder, zero_point=np.zeros(step.size, np.int64),
                             split=plan))
        # Skip the fixed-width forms when even their lower bound (indices into the distinct codes, or only the
        # nonzero codes) cannot beat the best so far: building them costs time, auto_tune quantizes many times.
        if bits > MAX_CODE_BITS:
            continue
        distinct = distinct_codes(q)
        bound = min(q.size * bits_for(distinct), int(np.count_nonzero(q)) * bits) // 8
        if bound >= best_key:
            del q, kept  # before the next measure's search: a large weight's codes are a large share of the peak
            continue
        # The fixed-width forms of encoding.py, codes shifted to start at 0 per step (int64, as they always were).
        q = q.astype(np.int64)
        low = q.min(axis=reduce_axes(q.ndim, axis), keepdims=True)
        offset = (low * step32).astype(np.float32)
        codes = q - low
        decoder = build_decoder(index, shared, spec.tensor, codes, bits_for(int(codes.max()) + 1), step32,
                                offset, -low)
        if decoder.stored_bytes < best_key:
            decoded = ((q - low).astype(np.float32) * step32 + offset).astype(np.float32)
            weigh(MixedLayer(spec, measure, bits, step32, kept, decoded, relative_error(w, decoded),
                             decoder.stored_bytes, decoder=decoder, zero_point=np.zeros(step.size, np.int64)))
        del q, kept, codes, low, offset, decoder
    if best is not None:
        return best
    # No step with codes of at most 16 bits meets the target: 8-bit fixed quantization, like the reference.
    qw = quantize_weight(w, FALLBACK_BITS, spec.axis if per_channel else None, spec.correction_axis,
                         bias_correction)
    decoder = build_decoder(index, shared, spec.tensor, qw.codes, FALLBACK_BITS, qw.scale, qw.offset,
                            qw.zero_codes)
    decoded = qw.decoded()
    return MixedLayer(spec, "fallback", FALLBACK_BITS, qw.q_scale, qw.codes, decoded,
                      relative_error(w, decoded),
                      decoder.stored_bytes, decoder=decoder, zero_point=qw.q_zero_point,
                      correction_var=qw.var_corr, correction_mean=qw.mean_corr)


# ---------------------------------------------------------------- the pass


def quantize_weights(model: onnx.ModelProto, config: QuantConfig, init_scale: float,
                     index: GraphIndex | None = None, shared: SharedConstants | None = None,
                     progress: bool | None = None) -> tuple[list[MixedLayer], list[SkippedTensor]]:
    """Every planned weight of `model` at target error `init_scale` (the model is not changed); `progress`
    shows a bar over the layers (None: on a terminal)."""
    from ..progress import progress as bar

    plan = plan_weights(model, weight_quant_rules(config, per_channel=True))
    skipped = [SkippedTensor(s.tensor, s.op_type, s.nodes, s.skip_reason) for s in plan.skipped]
    layers = []
    index = index or GraphIndex(model.graph)
    specs = bar(plan.quantized, len(plan.quantized), "mixed-bit search", progress, unit="layer")
    for spec, w, layer in each_layer(model, config, init_scale, specs, index, shared):
        if layer is None:
            skipped.append(SkippedTensor(spec.tensor, spec.op_type, spec.nodes,
                                         "quantized storage would not be smaller than float"))
            continue
        log.debug("%s: %s, %d bits, relative error %.4f, %s", spec.tensor, layer.measure, layer.bits,
                 layer.relative_error, layer.storage)
        del w
        if streaming():
            _park(index, layer)
        layers.append(layer)
    return layers, skipped


def each_layer(model: onnx.ModelProto, config: QuantConfig, init_scale: float, specs=None,
               index: GraphIndex | None = None, shared: SharedConstants | None = None):
    """(spec, weight, layer) for each planned weight of `model` in turn (specs: the planned ones, or those given),
    layer None where its quantized storage would not be smaller than float (it stays float). The weight is the
    float values (a memory map in a streaming conversion); the caller drops both before the next is made."""
    if specs is None:
        specs = plan_weights(model, weight_quant_rules(config, per_channel=True)).quantized
    index = index or GraphIndex(model.graph)
    shared = shared or SharedConstants(index, opset_version(model))
    for spec in specs:
        w = index.array(spec.tensor)
        layer = quantize_layer(index, shared, spec, w, init_scale, config.weight.per_channel,
                               config.weight.bias_correction)
        yield spec, w, (None if layer.stored_bytes >= w.nbytes else layer)
        del w, layer


def _park(index: GraphIndex, layer: MixedLayer) -> None:
    """A streaming conversion keeps of a layer only what does not grow with the model until the graph is written:
    a final decoder's data goes to the output's data file now; a split layer's own decoder data (rebuilt if the
    layer ends up alone, else its group's decoder holds it) and the decoded weight are dropped, and the codes are
    made again from the weight's memory map when the decoders are built (codes_for: the same values)."""
    if layer.decoder is not None and layer.split is None:  # fixed-width forms, the 8-bit fallback
        layer.decoder.initializers = spill(layer.decoder.initializers)
    elif layer.split is not None:
        layer.decoder.initializers = []
    layer.stored_decoded = None
    if layer.measure != "fallback":  # split and Rice layers read their codes again; the others only their size
        tensor, step = layer.spec.tensor, layer.step.astype(np.float64)
        layer.remake = lambda: codes_for(index.array(tensor), step)
    layer.stored_q = None


def tune_init_scale(model: onnx.ModelProto, config: QuantConfig, input_format: str | None = None,
                    samples=None, progress: bool | None = None) -> tuple[float, list[str]]:
    """auto_tune: search init_scale for `model` (not changed) on `samples` (in-memory calibration samples) or
    what evaluation_inputs finds; returns it and notes for the conversion result. `progress`: a bar over the
    evaluations (at most MAX_COARSE + MAX_FINE; None: on a terminal)."""
    from ..progress import progress_bar

    inputs, described = evaluation_inputs(model, config, input_format, samples)
    mapped = streaming() or too_large_for_one_file(model)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress_bar(MAX_COARSE + MAX_FINE, "auto_tune", progress, unit="evaluation"))
        if mapped:
            specs = plan_weights(model, weight_quant_rules(config, per_channel=True)).quantized
            candidate = stack.enter_context(MappedCandidate(model, {spec.tensor for spec in specs}))
            compare = OutputComparer(str(candidate.path), inputs, prepacking=False)  # its float values, for now
        else:
            compare = OutputComparer(model, inputs)

        def evaluate(scale: float) -> float:
            if mapped:
                # each weight's decoded values (the float ones where it stays float) into the candidate's data
                # file, one weight at a time: no copy of the model in memory
                for spec, w, layer in each_layer(model, config, scale, specs):
                    candidate.write(spec.tensor, w if layer is None else layer.decoded)
                    del w, layer
                trim_heap()
                cosine = compare(str(candidate.path))
            else:
                layers, _ = quantize_weights(model, config, scale, progress=False)
                cosine = compare(substitute(model, layers))
            bar.update(1)
            bar.set_postfix_str(f"init_scale {scale:.4g}: cosine {cosine:.5f}")
            log.debug("auto_tune: init_scale %.4g gives output cosine %.5f", scale, cosine)
            return cosine

        found = search_scale(evaluate, config.mixed_bit.init_scale)
    tried = ", ".join(f"{s:.4g}->{c:.5f}" for s, c in found.history)
    notes = [(f"auto_tune: init_scale={found.init_scale:.4g} gives mean output cosine {found.cosine:.5f} "
              f"(target {TARGET_COSINE}) on {described}"),
             f"auto_tune: {len(found.history)} evaluations (init_scale->cosine): {tried}"]
    if mapped:
        notes.append("auto_tune: each evaluation wrote the decoded weights to a temp data file that ONNX Runtime "
                     "mapped (the model was not loaded whole)")
    return found.init_scale, notes


def run(model: onnx.ModelProto, config: QuantConfig, input_format: str | None = None, samples=None,
        progress: bool | None = None, **_: object) -> ConversionResult:
    """Mixed-bit weight quantization of `model` in place; auto_tune compares outputs on `samples` when given."""
    result = ConversionResult(model, config.quant_type)
    init_scale = config.mixed_bit.init_scale
    if config.mixed_bit.auto_tune:
        init_scale, notes = tune_init_scale(model, config, input_format, samples, progress)
        result.notes += notes
    else:
        result.notes.append(f"mixed bit: init_scale={init_scale:g} (target relative error per layer)")
    ensure_opset(model, MIN_OPSET)
    index = GraphIndex(model.graph)
    shared = SharedConstants(index, opset_version(model))
    layers, result.skipped = quantize_weights(model, config, init_scale, index, shared, progress)
    log.info("mixed bit at init_scale %.4g: %d layers quantized (%s bits), %d stay float", init_scale, len(layers),
             ", ".join(f"{b}: {sum(1 for x in layers if x.bits == b)}" for b in sorted({x.bits for x in layers})),
             len(result.skipped))
    split_layers = [layer for layer in layers if layer.split is not None]
    sites = _decode_sites(index, layers, subgraph_inputs(model.graph))
    outputs: dict[str, str] = {}
    decoders = [layer.decoder for layer in layers if layer.decoder is not None and layer.split is None]
    decoders += split_group_decoders(index, shared, split_layers, sites, outputs)
    decoders += rice_decoders(index, shared, [layer for layer in layers if layer.decoder is None], sites, outputs)
    nodes = [n for d in decoders for n in d.nodes]
    after: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    mapping = Builder(index, shared, "map")
    for layer in layers:
        if layer.spec.tensor in outputs:
            _decode_after(index, mapping, layer, outputs[layer.spec.tensor], sites[layer.spec.tensor], after, result)
    nodes = shared.nodes_used_by(nodes) + nodes  # shared values first: they read constants only
    inits = [t for d in decoders for t in d.initializers] + mapping.decoder.initializers
    inits = shared.used_by(nodes) + inits
    shared.compact(nodes + [reader for reader, _ in after] + mapping.decoder.nodes, inits)
    # The decoders hold the layers' data now: the codes (held for every layer until here) and the decoders'
    # own references go before the graph takes its copy of the data, so the copies do not add up.
    for layer in layers:
        layer.stored_q = layer.stored_decoded = layer.remake = None
    for decoder in decoders:
        decoder.initializers = []
    del decoders
    result.quantized = [_record(layer) for layer in layers]
    # keyed by the readers' output names once they are final
    replace_weights(model, {layer.spec.tensor for layer in layers}, nodes, inits,
             {reader.output[0]: following for reader, following in after})
    return result


def _decode_sites(index: GraphIndex, layers: list[MixedLayer], in_subgraphs: set[str]) -> dict[str, str]:
    """Where each layer's step is applied, by fixed-bit WEIGHT_QUANT's rule (weight.decode_on_consumers):
    "MatMul" (every consumer reads it as B: the codes as float are folded, the step multiplies the output),
    "Gather" (every consumer gathers rows: the table stays int16, the rows are decoded) or "load".

    Only the decoders that end in a Gather from the unzigzag table (split, Rice) move the step; the
    fixed-width forms and the 8-bit fallback (an offset besides the step) are rebuilt at load as before."""
    sites = {}
    for layer in layers:
        if layer.split is None and layer.decoder is not None:
            continue
        # only the codes' rank is read: a zero-size stand-in, not the codes
        params = SimpleNamespace(codes=np.broadcast_to(np.int8(0), layer.shape), scale=layer.step,
                                 offset=np.zeros(()))
        site = decode_on_consumers(index, layer.spec.tensor, params, in_subgraphs)
        if site != "load":
            sites[layer.spec.tensor] = site
    return sites


def _decode_after(index: GraphIndex, b: Builder, layer: MixedLayer, codes: str, site: str,
                  after: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]], result: ConversionResult) -> None:
    """Point every consumer of the layer's weight at `codes` and multiply its output by the step.

    MatMul: x @ (c * s) = (x @ c) * s per column, one Mul on the output (equal to the folded weight up to the
    float rounding of the moved Mul). Gather: the rows of int16 codes are cast and multiplied by their row's step
    (or the tensor's), bit-identical to the folded weight. Each consumer and the nodes that follow it go into
    `after`; the reports get the map codes -> float weight."""
    step = layer.step.astype(np.float32)
    if site == "MatMul":  # a step per column is a vector (broadcasts for any x rank), per tensor a scalar
        step = step.reshape(-1) if step.size > 1 else step.reshape(())
    elif step.size == 1:
        step = step.reshape(())
    scale = b.const(step)
    for node, slot in index.consumers[layer.spec.tensor]:
        result.input_maps[(node.name, slot)] = (layer.step.astype(np.float32), None)
        out, raw = node.output[0], b.name()
        node.output[0] = raw
        first = len(b.decoder.nodes)
        if site == "MatMul":
            node.input[1] = codes
            b.node("Mul", [raw, scale], output=out)
        else:
            node.input[0] = codes
            row_step = scale if step.size == 1 else b.node("Gather", [scale, node.input[1]],
                                                            axis=attribute(node, "axis", 0))
            b.node("Mul", [b.node("Cast", [raw], to=TensorProto.FLOAT), row_step], output=out)
        after.append((node, b.decoder.nodes[first:]))


def _record(layer: MixedLayer) -> QuantizedTensor:
    spec = layer.spec
    return QuantizedTensor(
        spec.tensor, spec.op_type, spec.nodes, spec.shape, layer.bits, layer.scheme, layer.storage,
        bytes_before=layer.size * 4, bytes_after=layer.stored_bytes, relative_error=layer.relative_error,
        scale=np.asarray(layer.step, np.float64).ravel(),
        zero_point=None if layer.zero_point is None else np.asarray(layer.zero_point).ravel(),
        correction_var=None if layer.correction_var is None else layer.correction_var.ravel(),
        correction_mean=None if layer.correction_mean is None else layer.correction_mean.ravel(),
    )


def substitute(model: onnx.ModelProto, layers: list[MixedLayer]) -> onnx.ModelProto:
    """A copy of `model` whose quantized weights are replaced by their decoded float values (what the runtime
    sees after folding), for fast evaluation without building the decoder graph."""
    decoded = {layer.spec.tensor: layer.decoded for layer in layers}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name in decoded:
            tensor.CopyFrom(numpy_helper.from_array(decoded[tensor.name], tensor.name))
    return copy

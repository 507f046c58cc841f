"""Compact storage of integer weight codes inside a plain ONNX file.

A quantized weight is stored as unsigned codes u (u < 2^bits) plus a per-channel affine map w = u * a + b (a, b
absorb scale, zero point and bias correction). The codes are stored in the smallest of three forms, each decoded
by standard ONNX ops whose inputs are all initializers, so ONNX Runtime folds the decoder into the plain float
weight when the session loads and no decode work remains per inference:

- "packed":  one MSB-first bit stream of ceil(n*bits/8) bytes (8 and 16 bits: plain uint8/uint16 codes);
- "indexed": the sorted distinct codes as a small table plus packed indices of ceil(log2(distinct)) bits;
- "sparse":  only the codes that differ from their channel's zero code, with packed position gaps;
- "int8"/"int16": bits 8 and 16 without encoding (enable_encode=false), one signed integer per element.

Only ops from opset 11 or older are used (Reshape, BitShift, Mod, Slice, Cast, MatMul, Gather, CumSum, Expand,
ScatterElements, Mul, Add), so the decoder runs on any model with opset >= 11. On models with opset >= 14 (INTEGER_OPSET)
Add also takes uint8/uint16, and widths that do not divide 8 are decoded in integers too (see _Builder.unpack_codes).
Small constants that every decoder needs (shift tables, shapes) are stored once per model and shared.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .model import GraphIndex
from .qmath import bits_for, pack_bits

MIN_OPSET = 11
INTEGER_OPSET = 14  # Add/Sub/Mul on uint8 and uint16: the decoders of odd widths and Rice codes stay integer


@dataclass
class Decoder:
    """Nodes and initializers that rebuild one weight (or its codes, see build_decoder's `result`)."""

    encoding: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    output: str = ""  # the value holding the result
    # float32 map from the codes in `output` to the weight: weight = codes * scale + offset
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data this decoder adds to the file (what an encoding is judged on)."""
        return sum(len(t.raw_data) for t in self.initializers)


class SharedConstants:
    """Constants (and small computed values, see `value`) reused by many decoders of one model, created on first
    use. It also names every value the decoders add: short names from one model-wide counter, since each name is
    written in the file once per node that reads it."""

    def __init__(self, index: GraphIndex, opset: int = MIN_OPSET):
        self.index = index
        self.opset = opset  # the model's: decides which integer ops the decoders may use
        self.by_key: dict[tuple, str] = {}
        self.initializers: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []  # of the shared values, in creation (topological) order
        self.count = 0
        self.generated: set[str] = set()

    def name(self) -> str:
        """A new value name: "q" and a base-36 counter ("q0", "q1" ... "qzz"), unique in the model."""
        self.count += 1
        number, digits = self.count - 1, ""
        while True:
            number, digit = divmod(number, 36)
            digits = "0123456789abcdefghijklmnopqrstuvwxyz"[digit] + digits
            if not number:
                name = self.index.unique_name("q" + digits)
                self.generated.add(name)
                return name

    def get(self, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array).reshape(np.shape(array))  # keeps 0-d scalars 0-d
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.by_key:
            name = self.name()
            self.initializers.append(numpy_helper.from_array(array, name))
            self.by_key[key] = name
        return self.by_key[key]

    def value(self, key: tuple, build: Callable[[_Builder], str]) -> str:
        """A value computed from shared constants only, built once per model by `build` (its nodes go to
        self.nodes; whichever decoders read it share them)."""
        key = ("value", *key)
        if key not in self.by_key:
            b = _Builder(self.index, self, "shared")
            self.by_key[key] = build(b)
            assert not b.decoder.initializers, "a shared value may read shared constants only"
            self.nodes += b.decoder.nodes
        return self.by_key[key]

    def nodes_used_by(self, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """The shared nodes that `nodes` need, directly or through other shared nodes, in creation order."""
        read = {name for node in nodes for name in node.input}
        needed = []
        for node in reversed(self.nodes):
            if read.intersection(node.output):
                needed.append(node)
                read.update(node.input)
        return needed[::-1]

    def compact(self, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> None:
        """Rename the generated values of the final decoders to the shortest free names (a .. Z, then a0 ...), in
        order of first use: the candidates that lost took counter values too, so the kept names have gaps."""
        taken = (self.index._used - self.generated) | _names_in(self.index.graph)  # the model's own names
        fresh = (name for name in _short_names() if name not in taken)
        renamed: dict[str, str] = {}

        def new(name: str) -> str:
            if name in self.generated and name not in renamed:
                renamed[name] = next(fresh)
            return renamed.get(name, name)

        for node in nodes:
            node.input[:] = [new(name) for name in node.input]
            node.output[:] = [new(name) for name in node.output]
        for tensor in initializers:
            tensor.name = new(tensor.name)

    def used_by(self, nodes: list[onnx.NodeProto]) -> list[onnx.TensorProto]:
        """The shared constants that `nodes` read, also through shared nodes (candidates that lost created
        some too)."""
        read = {name for node in nodes + self.nodes_used_by(nodes) for name in node.input}
        return [t for t in self.initializers if t.name in read]


def _names_in(graph: onnx.GraphProto) -> set[str]:
    """Every value name of `graph` and its subgraphs (a short name must not shadow one in a subgraph either)."""
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input, node.output)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                names |= _names_in(sub)
    return names


def _short_names() -> Iterator[str]:
    """a .. z, A .. Z, then a0, a1 ... ZZ, a00 ...: identifiers, shortest first."""
    letters = string.ascii_letters
    yield from letters
    for size in itertools.count(1):
        for tail in itertools.product(letters + string.digits, repeat=size):
            yield from (head + "".join(tail) for head in letters)


class _Builder:
    def __init__(self, index: GraphIndex, shared: SharedConstants, encoding: str):
        self.index = index
        self.shared = shared
        self.name = shared.name
        self.decoder = Decoder(encoding)

    def const(self, array: np.ndarray) -> str:
        """A constant owned by this decoder (weight data, per-channel parameters)."""
        name = self.name()
        array = np.ascontiguousarray(array).reshape(np.shape(array))  # keeps 0-d scalars 0-d
        self.decoder.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        # Decoder nodes are folded away at load, so they carry no node name (it would only cost file bytes).
        out = output or self.name()
        self.decoder.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def shape_of(self, dims) -> str:
        return self.shared.get(np.array(dims, np.int64))

    def unpack(self, codes: np.ndarray, bits: int) -> str:
        """Store unsigned codes packed; return the name of a graph value holding them as float, flat [n]."""
        flat, is_float = self.unpack_codes(codes, bits)
        return flat if is_float else self.node("Cast", [flat], to=TensorProto.FLOAT)

    def unpack_codes(self, codes: np.ndarray, bits: int, flat: bool = True) -> tuple[str, bool]:
        """Store unsigned codes packed; return a graph value holding them flat [n], and whether it is float.

        Widths that divide 8 and 16 bits decode to uint8/uint16: integer intermediates cost 1-2 bytes a code
        while ONNX Runtime folds the decoder, a float one 4. Other widths: integer on opset >= INTEGER_OPSET
        (_odd_width), else their bits are weighed with a float MatMul.
        flat=False: a caller that reshapes anyway may get the codes in another shape when that saves a copy.
        """
        count = codes.size
        if bits in (8, 16):
            return self.const(codes.astype(np.uint8 if bits == 8 else np.uint16).ravel()), False
        if 8 % bits and self.shared.opset >= INTEGER_OPSET:
            return self._odd_width(np.asarray(codes), bits, flat), False
        # Stored as a column [bytes, 1]: no Reshape (each folded op's output is one more copy at load).
        column = self.const(pack_bits(codes, bits).reshape(-1, 1))
        if 8 % bits == 0:
            # Whole codes per byte: shift each field down, keep its low bits.
            per_byte = 8 // bits
            shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint8).reshape(1, per_byte) * bits
            fields = self.node("BitShift", [column, self.shared.get(shifts)], direction="RIGHT")
            low = self.node("Mod", [fields, self.shared.get(np.array([1 << bits], np.uint8))])
            total = -(-count * bits // 8) * per_byte
            return (low, False) if total == count and not flat else (self._first(low, count, total), False)
        # Any other width: split bytes into bits, then weigh each code's bits with powers of two.
        bit = self.bits(column)
        rows = self.node("Reshape", [self._first(bit, count * bits, -(-count * bits // 8) * 8), self.shape_of([count, bits])])
        as_float = self.node("Cast", [rows], to=TensorProto.FLOAT)
        powers = (2.0 ** np.arange(bits - 1, -1, -1)).astype(np.float32).reshape(bits, 1)
        weighted = self.node("MatMul", [as_float, self.shared.get(powers)])
        return self.node("Reshape", [weighted, self.shape_of([-1])]), True

    def _odd_width(self, codes: np.ndarray, bits: int, flat: bool) -> str:
        """Codes of a width that does not divide 8, decoded in integers (uint8, or uint16 above 8 bits).

        Up to 8 bits: 8 codes take `bits` whole bytes, so the stream is stored as rows of `bits` bytes. Code j of
        a row starts in byte j*bits // 8 and may run into the next one: each part is gathered into a [rows, 8]
        table, shifted into place (uint8 shifts drop the bits that belong to neighbours) and the two are added.
        About 6 bytes per code at load, where weighing bits in float took about 30. Wider codes: the low byte is
        stored plain, the high bits this way, joined in uint16.
        """
        count = codes.size
        if bits > 8:
            high = self.unpack_codes(codes >> 8, bits - 8)[0]
            low = self.const((codes & 0xFF).astype(np.uint8).ravel())
            high16 = self.node("Cast", [high], to=TensorProto.UINT16)
            shifted = self.node("BitShift", [high16, self.shared.get(np.array([8], np.uint16))], direction="LEFT")
            return self.node("Add", [shifted, self.node("Cast", [low], to=TensorProto.UINT16)])
        rows = -(-count // 8)
        padded = np.zeros(rows * 8, np.int64)
        padded[:count] = np.asarray(codes).ravel()
        stream = self.const(pack_bits(padded, bits).reshape(rows, bits))
        start = np.arange(8) * bits
        first, offset = start // 8, start % 8
        spill = offset + bits > 8  # codes that run into the next byte
        high = self.node("Gather", [stream, self.shared.get(first.astype(np.int32))], axis=1)
        high = self.node("BitShift", [high, self.shared.get(offset.astype(np.uint8)[None])], direction="LEFT")
        high = self.node("BitShift", [high, self.shared.get(np.array([8 - bits], np.uint8))], direction="RIGHT")
        # The next byte's leading bits; shifting a uint8 by 8 gives 0 for the codes that do not spill.
        nxt = np.minimum(first + 1, bits - 1).astype(np.int32)
        low = self.node("Gather", [stream, self.shared.get(nxt)], axis=1)
        low_shift = np.where(spill, 16 - offset - bits, 8).astype(np.uint8)[None]
        low = self.node("BitShift", [low, self.shared.get(low_shift)], direction="RIGHT")
        fields = self.node("Add", [high, low])
        total = rows * 8
        return fields if total == count and not flat else self._first(fields, count, total)

    def bits(self, column: str) -> str:
        """The bits of a uint8 column [n, 1], MSB first, as a uint8 table [n, 8]."""
        shifts = self.shared.get(np.arange(7, -1, -1, dtype=np.uint8)[None])
        shifted = self.node("BitShift", [column, shifts], direction="RIGHT")
        return self.node("Mod", [shifted, self.shared.get(np.array([2], np.uint8))])

    def _first(self, fields: str, count: int, total: int) -> str:
        """The first `count` of the `total` values of a [bytes, per_byte] table, flat (no Slice without padding)."""
        flat = self.node("Reshape", [fields, self.shape_of([-1])])
        if count == total:
            return flat
        return self.node("Slice", [flat, self.shape_of([0]), self.shape_of([count])])

    def finish(self, codes: str, is_float: bool, shape: tuple[int, ...], scale: np.ndarray, offset: np.ndarray,
               target: str, result: str) -> Decoder:
        """Shape the flat codes (while still integer: a float Reshape would cost one more float copy at load),
        then produce what `result` asks for (see build_decoder)."""
        d = self.decoder
        d.scale, d.offset = np.asarray(scale, np.float32), np.asarray(offset, np.float32)
        if codes in {t.name for t in d.initializers}:  # stored flat: give it the weight's shape instead
            stored = next(t for t in d.initializers if t.name == codes)
            stored.dims[:] = shape
            shaped = codes
        else:
            shaped = self.node("Reshape", [codes, self.shape_of(shape)])
        if result == "codes" or (result == "float codes" and is_float):
            d.output = shaped
        elif result == "float codes":
            d.output = self.node("Cast", [shaped], to=TensorProto.FLOAT)
        else:
            as_float = shaped if is_float else self.node("Cast", [shaped], to=TensorProto.FLOAT)
            scaled = self.node("Mul", [as_float, self.const(d.scale)])
            d.output = self.node("Add", [scaled, self.const(d.offset)], output=target)
        return d


def _code_type(bits: int) -> type:
    return np.uint16 if bits > 8 else np.uint8


def _packed(b: _Builder, codes, bits, scale, offset, target, result) -> Decoder:
    return b.finish(*b.unpack_codes(codes, bits, flat=False), codes.shape, scale, offset, target, result)


def _indexed(b: _Builder, codes, bits, scale, offset, target, result) -> Decoder | None:
    table, positions = np.unique(codes, return_inverse=True)
    index_bits = bits_for(table.size)
    if index_bits >= bits:
        return None
    idx = b.node("Cast", [b.unpack_codes(positions.ravel(), index_bits, flat=False)[0]], to=TensorProto.INT32)
    flat = b.node("Gather", [b.const(table.astype(_code_type(bits))), idx])
    return b.finish(flat, False, codes.shape, scale, offset, target, result)


def _sparse(b: _Builder, codes, bits, scale, offset, target, zero_codes, result) -> Decoder | None:
    shape = codes.shape
    flat_codes = codes.ravel()
    positions = np.flatnonzero(flat_codes != np.broadcast_to(zero_codes, shape).ravel())
    # Only worth it when most codes sit on the zero point; a dense tensor is never stored this way.
    if positions.size == 0 or positions.size * 2 > flat_codes.size:
        return None
    gaps = np.diff(positions, prepend=0)
    code_type = _code_type(bits)
    values, is_float = b.unpack_codes(flat_codes[positions], bits)
    if is_float:
        values = b.node("Cast", [values], to=helper.np_dtype_to_tensor_dtype(np.dtype(code_type)))
    where = b.node("CumSum", [b.node("Cast", [b.unpack_codes(gaps, bits_for(int(gaps.max()) + 1))[0]],
                                     to=TensorProto.INT64), b.shared.get(np.array(0, np.int64))])
    dense = b.node("Expand", [b.const(zero_codes.astype(code_type)), b.shape_of(shape)])
    dense_flat = b.node("Reshape", [dense, b.shape_of([-1])])
    flat = b.node("ScatterElements", [dense_flat, where, values])
    return b.finish(flat, False, shape, scale, offset, target, result)


def _plain(b: _Builder, codes, bits, scale, offset, target, result) -> Decoder:
    """enable_encode=false: signed int8/int16 storage in the weight's shape."""
    shift = 1 << (bits - 1)
    stored = b.const((codes - shift).astype(np.int8 if bits == 8 else np.int16))
    # offset is defined for unsigned codes; signed codes need offset + shift * scale
    return b.finish(stored, False, codes.shape, scale, offset + shift * scale, target, result)


def build_decoder(index: GraphIndex, shared: SharedConstants, target: str, codes: np.ndarray, bits: int,
                  scale: np.ndarray, offset: np.ndarray, zero_codes: np.ndarray, encode: bool = True,
                  forms: tuple[str, ...] = ("packed", "indexed", "sparse"), result: str = "weight") -> Decoder:
    """The smallest decoder of `codes * scale + offset` (float32, shape codes.shape).

    codes: unsigned integer codes < 2^bits; scale, offset, zero_codes: broadcastable to codes.shape (per channel
    or per tensor); zero_codes are the codes that decode to the channel's zero point (for the sparse form).
    forms: the encodings to consider (indexed and sparse are skipped where they cannot pay).
    result: "weight": the float weight itself, as `target`; "float codes": the codes as float (one Cast after
    the integer decoding), the caller applying decoder.scale and decoder.offset; "codes": the codes as stored
    (integer, except widths decoded in float). For the last two the result is decoder.output.
    """
    codes = np.asarray(codes, dtype=np.int64)
    def builder(encoding: str) -> _Builder:
        return _Builder(index, shared, encoding)

    if not encode:
        return _plain(builder(f"int{bits}"), codes, bits, scale, offset, target, result)
    makers = {
        "packed": lambda: _packed(builder("packed"), codes, bits, scale, offset, target, result),
        "indexed": lambda: _indexed(builder("indexed"), codes, bits, scale, offset, target, result),
        "sparse": lambda: _sparse(builder("sparse"), codes, bits, scale, offset, target, np.asarray(zero_codes),
                                  result),
    }
    candidates = [d for d in (makers[form]() for form in forms) if d is not None]
    if not candidates:
        raise ValueError(f"none of the forms {forms} can store these codes")
    return min(candidates, key=lambda d: (d.stored_bytes, len(d.nodes)))


# ---------------------------------------------------------------- split codes

SPLIT_OPSET = 16  # ScatterElements with reduction="add": entries at one position add up


def packed_bytes(count: int, bits: int, opset: int = SPLIT_OPSET) -> int:
    """Bytes that _Builder.unpack_codes stores for `count` codes of `bits` bits (odd widths pad rows of 8 codes)."""
    if bits in (8, 16):
        return count * bits // 8
    if 8 % bits and opset >= INTEGER_OPSET:
        # above 8 bits: the low byte plain, the high bits packed (see _Builder._odd_width)
        return count + packed_bytes(count, bits - 8, opset) if bits > 8 else -(-count // 8) * bits
    return -(-count * bits // 8)


@dataclass(frozen=True)
class SplitPlan:
    """Unsigned values z stored as low k bits (packed) plus sparse entries for the high part z >> k.

    Each entry is a (gap, value) pair of gap_bits and value_bits: positions are the running sum of the gaps, and
    entries at one position add up. So a gap too long for gap_bits becomes filler entries of value 0, and a high
    part too large for value_bits becomes several entries at one position (gap 0): the widths fit the common
    entries, not the outliers."""

    k: int
    gap_bits: int
    value_bits: int
    stored_bytes: int  # data bytes of the three packed streams


def _entry_counts(values: np.ndarray, limit: int) -> int:
    """Extra entries needed when each of `values` (>= 0) is cut into pieces of at most `limit`."""
    return int(np.sum(np.maximum(values - 1, 0) // limit))


def plan_split(z: np.ndarray, opset: int = SPLIT_OPSET) -> SplitPlan:
    """The k, gap and value widths that store unsigned values `z` in the fewest bytes (every k from 0 up)."""
    z = np.asarray(z, dtype=np.int64).ravel()
    top = int(z.max()).bit_length() if z.size else 0
    best: SplitPlan | None = None
    for k in range(top + 1):
        low_bytes = packed_bytes(z.size, k, opset) if k else 0
        if best is not None and low_bytes >= best.stored_bytes:
            continue  # the low bits alone cost more (widths above 8 can be cheaper again: 9 = 8 + 1)
        high = z >> k
        positions = np.flatnonzero(high)
        if positions.size == 0:
            plan = SplitPlan(k, 1, 1, low_bytes)
        else:
            # Distinct gaps and values with their counts: each width is then priced on a few numbers.
            gaps, gap_counts = np.unique(np.diff(positions, prepend=0), return_counts=True)
            values, value_counts = np.unique(high[positions], return_counts=True)
            plan = None
            for gap_bits in range(1, bits_for(int(gaps[-1]) + 1) + 1):
                fillers = int(np.sum(gap_counts * (np.maximum(gaps - 1, 0) // ((1 << gap_bits) - 1))))
                for value_bits in range(1, bits_for(int(values[-1]) + 1) + 1):
                    extra = int(np.sum(value_counts * ((values - 1) // ((1 << value_bits) - 1))))
                    entries = positions.size + fillers + extra
                    size = low_bytes + packed_bytes(entries, gap_bits, opset) + packed_bytes(entries, value_bits, opset)
                    if plan is None or size < plan.stored_bytes:
                        plan = SplitPlan(k, gap_bits, value_bits, size)
        if best is None or plan.stored_bytes < best.stored_bytes:
            best = plan
    assert best is not None
    return best


def split_entries(high: np.ndarray, gap_bits: int, value_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, values) of the nonzero `high` values, with filler and extra entries so each fits its width."""
    high = np.asarray(high, dtype=np.int64).ravel()
    positions = np.flatnonzero(high)
    gaps = np.diff(positions, prepend=0)
    values = high[positions]
    gap_limit, value_limit = (1 << gap_bits) - 1, (1 << value_bits) - 1
    fill = np.maximum(gaps - 1, 0) // gap_limit  # filler entries (value 0) before each entry
    extra = (values - 1) // value_limit  # entries after it at the same position (gap 0)
    counts = fill + 1 + extra
    owner = np.repeat(np.arange(positions.size), counts)
    j = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)  # rank within the owner's run
    f, e = fill[owner], extra[owner]
    out_gaps = np.where(j < f, gap_limit, np.where(j == f, gaps[owner] - f * gap_limit, 0))
    out_values = np.where(j < f, 0, np.where(j == f, values[owner] - e * value_limit, value_limit))
    return out_gaps, out_values


def split_join(low: np.ndarray, gaps: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Reference decoder (numpy) of the split form: what the graph of split_codes computes."""
    z = np.asarray(low, dtype=np.int64).copy()
    np.add.at(z, np.cumsum(gaps), np.asarray(values, dtype=np.int64) << k)
    return z


def split_type(zmax: int) -> tuple[type, int]:
    """The narrowest integer type (numpy, ONNX) that holds values up to zmax."""
    if zmax < 1 << 8:
        return np.uint8, TensorProto.UINT8
    if zmax < 1 << 16:
        return np.uint16, TensorProto.UINT16
    return np.int32, TensorProto.INT32


def split_codes(b: _Builder, z: np.ndarray, plan: SplitPlan) -> str:
    """Store unsigned values `z` in the split form of `plan`; return a graph value holding them, flat [n].

    Integer all the way, in the narrowest type that holds max(z): the low bits unpacked by unpack_codes, the
    high parts added in by one ScatterElements (reduction add) at the running sums of the gaps. No TopK and
    no float copy: about 8 bytes a value at load besides the weight."""
    z = np.asarray(z, dtype=np.int64).ravel()
    k = plan.k
    np_type, onnx_type = split_type(int(z.max()) if z.size else 0)
    if k:
        low = b.unpack_codes(z & ((1 << k) - 1), k)[0]
        if k > 8 or np_type is not np.uint8:
            low = b.node("Cast", [low], to=onnx_type)
    else:
        low = b.node("Expand", [b.shared.get(np.array([0], np_type)), b.shape_of([z.size])])
    if not np.any(z >> k):
        return low
    gaps, values = split_entries(z >> k, plan.gap_bits, plan.value_bits)
    where = b.node("CumSum", [b.node("Cast", [b.unpack_codes(gaps, plan.gap_bits)[0]], to=TensorProto.INT64),
                              b.shared.get(np.array(0, np.int64))])
    high = b.unpack_codes(values, plan.value_bits)[0]
    if plan.value_bits > 8 or np_type is not np.uint8:
        high = b.node("Cast", [high], to=onnx_type)
    if k:
        high = b.node("Mul", [high, b.shared.get(np.array([1 << k], np_type))])
    return b.node("ScatterElements", [low, where, high], reduction="add")

"""Compact storage of integer weight codes inside a plain ONNX file.

A quantized weight is stored as unsigned codes u (u < 2^bits) plus a per-channel affine map w = u * a + b (a, b
absorb scale, zero point and bias correction). The codes are stored in the smallest of three forms, each decoded
by standard ONNX ops whose inputs are all initializers, so ONNX Runtime folds the decoder into the plain float
weight when the session loads and no decode work remains per inference:

- "packed":  the codes in ceil(n*bits/8) bytes (8 and 16 bits: plain uint8/uint16 codes; see Builder.unpack_codes);
- "indexed": the sorted distinct codes as a small table plus packed indices of ceil(log2(distinct)) bits;
- "sparse":  only the codes that differ from their channel's zero code, with packed position gaps;
- "int8"/"int16": bits 8 and 16 without encoding (enable_encode=false), one signed integer per element.

The decoders compute in uint8/uint16 with Add, Sub, Mul, Div on those types (opset 14, MIN_OPSET: the passes raise
older models), and no result depends on what a runtime does on integer overflow or inexact integer division:
OpenVINO saturates uint8 shifts and products and rounds uint8 quotients where ONNX Runtime wraps and truncates.
Small constants that every decoder needs (shapes, divisor tables) are stored once per model and shared.
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

MIN_OPSET = 14  # Add, Sub, Mul, Div on uint8 and uint16: the decoders' integer arithmetic
ODD_PARTS = {3: (2, 1), 5: (1, 4), 6: (2, 4), 7: (1, 2, 4)}  # widths of a code's streams, high bits first
SIGNED_GROUPS = {4: 1, 6: 3, 7: 7}  # signed values of these widths: bytes a group (Builder._signed_bytes)


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
        self.opset = opset  # the model's: decides which ops the decoders may use (see SPLIT_OPSET)
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

    def value(self, key: tuple, build: Callable[[Builder], str]) -> str:
        """A value computed from shared constants only, built once per model by `build` (its nodes go to
        self.nodes; whichever decoders read it share them)."""
        key = ("value", *key)
        if key not in self.by_key:
            b = Builder(self.index, self, "shared")
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


class Builder:
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

    def uint8(self, value: int) -> str:
        return self.shared.get(np.array(value, np.uint8))

    def unpack_codes(self, codes: np.ndarray, bits: int) -> str:
        """Store unsigned codes packed; return a graph value holding them in codes' shape, as uint8 (uint16
        above 8 bits).

        Integer intermediates cost 1-2 bytes a code while ONNX Runtime folds the decoder, a float one 4. Every
        op is exact whatever a runtime does on overflow or inexact integer division (docs/architecture.md,
        "Weight storage"): bit fields come from Mod, Sub of a smaller value, Div of an exact multiple, Mul that
        stays in range, and Gather from small tables computed at load.
        """
        codes = narrow_codes(codes)
        if bits in (8, 16):
            return self.const(codes.astype(np.uint8 if bits == 8 else np.uint16))
        if bits > 8:
            return self._wide(codes, bits)
        if bits == 4:
            return self._nibbles(codes)
        if 8 % bits == 0:
            return self._by_table(codes, bits)
        return self._odd_width(codes, bits)

    def field_table(self, bits: int, shift: int = 0, kind: str = "uint8") -> str:
        """uint8 [256, 8 // bits]: the `bits`-bit fields of every byte value, MSB first, times 2^shift; computed
        at load by a few float ops on 256 values (exact: powers of two, Floor, Mod), so it costs no file bytes.
        kind "int8": the same values as int8 (they must fit); "signed": int8, each field read as a two's
        complement number (its top bit weighs -2^(bits-1))."""

        def build(t: Builder) -> str:
            get = t.shared.get
            values = t.node("Range", [get(np.array(0, np.float32)), get(np.array(256, np.float32)),
                                      get(np.array(1, np.float32))])
            shifts = np.arange(8 - bits, -1, -bits, dtype=np.float32).reshape(1, -1)
            column = t.node("Reshape", [values, t.shape_of([256, 1])])
            shifted = t.node("Floor", [t.node("Div", [column, get(2.0 ** shifts)])])
            fields = t.node("Mod", [shifted, get(np.array(1 << bits, np.float32))], fmod=1)
            if kind == "signed":  # f - 2^bits * floor(f / 2^(bits - 1)): exact, in [-2^(bits-1), 2^(bits-1))
                top = t.node("Floor", [t.node("Div", [fields, get(np.array(1 << (bits - 1), np.float32))])])
                fields = t.node("Sub", [fields, t.node("Mul", [top, get(np.array(1 << bits, np.float32))])])
            if shift:
                fields = t.node("Mul", [fields, get(np.array(1 << shift, np.float32))])
            return t.node("Cast", [fields], to=TensorProto.UINT8 if kind == "uint8" else TensorProto.INT8)

        key = ("fields", bits, shift) if kind == "uint8" else (kind + " fields", bits, shift)
        return self.shared.value(key, build)

    def _by_table(self, codes: np.ndarray, bits: int, shift: int = 0, kind: str = "uint8") -> str:
        """1, 2 and 4 bits (times 2^shift): the bit stream, cast to int32, gathers each byte's fields from
        field_table (1.5-2 bytes a code at load besides the result); kind as there."""
        stream = self.const(pack_bits(codes, bits))
        fields = self.node("Gather", [self.field_table(bits, shift, kind),
                                      self.node("Cast", [stream], to=TensorProto.INT32)])
        return self._trim(fields, codes, stream_codes=-(-codes.size * bits // 8) * (8 // bits))

    def signed_low_bits(self, values: np.ndarray, bits: int) -> str:
        """Store the low `bits` bits (1..8) of signed `values` (within [-2^(bits-1), 2^(bits-1))) packed, as
        packed_bytes(n, bits) bytes; return a graph value holding the values as int8 in values' shape.

        Two's complement is additive over the bit fields: the top field, read signed, and each lower field times
        its place value are looked up in int8 tables (field_table) or split from nibbles, and added (no sum
        leaves [-2^(bits-1), 2^(bits-1))). So no wider type and no per-value index into a value table is needed:
        about 1 (8 bits) to 7.5 (6 bits) bytes a value at load besides the result."""
        values = np.asarray(values)
        if bits == 8:
            return self.const(values.astype(np.int8))
        if bits in SIGNED_GROUPS:
            return self._signed_bytes(values, bits)
        u = np.bitwise_and(values.astype(np.int32, copy=False), (1 << bits) - 1)
        total, shift = None, bits
        for width in ODD_PARTS.get(bits, (bits,)):
            shift -= width
            part = np.right_shift(u, shift)
            np.bitwise_and(part, (1 << width) - 1, out=part)
            if total is None:  # the top field carries the sign: a signed table (a 4-bit one too)
                value = self._by_table(part, width, shift, "signed")
            elif width == 4:  # the lowest part of 5, 6, 7 bits: nibbles split by Mod/Sub/Div, 2.5 + 1 bytes
                value = self.node("Cast", [self._nibbles(part)], to=TensorProto.INT8)
            else:  # lower fields times their place value stay below 2^(bits-1): int8 tables
                value = self._by_table(part, width, shift, "int8")
            total = value if total is None else self.node("Add", [total, value])
        return total

    def _nibbles(self, codes: np.ndarray) -> str:
        """4 bits: byte = 16 * hi + lo, where hi and lo are the two halves of the codes along an axis of even
        size (the flat codes, padded, where no axis is even). lo = x mod 16, hi = (x - lo) / 16 (exact), and one
        Concat along that axis gives the codes in their shape: 2.5 bytes a code at load, no Reshape."""
        axis = next((a for a in reversed(range(codes.ndim)) if codes.shape[a] % 2 == 0), None)
        planes = codes if axis is not None else np.pad(codes.ravel(), (0, codes.size % 2))
        hi, lo = np.split(planes, 2, axis=axis or 0)
        byte = hi.astype(np.uint8)  # 16 * hi + lo < 256, made in place: one temporary of a byte a pair
        byte *= 16
        np.add(byte, lo, out=byte, casting="unsafe")
        stream = self.const(byte)
        low = self.node("Mod", [stream, self.uint8(16)])
        high = self.node("Div", [self.node("Sub", [stream, low]), self.uint8(16)])
        joined = self.node("Concat", [high, low], axis=axis or 0)
        if axis is not None:
            return joined
        flat = self.node("Slice", [joined, self.shape_of([0]), self.shape_of([codes.size])])
        return flat if codes.ndim == 1 else self.node("Reshape", [flat, self.shape_of(codes.shape)])

    def _odd_width(self, codes: np.ndarray, bits: int) -> str:
        """3, 5, 6 and 7 bits: the codes' high and low bits as separate streams of the widths above (ODD_PARTS),
        the higher ones from tables that hold their fields already times their place value, joined by Add (no
        overflow: the sum is the code). Same bytes as one bit stream (up to a byte of padding per part), about
        6.5 bytes a code at load besides the result (7 bits: 10)."""
        total, shift = None, bits
        for width in ODD_PARTS[bits]:
            shift -= width
            part = np.right_shift(codes, shift)
            np.bitwise_and(part, (1 << width) - 1, out=part)  # in place: one temporary of a large weight's size
            value = self._nibbles(part) if width == 4 else self._by_table(part, width, shift)
            total = value if total is None else self.node("Add", [total, value])
        return total

    def _signed_bytes(self, values: np.ndarray, bits: int) -> str:
        """4, 6, 7 bits: groups of `g` = SIGNED_GROUPS[bits] int8 bytes hold g + 1 values: byte j is value j times
        2^(8 - bits) plus field j of the last value (offset by 2^(bits-1) to be unsigned), so the same bits as
        one packed stream. The values are split along an axis of the weight into g + 1 planes, each byte of a
        group in its plane; field = Mod(byte, 2^(8 - bits)) and value = (byte - field) / 2^(8 - bits) (exact: Mod
        by a positive divisor is non-negative, the quotient an exact multiple), the last value from the fields
        by Mul and Add, and one Concat along the axis gives the values in their shape: at 6 bits 4.5 bytes a
        value at load besides the result, where the table lookups took 7.5."""
        g = SIGNED_GROUPS[bits]
        spare = 8 - bits
        parts = g + 1
        axis = next((a for a in reversed(range(values.ndim)) if values.shape[a] % parts == 0), None)
        planes = values if axis is not None else np.pad(values.ravel(), (0, -values.size % parts))
        # int16 holds every intermediate below (|value| < 2^(bits-1), so |value| * 2^(8-bits) + field < 2^8): half
        # the temporaries of int32 on a large weight, the same values
        planes = [p.astype(np.int16) for p in np.split(planes, parts, axis=axis or 0)]
        last = planes[-1] + (1 << (bits - 1))  # in [0, 2^bits)
        get = self.shared.get
        unit = get(np.array(1 << spare, np.int8))
        tops, extra = [], None
        for j in range(g):
            shift = spare * (g - 1 - j)
            field_bits = (last >> shift) & ((1 << spare) - 1)
            stored = self.const(((planes[j] << spare) + field_bits).astype(np.int8))
            field = self.node("Mod", [stored, unit])
            tops.append(self.node("Div", [self.node("Sub", [stored, field]), unit]))
            if shift:
                field = self.node("Mul", [field, get(np.array(1 << shift, np.int8))])
            extra = field if extra is None else self.node("Add", [extra, field])
        extra = self.node("Add", [extra, get(np.array(-(1 << (bits - 1)), np.int8))])
        joined = self.node("Concat", [*tops, extra], axis=axis or 0)
        if axis is not None:
            return joined
        flat = self.node("Slice", [joined, self.shape_of([0]), self.shape_of([values.size])])
        return flat if values.ndim == 1 else self.node("Reshape", [flat, self.shape_of(values.shape)])

    def _wide(self, codes: np.ndarray, bits: int) -> str:
        """9 to 15 bits: the low byte stored plain, the high bits packed, joined in uint16 (high * 256 < 2^15)."""
        high = self.node("Cast", [self.unpack_codes(codes >> 8, bits - 8)], to=TensorProto.UINT16)
        low = self.node("Cast", [self.const((codes & 0xFF).astype(np.uint8))], to=TensorProto.UINT16)
        shifted = self.node("Mul", [high, self.shared.get(np.array(256, np.uint16))])
        return self.node("Add", [shifted, low])

    def _trim(self, fields: str, codes: np.ndarray, stream_codes: int) -> str:
        """Fields holding the `stream_codes` codes of a stream (the codes, then padding) in row-major order, as
        a value in codes' shape (no Slice without padding, no Reshape where the shape is already right)."""
        if stream_codes == codes.size:
            return self.node("Reshape", [fields, self.shape_of(codes.shape)])
        flat = self.node("Reshape", [fields, self.shape_of([-1])])
        flat = self.node("Slice", [flat, self.shape_of([0]), self.shape_of([codes.size])])
        return flat if codes.ndim == 1 else self.node("Reshape", [flat, self.shape_of(codes.shape)])

    def bits(self, stream: str) -> str:
        """The bits of a uint8 stream, MSB first, as uint8 with one more axis of 8 (a field_table lookup)."""
        return self.node("Gather", [self.field_table(1), self.node("Cast", [stream], to=TensorProto.INT32)])

    def finish(self, codes: str, shape: tuple[int, ...], scale: np.ndarray, offset: np.ndarray, target: str,
               result: str) -> Decoder:
        """Produce what `result` asks for (see build_decoder) from the integer codes in the weight's shape (shaped
        while integer: a float Reshape would cost one more float copy at load)."""
        d = self.decoder
        d.scale, d.offset = np.asarray(scale, np.float32), np.asarray(offset, np.float32)
        if result == "codes":
            d.output = codes
        elif result == "float codes":
            d.output = self.node("Cast", [codes], to=TensorProto.FLOAT)
        else:
            scaled = self.node("Mul", [self.node("Cast", [codes], to=TensorProto.FLOAT), self.const(d.scale)])
            d.output = self.node("Add", [scaled, self.const(d.offset)], output=target)
        return d


def narrow_codes(codes) -> np.ndarray:
    """Integer codes as they come where they are 32 bits or narrower (every field and comparison below gives the
    same values in them; a large weight's uint16 codes take a quarter of int64's memory), others as int64."""
    codes = np.asarray(codes)
    if codes.dtype.kind in "ui" and codes.dtype.itemsize <= 4 and codes.dtype != np.uint32:
        return codes
    return codes.astype(np.int64, copy=False)


def code_counts(codes: np.ndarray, bits: int) -> np.ndarray:
    """How often each code 0 .. 2^bits - 1 occurs, COUNT_CHUNK codes at a time (np.bincount copies its input to
    int64)."""
    flat = codes.ravel()
    counts = np.zeros(1 << bits, np.int64)
    for start in range(0, flat.size, COUNT_CHUNK):
        counts += np.bincount(flat[start:start + COUNT_CHUNK], minlength=1 << bits)
    return counts


COUNT_CHUNK = 1 << 20


def _code_type(bits: int) -> type:
    return np.uint16 if bits > 8 else np.uint8


def _packed(b: Builder, codes, bits, scale, offset, target, result) -> Decoder:
    return b.finish(b.unpack_codes(codes, bits), codes.shape, scale, offset, target, result)


def _indexed(b: Builder, codes, bits, scale, offset, target, result) -> Decoder | None:
    # the distinct codes counted first (codes < 2^bits: a small bincount): a weight whose index would not be
    # narrower than its codes is refused before np.unique sorts a copy of it and makes its int64 inverse
    present = code_counts(codes, bits) > 0
    if bits_for(int(np.count_nonzero(present))) >= bits:
        return None
    # the sorted distinct codes, and each code's place among them looked up (np.unique would sort a copy and
    # make an int64 inverse): the same table and positions
    table = np.flatnonzero(present)
    index_bits = bits_for(table.size)
    place = np.zeros(present.size, _code_type(index_bits))
    place[table] = np.arange(table.size)
    positions = np.empty(codes.shape, place.dtype)
    flat, out = codes.ravel(), positions.reshape(-1)
    for start in range(0, flat.size, COUNT_CHUNK):  # a lookup casts its index to int64: a chunk at a time
        out[start:start + COUNT_CHUNK] = place[flat[start:start + COUNT_CHUNK]]
    idx = b.node("Cast", [b.unpack_codes(positions, index_bits)], to=TensorProto.INT32)
    shaped = b.node("Gather", [b.const(table.astype(_code_type(bits))), idx])
    return b.finish(shaped, codes.shape, scale, offset, target, result)


def _sparse(b: Builder, codes, bits, scale, offset, target, zero_codes, result) -> Decoder | None:
    """Only the codes off their channel's zero code, written by one ScatterElements into the zero codes at the
    running sums of packed gaps (positions inside the tensor by construction)."""
    shape = codes.shape
    flat_codes = codes.ravel()
    off_zero = (codes != zero_codes).ravel()  # broadcast in the comparison: no int64 copy of the zero codes
    # Only worth it when most codes sit on the zero point; a dense tensor is never stored this way (and is
    # refused before its positions, int64, are made).
    count = int(np.count_nonzero(off_zero))
    if count == 0 or count * 2 > flat_codes.size:
        return None
    positions = np.flatnonzero(off_zero)
    del off_zero
    gaps = np.diff(positions, prepend=0)
    values = b.unpack_codes(flat_codes[positions], bits)
    where = b.node("CumSum", [b.node("Cast", [b.unpack_codes(gaps, bits_for(int(gaps.max()) + 1))],
                                     to=TensorProto.INT64), b.shared.get(np.array(0, np.int64))])
    dense = b.node("Expand", [b.const(zero_codes.astype(_code_type(bits))), b.shape_of(shape)])
    dense_flat = b.node("Reshape", [dense, b.shape_of([-1])])
    flat = b.node("ScatterElements", [dense_flat, where, values])
    return b.finish(b.node("Reshape", [flat, b.shape_of(shape)]), shape, scale, offset, target, result)


def _plain(b: Builder, codes, bits, scale, offset, target, result) -> Decoder:
    """enable_encode=false: signed int8/int16 storage in the weight's shape."""
    shift = 1 << (bits - 1)
    stored = b.const((codes.astype(np.int32) - shift).astype(np.int8 if bits == 8 else np.int16))
    # offset is defined for unsigned codes; signed codes need offset + shift * scale
    return b.finish(stored, codes.shape, scale, offset + shift * scale, target, result)


def build_decoder(index: GraphIndex, shared: SharedConstants, target: str, codes: np.ndarray, bits: int,
                  scale: np.ndarray, offset: np.ndarray, zero_codes: np.ndarray, encode: bool = True,
                  forms: tuple[str, ...] = ("packed", "indexed", "sparse"), result: str = "weight") -> Decoder:
    """The smallest decoder of `codes * scale + offset` (float32, shape codes.shape).

    codes: unsigned integer codes < 2^bits; scale, offset, zero_codes: broadcastable to codes.shape (per channel
    or per tensor); zero_codes are the codes that decode to the channel's zero point (for the sparse form).
    forms: the encodings to consider (indexed and sparse are skipped where they cannot pay).
    result: "weight": the float weight itself, as `target`; "float codes": the codes as float (one Cast after
    the integer decoding), the caller applying decoder.scale and decoder.offset; "codes": the integer codes
    (uint8/uint16; int8/int16 unencoded). For the last two the result is decoder.output.
    """
    codes = narrow_codes(codes)

    def builder(encoding: str) -> Builder:
        return Builder(index, shared, encoding)

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


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that Builder.unpack_codes stores for `count` codes of `bits` bits (odd widths pad rows of 8 codes)."""
    if bits in (8, 16):
        return count * bits // 8
    if bits > 8:  # the low byte plain, the high bits packed (see Builder._wide)
        return count + packed_bytes(count, bits - 8)
    if bits in ODD_PARTS:  # a stream per part (see Builder._odd_width)
        return sum(packed_bytes(count, width) for width in ODD_PARTS[bits])
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


def plan_split(z: np.ndarray) -> SplitPlan:
    """The k, gap and value widths that store unsigned values `z` in the fewest bytes (every k from 0 up)."""
    z = np.asarray(z)
    # uint16 and int32 values are scanned as they are (a block at a time below), others in int32 where they fit
    z = z.ravel() if z.dtype in (np.int32, np.uint16) else z.astype(np.int64, copy=False).ravel()
    top = int(z.max()).bit_length() if z.size else 0
    if top < 31 and z.dtype not in (np.int32, np.uint16):
        z = z.astype(np.int32)  # half the memory traffic of the shifts and scans below
    # positions (and their gaps) as int32 where they fit: the same values at half the memory of a large weight's
    narrow = np.int32 if z.size < 1 << 31 else np.int64
    best: SplitPlan | None = None
    candidates = None  # positions where z >> j != 0 for the last j looked at, when few: a superset for every k > j
    for k in range(top + 1):
        low_bytes = packed_bytes(z.size, k) if k else 0
        if best is not None and low_bytes >= best.stored_bytes:
            continue  # the low bits alone cost more (widths above 8 can be cheaper again: 9 = 8 + 1)
        count, (gaps, gap_counts), (values, value_counts), candidates = _entry_counts(z, k, candidates, narrow)
        if count == 0:
            plan = SplitPlan(k, 1, 1, low_bytes)
        else:
            plan = None
            for gap_bits in range(1, bits_for(int(gaps[-1]) + 1) + 1):
                fillers = int(np.sum(gap_counts * (np.maximum(gaps - 1, 0) // ((1 << gap_bits) - 1))))
                for value_bits in range(1, bits_for(int(values[-1]) + 1) + 1):
                    extra = int(np.sum(value_counts * ((values - 1) // ((1 << value_bits) - 1))))
                    entries = count + fillers + extra
                    size = low_bytes + packed_bytes(entries, gap_bits) + packed_bytes(entries, value_bits)
                    if plan is None or size < plan.stored_bytes:
                        plan = SplitPlan(k, gap_bits, value_bits, size)
        if best is None or plan.stored_bytes < best.stored_bytes:
            best = plan
    assert best is not None
    return best


SPLIT_CHUNK = 1 << 18  # values of z (or positions) plan_split scans at a time


CANDIDATE_SHARE = 8  # positions are kept for the next k only while at most 1 / CANDIDATE_SHARE of the values


def _entry_counts(z: np.ndarray, k: int, candidates: np.ndarray | None, narrow: type):
    """For the values z >> k that are nonzero: how many, the distinct gaps between their positions (the first
    from 0) and the distinct values, ascending, with how often each occurs (np.bincount: as np.unique, without
    sorting), and the positions themselves when they are few (the candidates of the next k), else None.

    Counted SPLIT_CHUNK values (or candidates) at a time: the same counts as on the whole weight, without
    whole-weight temporaries (on a large weight the positions of k = 0, almost every value, and z >> k were the
    mixed-bit search's peak)."""
    gap_total = value_total = np.zeros(0, np.int64)
    previous, count = 0, 0
    kept: list[np.ndarray] | None = []
    limit = z.size // CANDIDATE_SHARE
    spans = range(0, z.size if candidates is None else candidates.size, SPLIT_CHUNK)
    for start in spans:
        if candidates is None:
            part = z[start:start + SPLIT_CHUNK] >> k
            positions = np.flatnonzero(part)
            values = part[positions]
            positions = positions.astype(narrow) + narrow(start)
        else:
            at = candidates[start:start + SPLIT_CHUNK]
            part = z[at] >> k
            nonzero = part != 0
            positions, values = at[nonzero], part[nonzero]
        if positions.size == 0:
            continue
        gap_total = _add_counts(gap_total, np.diff(positions, prepend=previous))
        value_total = _add_counts(value_total, values)
        previous = positions[-1]
        count += positions.size
        if kept is not None:
            kept.append(positions)
            if count > limit:
                kept = None
    gaps, values = np.flatnonzero(gap_total), np.flatnonzero(value_total)
    found = None if kept is None else (np.concatenate(kept) if kept else np.zeros(0, narrow))
    return count, (gaps, gap_total[gaps]), (values, value_total[values]), found


def _add_counts(total: np.ndarray, values: np.ndarray) -> np.ndarray:
    counts = np.bincount(values)
    if counts.size > total.size:
        total = np.concatenate([total, np.zeros(counts.size - total.size, np.int64)])
    total[:counts.size] += counts
    return total


def split_entries(high: np.ndarray, gap_bits: int, value_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(gaps, values) of the nonzero `high` values, with filler and extra entries so each fits its width."""
    high = np.asarray(high, dtype=np.int64).ravel()
    positions = np.flatnonzero(high)
    return split_entries_at(positions, high[positions], gap_bits, value_bits)


def split_entries_at(positions: np.ndarray, values: np.ndarray, gap_bits: int,
                     value_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """split_entries from the flat `positions` (ascending) of the nonzero high values and those `values`."""
    # int32 where the positions fit (the packers keep int32 codes as they are): half the temporaries, the same
    # values
    kind = np.int32 if positions.size == 0 or int(positions[-1]) < 1 << 31 else np.int64
    gaps = np.diff(np.asarray(positions, kind), prepend=0)
    values = np.asarray(values, kind)
    gap_limit, value_limit = (1 << gap_bits) - 1, (1 << value_bits) - 1
    fill = np.maximum(gaps - 1, 0) // gap_limit  # filler entries (value 0) before each entry
    extra = (values - 1) // value_limit  # entries after it at the same position (gap 0)
    # each entry's run: its fillers, itself at `main`, its extra entries; only the (few) entries with fillers or
    # extras need more than one slot, so the runs are laid out without a per-slot owner index
    main = np.cumsum(fill + 1 + extra) - 1 - extra
    total = int(main[-1] + extra[-1] + 1) if main.size else 0
    out_gaps, out_values = np.zeros(total, kind), np.zeros(total, kind)
    out_gaps[main] = gaps - fill * gap_limit
    out_values[main] = values - extra * value_limit
    del gaps, values
    out_gaps[_run_slots(main - fill, fill)] = gap_limit
    out_values[_run_slots(main + 1, extra)] = value_limit
    return out_gaps, out_values


def _run_slots(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The slots start, start + 1, ..., start + length - 1 of every run with length > 0, joined."""
    some = np.flatnonzero(lengths)
    starts, lengths = starts[some], lengths[some]
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def split_type(zmax: int) -> tuple[type, int]:
    """The narrowest integer type (numpy, ONNX) that holds values up to zmax."""
    if zmax < 1 << 8:
        return np.uint8, TensorProto.UINT8
    if zmax < 1 << 16:
        return np.uint16, TensorProto.UINT16
    return np.int32, TensorProto.INT32


def split_codes(b: Builder, z: np.ndarray, plan: SplitPlan) -> str:
    """Store unsigned values `z` in the split form of `plan`; return a graph value holding them, flat [n].

    Integer all the way, in the narrowest type that holds max(z): the low bits unpacked by unpack_codes, the
    high parts added in by one ScatterElements (reduction add) at the running sums of the gaps (inside the
    tensor, and the sums stay below 2^k * (z >> k) + low = z, so nothing overflows). No TopK and no float copy:
    about 8 bytes a value at load besides the weight."""
    z = np.asarray(z)
    z = z.ravel() if z.dtype == np.int32 else z.astype(np.int64, copy=False).ravel()
    k = plan.k
    np_type, onnx_type = split_type(int(z.max()) if z.size else 0)
    if k:
        low = b.unpack_codes(z & ((1 << k) - 1), k)
        if k > 8 or np_type is not np.uint8:
            low = b.node("Cast", [low], to=onnx_type)
    else:
        low = b.node("Expand", [b.shared.get(np.array([0], np_type)), b.shape_of([z.size])])
    high = z >> k
    if not np.any(high):
        return low
    gaps, values = split_entries(high, plan.gap_bits, plan.value_bits)
    del high
    where = b.node("CumSum", [b.node("Cast", [b.unpack_codes(gaps, plan.gap_bits)], to=TensorProto.INT64),
                              b.shared.get(np.array(0, np.int64))])
    high = b.unpack_codes(values, plan.value_bits)
    if plan.value_bits > 8 or np_type is not np.uint8:
        high = b.node("Cast", [high], to=onnx_type)
    if k:
        high = b.node("Mul", [high, b.shared.get(np.array([1 << k], np_type))])
    return b.node("ScatterElements", [low, where, high], reduction="add")


def _signed_parts(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From signed codes q (within +-2^30), SPLIT_CHUNK values at a time: b = unzigzag(zigzag(q) mod 2^k) flat as
    int8 (k <= 8), and the flat positions (int64) and values of the nonzero high parts zigzag(q) >> k. No
    temporary of a large weight's size besides b (one byte a value)."""
    flat = q.reshape(-1)
    low = np.empty(flat.size, np.int8)
    positions, values = [], []
    for start in range(0, flat.size, SPLIT_CHUNK):
        part = flat[start:start + SPLIT_CHUNK].astype(np.int32)
        z = (part << 1) ^ (part >> 31)  # zigzag
        high = z >> k
        at = np.flatnonzero(high)
        positions.append(at + start)
        values.append(high[at])
        z &= (1 << k) - 1
        low[start:start + SPLIT_CHUNK] = (z >> 1) ^ -(z & 1)  # unzigzag of the low bits
    join = (lambda parts: np.concatenate(parts)) if positions else (lambda parts: np.zeros(0, np.int64))
    return low, join(positions), join(values)


def _magnitude(q: np.ndarray) -> int:
    """max |q| without a temporary of q's size."""
    return max(int(q.max()), -int(q.min())) if q.size else 0


FLAT_ENTRY_BYTES = 26  # ScatterND's coordinates cost about 52 bytes an entry at load, a flat int16 Reshape 2 a value


def signed_split_fits(qmax: int, plan: SplitPlan) -> bool:
    """Whether signed_split_codes can store codes of magnitude up to `qmax` with `plan`: the low part must be
    1 to 8 bits (int8 fields) and every value and every single entry must stay within int16."""
    return 1 <= plan.k <= 8 and qmax + (1 << (plan.k - 1)) < 1 << 15


def signed_split_codes(b: Builder, q: np.ndarray, plan: SplitPlan) -> tuple[str, int]:
    """Store signed codes `q` in the split form of `plan` over z = zigzag(q), in q's shape; return the graph value
    holding q (int8 where every code and entry fits, else int16) and its ONNX type.

    The same entries (gaps, high parts z >> k) and the same number of low bits as split_codes, so the same bytes,
    but the low bits are stored as the two's complement of b = unzigzag(z mod 2^k) (a bijection of k-bit values):
    b is additive over its bit fields, so signed_low_bits unpacks it into int8 by Mod/Div of signed bytes or
    table lookups and Adds, without the uint16 widening, the value-table index (int32) and the Reshapes of
    split_codes. Since 2^k is even, q = unzigzag(z) = b + sign(b) * 2^(k-1) * (z >> k) (sign +1 where b >= 0, as
    z mod 2^k is even there): the high parts are added by one scatter (reduction add) at the entries' positions,
    each entry's sign read from b there (a Gather of a few values). Entries at one position all have that sign,
    so every partial sum lies between b and q: nothing overflows (signed_split_fits). On MiniLM about 10 bytes a
    value at load besides the result, where split_codes and the table Gather took about 18."""
    q = np.asarray(q)
    k = plan.k
    signed_low, positions, high = _signed_parts(q, k)
    entries = split_entries_at(positions, high, plan.gap_bits, plan.value_bits) if positions.size else None
    del positions, high
    # Few entries: ScatterND at their coordinates in q's shape (about 56 bytes an entry at load). Many (or a
    # 1-D weight): ScatterElements on the flat values, then one int16 Reshape (2 bytes a value).
    flat = q.ndim == 1 or (entries is not None and FLAT_ENTRY_BYTES * entries[0].size > q.size)
    base = b.signed_low_bits(signed_low if flat else signed_low.reshape(q.shape), k)
    del signed_low
    if entries is None:
        if flat and q.ndim != 1:
            base = b.node("Reshape", [base, b.shape_of(q.shape)])
        return base, TensorProto.INT8
    gaps, values = entries
    get = b.shared.get
    # positions in int32 where they fit (half the bytes at load; ScatterND's and GatherND's index is int64)
    wide, position_type = (np.int32, TensorProto.INT32) if q.size < 1 << 31 else (np.int64, TensorProto.INT64)
    index = b.node("CumSum", [b.node("Cast", [b.unpack_codes(gaps, plan.gap_bits)], to=position_type),
                              get(np.array(0, np.int64))])
    if not flat:
        # the flat positions as indices into q's shape (row-major), all axes at once: coordinate j is
        # floor(position / stride_j) mod size_j, the floor as (position - position mod stride_j) / stride_j
        index = b.node("Unsqueeze", [index, get(np.array([1], np.int64))])
        strides = get(np.array([[int(np.prod(q.shape[j + 1:])) for j in range(q.ndim)]], wide))
        whole = b.node("Div", [b.node("Sub", [index, b.node("Mod", [index, strides])]), strides])
        index = b.node("Mod", [whole, get(np.array([q.shape], wide))])
        if position_type != TensorProto.INT64:
            index = b.node("Cast", [index], to=TensorProto.INT64)
    # each entry's value times 2^(k-1) - 2^k * (b < 0) there: +-2^(k-1) by the sign of b (no Where: ONNX
    # Runtime's has no int8 or int16)
    # int8 all the way where every value and entry fits (|q| + 2^(k-1) <= 127), else int16
    np_type, code_type = ((np.int8, TensorProto.INT8) if _magnitude(q) + (1 << (k - 1)) <= 127
                          else (np.int16, TensorProto.INT16))
    at = b.node("Gather", [base, index]) if flat else b.node("GatherND", [base, index])
    negative = b.node("Cast", [b.node("Less", [at, get(np.array(0, np.int8))])], to=code_type)
    factor = b.node("Add", [b.node("Mul", [negative, get(np.array(-(1 << k), np_type))]),
                            get(np.array(1 << (k - 1), np_type))])
    value = b.unpack_codes(values, plan.value_bits)
    delta = b.node("Mul", [b.node("Cast", [value], to=code_type), factor])
    widened = base if code_type == TensorProto.INT8 else b.node("Cast", [base], to=code_type)
    if not flat:
        return b.node("ScatterND", [widened, index, delta], reduction="add"), code_type
    codes = b.node("ScatterElements", [widened, index, delta], reduction="add")
    if q.ndim != 1:
        codes = b.node("Reshape", [codes, b.shape_of(q.shape)])
    return codes, code_type


# ---------------------------------------------------------------- block-wise codes

def centred_type(bits: int) -> int:
    """The ONNX integer type that holds code - zero point of `bits`-bit codes (both < 2^bits) without overflow."""
    if bits <= 7:
        return TensorProto.INT8
    return TensorProto.INT16 if bits <= 15 else TensorProto.INT32


def block_index(shared: SharedConstants, length: int, block: int) -> str:
    """int64 [length]: the block of each position along a blocked axis (i // block), computed at load from
    Range by float Div by a power of two and Floor (exact), so it costs no file bytes; shared per length."""

    def build(t: Builder) -> str:
        get = t.shared.get
        values = t.node("Range", [get(np.array(0, np.float32)), get(np.array(length, np.float32)),
                                  get(np.array(1, np.float32))])
        blocks = t.node("Floor", [t.node("Div", [values, get(np.array(block, np.float32))])])
        return t.node("Cast", [blocks], to=TensorProto.INT64)

    return shared.value(("block index", length, block), build)


def decode_blocks(add: Callable[..., str], codes: str, zero: str, scale: str, index: str, axis: int, bits: int,
                  output: str | None = None) -> str:
    """float32 (codes - zero) * scale, with `zero` and `scale` one per block along `axis` and `index` (block_index)
    the block of each position there, as DequantizeLinear with block_size computes it: the difference is exact
    (integer, in centred_type: no overflow) and rounded once by the Mul, so every runtime gives the same bits.
    Gathering the parameters along the axis keeps the weight's shape (no float Reshape) and allows a last partial
    block. `add(op, inputs, output=None, **attrs)` appends a node and returns its output."""
    centred = centred_type(bits)
    per_element = add("Gather", [add("Cast", [zero], to=centred), index], axis=axis)
    difference = add("Cast", [add("Sub", [add("Cast", [codes], to=centred), per_element])], to=TensorProto.FLOAT)
    return add("Mul", [difference, add("Gather", [scale, index], axis=axis)], output=output)


@dataclass
class BlockTables:
    """A block-wise weight stored packed: what its decoder adds, and the values it makes at load."""

    decoder: Decoder
    codes: str  # the unsigned codes, uint8 (uint16 above 8 bits), in the weight's shape
    zero: str  # the unsigned zero codes, same type, the weight's shape with the block axis shortened
    scale: str  # float32 scales, the zero codes' shape
    index: str  # block_index of the block axis


def build_block_tables(b: Builder, codes: np.ndarray, zero_codes: np.ndarray, scale: np.ndarray, axis: int,
                       block: int, bits: int) -> BlockTables:
    """Store unsigned codes and zero codes packed at `bits` (Builder.unpack_codes) and the scales, in b's
    decoder; their values are unpacked at load (folded). Scales on the float16 grid (the block search's, as
    ON_THE_FLY stores them) are stored as float16 and cast to float32 at load (exact)."""
    scale = np.asarray(scale, np.float32)
    half = scale.astype(np.float16)
    if np.array_equal(half.astype(np.float32), scale):
        scales = b.node("Cast", [b.const(half)], to=TensorProto.FLOAT)
    else:
        scales = b.const(scale)
    return BlockTables(b.decoder, b.unpack_codes(codes, bits), b.unpack_codes(zero_codes, bits), scales,
                       block_index(b.shared, codes.shape[axis], block))


def build_block_decoder(index: GraphIndex, shared: SharedConstants, target: str, codes: np.ndarray,
                        zero_codes: np.ndarray, scale: np.ndarray, axis: int, block: int, bits: int) -> Decoder:
    """The float32 weight `target` = (codes - zero) * scale per block, rebuilt at load (folded)."""
    b = Builder(index, shared, "packed")
    tables = build_block_tables(b, codes, zero_codes, scale, axis, block, bits)
    b.decoder.output = decode_blocks(b.node, tables.codes, tables.zero, tables.scale, tables.index, axis, bits,
                                     output=target)
    return b.decoder

"""The memory ONNX Runtime needs to load a model, predicted from its graph without reading its weights.

A session holds the model's initializers (inline and external: the gate loads outputs with the defaults, so
external ones count too; conservative where they are read in place) and, while it loads, every value its constant
folding makes: ONNX Runtime folds each node whose inputs are all constant, in topological order, and keeps every
folded value as an initializer until folding of the whole graph ends (docs/architecture.md, "Load-time memory").
A WEIGHT_QUANT output whose weights decode to float at load (mixed bit, the default strategy's decoders) thus takes
several times its float model's memory to load. What is folded follows onnxruntime's constant_folding.cc:

- a node is folded when every input is an initializer, a Constant, an empty name or a folded value (transitively);
- not folded: nodes with subgraphs (If, Loop, Scan: their bodies' nodes are folded on their own), the
  non-deterministic ops (NOT_FOLDED), and DequantizeLinear, which onnxruntime keeps for its QDQ fusions
  (DequantizeLinear + MatMul becomes MatMulNBits; the integer weight stays as it is);
- Shape is folded when its input's shape is fully known (8 bytes a dim: counted as nothing);
- a block-wise DequantizeLinear read as a MatMul's B is fused into MatMulNBits, which makes its own copy of the
  codes, float32 scales and zero points while the originals are still held (`LoadEstimate.fused`).

The sizes of folded values come from ONNX shape inference on a weight-free copy of the graph (small constants
keep their values, so Reshape targets stored as initializers are read); a value whose shape is not inferred (a
Reshape to a computed shape) counts as its largest input's element count in its own type, and is reported
(`LoadEstimate.unsized`). Shape inference runs without data propagation: with it, MiniLM's mixed-bit output
took 2.3 s and 1.1 GB, without it 0.04 s, and the totals were the same on every model measured.
Measured against ONNX Runtime 1.32's load peaks in docs/results.md, "The gate's load rule for the output".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .model import attribute, inline_bytes, iter_graphs, iter_tensors, subgraphs, weight_free_copy
from .stream import external_bytes, is_external

# The ops onnxruntime's optimizer_utils::IsOperationDeterministic names for the default domain, and the op it keeps
# for QDQ fusion. Ops of other domains count as folded (onnxruntime folds the deterministic ones it lists): an
# overestimate, never an underestimate.
NOT_FOLDED = frozenset({"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial",
                        "Dropout", "DequantizeLinear"})
# What a CPU session takes beyond the model's tensors and the folded values: its allocator arenas, kernels,
# graph copies and thread pools; inline tensors count INLINE_FACTOR times (the parsed message and the tensors
# onnxruntime makes from it: a 699 MB inline file took 974 MB to load), folded values FOLD_FACTOR times (the
# kernels' temporaries while they fold: a block-wise default-strategy decoder's 855 MB of folded values and
# 37 MB of tensors took 1076 MB). Fitted so that no output measured in docs/results.md, "The gate's load rule for
# the output", is predicted low.
SESSION_OVERHEAD = 48 << 20
INLINE_FACTOR = 1.4
FOLD_FACTOR = 1.1


@dataclass(frozen=True)
class LoadEstimate:
    """Bytes an ONNX Runtime CPU session needs while it loads a model: `initializers` (inline and external, with
    Constant values; `inline` of them in the model's message), `folded` (every value constant folding
    materialises, held together), `largest` (the largest folded value: folding copies each result into the
    graph's initializers, so the largest is held twice for a moment), `fused` (the copies QDQ fusion makes of
    block-wise DequantizeLinear weights of MatMuls), `overhead`, and the number of folded values whose shape was
    not inferred (`unsized`, counted at their largest input's size)."""

    initializers: int
    folded: int
    inline: int = 0
    largest: int = 0
    fused: int = 0
    overhead: int = SESSION_OVERHEAD
    unsized: int = 0

    @property
    def total(self) -> int:
        return (int(self.initializers + self.inline * (INLINE_FACTOR - 1) + self.folded * FOLD_FACTOR) + self.largest
                + self.fused + self.overhead)


def _itemsize(data_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 8


# 4-bit types are held two values a byte (numpy's ml_dtypes give them a byte each)
_HALF_BYTE = frozenset(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
                       if hasattr(onnx.TensorProto, n))


def _held_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes ONNX Runtime holds for a stored tensor, inline or external, from its dims and type."""
    if tensor.data_type in _HALF_BYTE:
        return (int(np.prod(tensor.dims, dtype=np.int64)) + 1) // 2
    return external_bytes(tensor) if is_external(tensor) else inline_bytes(tensor)


class _Sizes:
    """Element type and shape of each value, from shape inference on the weight-free graph."""

    def __init__(self, model: onnx.ModelProto):
        self.types: dict[str, tuple[int, list[int] | None]] = {}
        light = weight_free_copy(model)
        with contextlib.suppress(Exception):  # a graph onnx cannot infer: the fallback sizes every folded value
            light = onnx.shape_inference.infer_shapes(light)
        self._add_graph(light.graph)

    def _add_graph(self, graph: onnx.GraphProto) -> None:
        for value in (*graph.input, *graph.value_info, *graph.output):
            tensor_type = value.type.tensor_type
            if not value.type.HasField("tensor_type") or not tensor_type.elem_type:
                continue
            dims = None
            if tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
                dims = dims if all(d >= 0 for d in dims) else None
            self.types.setdefault(value.name, (tensor_type.elem_type, dims))
        for node in graph.node:
            for sub in subgraphs(node):
                self._add_graph(sub)

    def shape(self, name: str) -> list[int] | None:
        return self.types.get(name, (0, None))[1]

    def nbytes(self, name: str) -> int | None:
        elem, dims = self.types.get(name, (0, None))
        if dims is None or not elem:
            return None
        count = int(np.prod(dims, dtype=np.int64))
        return (count + 1) // 2 if elem in _HALF_BYTE else count * _itemsize(elem)

    def count(self, name: str) -> int:
        dims = self.shape(name)
        return 0 if dims is None else int(np.prod(dims, dtype=np.int64))


def predict_load(model: onnx.ModelProto | str) -> LoadEstimate:
    """The LoadEstimate of `model` (a model file is read without its external data)."""
    if isinstance(model, str):
        model = onnx.load(model, load_external_data=False)
    tensors = list(iter_tensors(model.graph))
    inline = sum(_held_bytes(t) for t in tensors if not is_external(t))
    initializers = inline + sum(_held_bytes(t) for t in tensors if is_external(t))
    values: list[int] = []
    sizes = _Sizes(model)
    unsized = _fold(model.graph, set(), sizes, values)
    return LoadEstimate(initializers, sum(values), inline, max(values, default=0), _fused_bytes(model, sizes),
                        unsized=unsized)


def _fused_bytes(model: onnx.ModelProto, sizes: _Sizes) -> int:
    """Bytes of the weights onnxruntime's QDQ fusion makes while the originals are held: a block-wise
    DequantizeLinear of an initializer read as a MatMul's B becomes MatMulNBits with its own copy of the codes,
    float32 scales and the zero points (the 3 GB decoder's ON_THE_FLY int4 output: 447 MB of tensors took 930 MB
    to load)."""
    held = {t.name: t for g in iter_graphs(model.graph) for t in g.initializer}
    total = 0
    for graph in iter_graphs(model.graph):
        weights = {node.input[1] for node in graph.node if node.op_type == "MatMul" and len(node.input) > 1}
        for node in graph.node:
            if (node.op_type != "DequantizeLinear" or not attribute(node, "block_size", 0)
                    or node.output[0] not in weights or node.input[0] not in held):
                continue
            total += _held_bytes(held[node.input[0]])
            scale = held.get(node.input[1])
            total += 4 * (int(np.prod(scale.dims, dtype=np.int64)) if scale is not None else sizes.count(node.input[1]))
            if len(node.input) > 2 and node.input[2] in held:
                total += _held_bytes(held[node.input[2]])
    return total


def predict_unfolded(model: onnx.ModelProto | str, estimate: LoadEstimate | None = None) -> int:
    """Bytes an ONNX Runtime CPU session without constant folding needs to load `model` and run it: the tensors
    (as predict_load counts them), every value computed from constants that a node computed from the inputs reads
    (the decoded weights: a run computes them first, since they read constants only, and each is held until its
    reader has run; all of them held together is the bound), twice the largest value computed from constants
    (a decoder's last intermediate and its result), and the session's overhead. `estimate`: predict_load(model),
    when the caller has it already."""
    if isinstance(model, str):
        model = onnx.load(model, load_external_data=False)
    estimate = estimate or predict_load(model)
    named: dict[str, int] = {}
    _fold(model.graph, set(), _Sizes(model), [], named)
    read = {name for graph in iter_graphs(model.graph) for node in graph.node if not set(node.output) <= set(named)
            for name in node.input}
    read |= {value.name for value in model.graph.output}
    results = sum(nbytes for name, nbytes in named.items() if name in read)
    return int(estimate.initializers + estimate.inline * (INLINE_FACTOR - 1)) + results + 2 * estimate.largest \
        + estimate.fused + estimate.overhead


def folded_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every value constant folding makes when ONNX Runtime loads `model` (LoadEstimate.folded)."""
    values: list[int] = []
    _fold(model.graph, set(), _Sizes(model), values)
    return sum(values)


def _fold(graph: onnx.GraphProto, outer: set[str], sizes: _Sizes, values: list[int],
          named: dict[str, int] | None = None) -> int:
    """Append to `values` the bytes of each value constant folding makes in `graph` and its bodies (`outer`: the
    constant names of the graphs around it), and record them by name in `named` when given; returns how many of
    them were not sized by shape inference."""
    constant = set(outer) | {t.name for t in graph.initializer} | {""}
    counts = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer}
    unsized = 0
    for node in graph.node:
        bodies = subgraphs(node)
        for body in bodies:
            unsized += _fold(body, constant, sizes, values, named)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constant.update(node.output)  # a Constant is an initializer to onnxruntime (counted with them)
            continue
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
            if node.input and sizes.shape(node.input[0]) is not None:
                constant.update(node.output)
            continue
        if (bodies or node.op_type in NOT_FOLDED or not node.input
                or not all(name in constant for name in node.input)):
            continue
        largest = max((counts.get(name, sizes.count(name)) for name in node.input if name), default=0)
        for out in node.output:
            if not out:
                continue
            nbytes = sizes.nbytes(out)
            if nbytes is None:
                elem = sizes.types.get(out, (onnx.TensorProto.FLOAT, None))[0] or onnx.TensorProto.FLOAT
                nbytes, unsized = largest * _itemsize(elem), unsized + 1
            counts[out] = sizes.count(out) if sizes.shape(out) is not None else largest
            values.append(nbytes)
            if named is not None:
                named[out] = nbytes
            constant.add(out)
    return unsized

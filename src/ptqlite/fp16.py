"""--fp16=on: the float32 constants a conversion left unquantized are stored as float16.

Each such initializer is stored in float16 under a new name, and a Cast to float32 writes its original name, so
every op still computes in float32 (ONNX Runtime folds the Cast when it loads the model: the file shrinks, the
graph it runs is the float32 one with weights rounded to float16). Constants whose values do not fit float16
(beyond +-65504, e.g. -1e9 attention masks) and small ones (a Cast costs more than it saves) stay float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .model import GraphIndex, remove_initializers

FLOAT16_MAX = 65504.0
MIN_ELEMENTS = 16  # below this, the Cast node outweighs the two bytes saved per element


def float32_constants(model: onnx.ModelProto) -> set[str]:
    """Names of the model's float32 initializers: what --fp16=on may store as float16 after a conversion."""
    return {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


def store_float16(model: onnx.ModelProto, names: set[str]) -> tuple[int, int, list[str]]:
    """Store the float32 initializers of `model` listed in `names` (the ones the input model had, so quantization
    parameters a pass added stay float32) as float16 behind a Cast, in place. Returns (tensors, bytes saved,
    names kept float32 because their values exceed float16)."""
    graph = model.graph
    index = GraphIndex(graph)
    inputs = {i.name for i in graph.input}
    casts, stored, saved, too_large = [], [], 0, []
    for tensor in graph.initializer:
        if (tensor.name not in names or tensor.data_type != TensorProto.FLOAT or tensor.name in inputs
                or int(np.prod(tensor.dims, dtype=np.int64)) < MIN_ELEMENTS):
            continue
        if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") and slot > 0
               for node, slot in index.consumers.get(tensor.name, [])):
            continue  # a scale: the quantized op reads it as float32
        values = numpy_helper.to_array(tensor)
        finite = values[np.isfinite(values)]
        if finite.size and float(np.abs(finite).max()) > FLOAT16_MAX:
            too_large.append(tensor.name)
            continue
        half = index.unique_name(f"{tensor.name}_fp16")
        stored.append(numpy_helper.from_array(values.astype(np.float16), half))
        casts.append(helper.make_node("Cast", [half], [tensor.name], to=TensorProto.FLOAT))
        saved += values.nbytes - values.size * 2
    if not casts:
        return 0, 0, too_large
    moved = {c.output[0] for c in casts}
    remove_initializers(graph, moved)
    graph.initializer.extend(stored)
    nodes = casts + list(graph.node)  # the Casts read constants only, so they go first
    del graph.node[:]
    graph.node.extend(nodes)
    return len(casts), saved, too_large

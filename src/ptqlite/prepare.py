"""Graph preparation before full quantization: fold what is constant, fold BatchNormalization into Conv, give
each Conv/Gemm its own bias, and infer tensor types, so that activations are quantized where the runtime will
compute them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from .model import GraphIndex, attribute, outer_reads, remove_initializers, subgraphs, weight_free_copy

log = logging.getLogger(__name__)

# Ops never folded even when every input is constant: random ops would change from run to run.
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def prepare(model: onnx.ModelProto, ranks: dict[str, int] | None = None) -> dict[str, int]:
    """Rewrite `model` in place; returns the element type of every tensor whose type is known (see tensor_types
    for `ranks`)."""
    fold_constants(model)
    fold_batch_norm(model)
    unshare_biases(model)
    fold_pads(model)
    return tensor_types(model, ranks)


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate nodes whose inputs are all constants and store their outputs as initializers (shape arithmetic
    and padding tables exported by PyTorch, for instance). Returns the number of nodes folded."""
    graph = model.graph
    values: dict[str, np.ndarray] = {}
    known = {t.name for t in graph.initializer}
    index = GraphIndex(graph)
    keep, folded = [], 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        foldable = (node.op_type not in _NEVER_FOLD and node.domain in ("", "ai.onnx")
                    and all(name in known for name in inputs)
                    and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                for a in node.attribute)
                    and not any(name in index.graph_output_names for name in node.output))
        if foldable:
            feeds = {name: values[name] if name in values else index.array(name) for name in inputs}
            try:
                outputs = ReferenceEvaluator(node).run(None, feeds)
            except Exception as exc:  # noqa: BLE001 -- an op the reference evaluator lacks: keep the node
                log.debug("constant folding skipped %s (%s)", node.name or node.op_type, exc)
                outputs = None
            if outputs is not None:
                for name, value in zip(node.output, outputs):
                    values[name] = np.asarray(value)
                    known.add(name)
                folded += 1
                continue
        keep.append(node)
    if folded:
        used = {name for node in keep for name in node.input}
        used |= {name for node in keep for sub in subgraphs(node) for name in outer_reads(sub)}
        graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in values if name in used)
        del graph.node[:]
        graph.node.extend(keep)
        drop_unused_initializers(graph)
    return folded


def fold_pads(model: onnx.ModelProto) -> int:
    """A zero-constant Pad of the spatial axes only, read by one Conv or (count_include_pad=1) AveragePool, becomes
    that op's `pads`: TF and Paddle exports write "same" padding as an explicit Pad, which would otherwise get a
    QuantizeLinear/DequantizeLinear pair of its own and run as a separate op (onnxruntime's own pre-processing
    folds it the same way). Returns the number of Pads folded."""
    graph = model.graph
    index = GraphIndex(graph)
    dropped = set()
    for node in graph.node:
        if node.op_type != "Pad" or node.output[0] in index.graph_output_names:
            continue
        users = index.consumers.get(node.output[0], [])
        if len(users) != 1 or users[0][1] != 0:
            continue
        user = users[0][0]
        pads = _zero_spatial_pads(node, index)
        if pads is None or not _takes_pads(user):
            continue
        rank = len(pads) // 2
        spatial = rank - 2
        begin, end = pads[2:rank], pads[rank + 2:]
        old = list(attribute(user, "pads", [0] * (2 * spatial)))
        new = [a + b for a, b in zip(old, list(begin) + list(end))]
        _set_ints(user, "pads", new)
        user.input[0] = node.input[0]
        dropped.add(id(node))
    if dropped:
        keep = [n for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(keep)
        drop_unused_initializers(graph)
    return len(dropped)


def _zero_spatial_pads(node: onnx.NodeProto, index: GraphIndex) -> list[int] | None:
    """The Pad's non-negative pads when it pads only axes 2.. with zeros (mode constant), else None."""
    if attribute(node, "mode", b"constant") not in (b"constant", "constant"):
        return None
    if len(node.input) > 3 and node.input[3]:  # axes (opset 18): not used by the exports seen; keep the Pad
        return None
    if len(node.input) > 1:  # opset 11+: pads and constant_value are inputs
        if node.input[1] not in index.initializers:
            return None
        pads = [int(v) for v in index.array(node.input[1]).ravel()]
        value = node.input[2] if len(node.input) > 2 else ""
        if value and (value not in index.initializers or np.any(index.array(value) != 0)):
            return None
    else:
        pads = list(attribute(node, "pads", []))
        if attribute(node, "value", 0.0) != 0.0:
            return None
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads) or any(pads[i] or pads[rank + i] for i in (0, 1)):
        return None
    return pads


def _takes_pads(node: onnx.NodeProto) -> bool:
    if attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return False
    if node.op_type == "Conv":
        return True
    # AveragePool divides by the window size including the padding only with count_include_pad=1, which is what
    # the explicit zeros did.
    return node.op_type == "AveragePool" and attribute(node, "count_include_pad", 0) == 1


def _set_ints(node: onnx.NodeProto, name: str, values: list[int]) -> None:
    for attr in list(node.attribute):
        if attr.name in (name, "auto_pad"):
            node.attribute.remove(attr)
    node.attribute.append(onnx.helper.make_attribute(name, values))


def fold_batch_norm(model: onnx.ModelProto) -> int:
    """Conv -> BatchNormalization (inference form, constant statistics) becomes one Conv with scaled weights."""
    graph = model.graph
    index = GraphIndex(graph)
    removed, folded = set(), 0
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or bn.input[0] not in index.producer:
            continue
        conv = index.producer[bn.input[0]]
        params = bn.input[1:5]
        if (conv.op_type != "Conv" or len(index.consumers[conv.output[0]]) != 1
                or conv.output[0] in index.graph_output_names or conv.input[1] not in index.initializers
                or not all(p in index.initializers for p in params)
                or len(index.consumers[conv.input[1]]) != 1):
            continue
        gamma, beta, mean, var = (index.array(p).astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
        w = index.array(conv.input[1])
        bias = index.array(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        w_new = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        b_new = ((bias - mean) * factor + beta).astype(np.float32)
        _set_initializer(index, conv.input[1], w_new)
        b_name = index.unique_name(conv.input[1] + "_bn_bias")
        graph.initializer.append(numpy_helper.from_array(b_new, b_name))
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = b_name
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    if folded:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
        drop_unused_initializers(graph)
    return folded


def unshare_biases(model: onnx.ModelProto) -> int:
    """Give each Conv / ConvTranspose / Gemm its own bias initializer. Converters store identical constants once
    (tf2onnx makes every all-zero bias of a TFLite model one tensor), but an int8 bias is requantized with its
    own node's scales, so a shared bias kept every node reading it float. Returns the number of copies made."""
    graph = model.graph
    index = GraphIndex(graph)
    readers = {name: len(uses) for name, uses in index.consumers.items()}
    copies = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3:
            continue
        bias = node.input[2]
        if bias not in index.initializers or readers.get(bias, 0) < 2:
            continue
        copy = TensorProto()
        copy.CopyFrom(index.initializers[bias])
        copy.name = index.unique_name(f"{bias}_{node.name or node.output[0]}")
        graph.initializer.append(copy)
        node.input[2] = copy.name
        readers[bias] -= 1  # the last reader keeps the original
        copies += 1
    return copies


def tensor_types(model: onnx.ModelProto, ranks: dict[str, int] | None = None) -> dict[str, int]:
    """Element type of each tensor: from the graph's declarations and onnx shape inference. `ranks`, when given,
    is refilled with the rank of every tensor whose shape is known, from the same inference."""
    try:
        # on a copy without the large weights: the same inferred types (it reads only small constants' values)
        inferred = shape_inference.infer_shapes(weight_free_copy(model), strict_mode=False)
        infos = list(inferred.graph.value_info)
    except Exception as exc:  # noqa: BLE001 -- fails on some custom ops; declared types still count
        log.debug("shape inference failed: %s", exc)
        infos = list(model.graph.value_info)
    types = {}
    if ranks is not None:
        ranks.clear()
    for info in [*model.graph.input, *model.graph.output, *infos]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
        if ranks is not None and info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    for tensor in model.graph.initializer:
        types[tensor.name] = tensor.data_type
    return types


def is_float(types: dict[str, int], name: str) -> bool:
    return types.get(name) == TensorProto.FLOAT


def _set_initializer(index: GraphIndex, name: str, value: np.ndarray) -> None:
    index.initializers[name].CopyFrom(numpy_helper.from_array(value, name))


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove the initializers that no node reads (in this graph or, from the outer scope, in its subgraphs) and
    no graph output names."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    used |= {name for node in graph.node for sub in subgraphs(node) for name in outer_reads(sub)}
    removed = {t.name for t in graph.initializer if t.name not in used}
    if not removed:
        return
    remove_initializers(graph, removed)
    # IR < 4 models list initializers as inputs too; drop the entries of removed initializers.
    for position in reversed([i for i, value in enumerate(graph.input) if value.name in removed]):
        del graph.input[position]

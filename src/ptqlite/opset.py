"""Raising a model's default-domain opset without serialising its weights.

onnx's version converter works on a serialised copy of the whole model: it fails above 2 GB and, below that, the
copies cost several times the model's memory. Between opset 13 and 21 most operator revisions only add types or
optional attributes and inputs whose defaults keep the old behaviour; a model made only of such operators (the
graphs ptqlite writes and most exported transformers) keeps its meaning when the opset_import alone is raised.
Two revisions change a node's form but not its meaning and are rewritten here: Reduce* (opset 18: `axes` moved
from an attribute to an input) and Split (opset 18: `num_outputs` needed when no `split` input is given). Any other
revision in between (semantics changed, or not listed here) sends the graph through the converter, with every
initializer replaced by a data-less placeholder, so the converter still never sees the weights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper

from .errors import ConversionError

# The revisions between opset 14 and 21 that only add types, or attributes and inputs whose defaults keep the old
# behaviour (onnx docs/Changelog.md). Opsets below 13 (Softmax, Squeeze, Unsqueeze changed there) always convert.
_TYPES_OR_DEFAULTS: dict[int, frozenset[str]] = {
    14: frozenset({"Add", "CumSum", "Div", "GRU", "Identity", "LSTM", "Mul", "RNN", "Relu", "Reshape", "Sub"}),
    15: frozenset({"BatchNormalization", "Pow", "Shape"}),
    16: frozenset({"GreaterOrEqual", "Identity", "If", "LeakyRelu", "LessOrEqual", "Loop", "PRelu", "Scan",
                   "ScatterElements", "ScatterND", "Where"}),
    18: frozenset({"LpPool", "OptionalGetElement", "OptionalHasElement", "Pad", "Resize", "ScatterElements",
                   "ScatterND"}),
    19: frozenset({"AveragePool", "Cast", "CastLike", "Constant", "DequantizeLinear", "Equal", "Identity", "If",
                   "Loop", "Pad", "QuantizeLinear", "Reshape", "Resize", "Scan", "Shape", "Size"}),
    20: frozenset({"ConstantOfShape", "IsInf", "IsNaN", "ReduceMax", "ReduceMin"}),
    21: frozenset({"Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten", "Identity",
                   "If", "Loop", "Pad", "QLinearMatMul", "QuantizeLinear", "Reshape", "Scan", "Shape", "Size",
                   "Squeeze", "Transpose", "Unsqueeze"}),
}
_REDUCE_18 = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                        "ReduceMin", "ReduceProd", "ReduceSumSquare"})
DIRECT_FROM, DIRECT_TO = 13, 21
_PLACEHOLDER = "ptqlite-placeholder"


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def raise_opset(model: onnx.ModelProto, target: int) -> str:
    """Raise the default-domain opset of `model` to `target` in place; returns "direct" when only the opset_import
    changed (and Reduce*/Split nodes were rewritten), "converter" when onnx's converter ran on the weight-free
    graph. Raises ConversionError when neither works."""
    old = default_opset(model)
    if old >= target:
        return "direct"
    blockers = changed_ops(model.graph, old, target)
    if not blockers:
        _rewrite_forms(model.graph, old, target)
        _set_opset(model, target)
        return "direct"
    _convert_without_weights(model, target)
    return "converter"


def changed_ops(graph: onnx.GraphProto, old: int, target: int) -> list[str]:
    """The op types of `graph` (subgraphs included) whose meaning may change between `old` and `target`, as
    'Op (opset N)'; empty when raising the opset_import alone keeps the model's meaning."""
    if old < DIRECT_FROM or target > DIRECT_TO:
        return [f"opset {old} -> {target} (only {DIRECT_FROM}..{DIRECT_TO} is raised directly)"]
    blockers: list[str] = []
    seen: set[str] = set()
    for node in _nodes(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type in seen:
            continue
        seen.add(node.op_type)
        try:
            revisions = _revisions(node.op_type, old, target)
        except defs.SchemaError:
            blockers.append(f"{node.op_type} (unknown at opset {old})")
            continue
        for version in revisions:
            if node.op_type in _TYPES_OR_DEFAULTS.get(version, ()):
                continue
            if version == 18 and node.op_type in _REDUCE_18 | {"Split"}:
                continue  # rewritten by _rewrite_forms
            if version == 14 and node.op_type == "BatchNormalization" and _inference_batchnorms(graph):
                continue
            blockers.append(f"{node.op_type} (opset {version})")
    return blockers


def _revisions(op: str, old: int, target: int) -> list[int]:
    first = defs.get_schema(op, old).since_version
    return sorted({defs.get_schema(op, v).since_version for v in range(old + 1, target + 1)} - {first})


def _inference_batchnorms(graph: onnx.GraphProto) -> bool:
    # Before opset 14 BatchNormalization had training outputs (saved mean and variance) that 14 removed.
    return all(len([o for o in n.output if o]) == 1 for n in _nodes(graph) if n.op_type == "BatchNormalization")


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _nodes(sub)


def _rewrite_forms(graph: onnx.GraphProto, old: int, target: int) -> None:
    """Reduce* `axes` attribute -> constant input, Split without `split` input -> `num_outputs` (opset 18)."""
    if old < 18 <= target:
        used = {name for node in _nodes(graph) for name in (*node.input, *node.output)}
        _rewrite_graph(graph, used | {t.name for t in graph.initializer} | {i.name for i in graph.input})


def _rewrite_graph(graph: onnx.GraphProto, used: set[str]) -> None:
    constants = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _rewrite_graph(sub, used)
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _REDUCE_18:
            axes = [a for a in node.attribute if a.name == "axes"]
            if axes:
                values = np.array(list(axes[0].ints), np.int64)
                node.attribute.remove(axes[0])
                name, counter = f"{node.name or node.output[0]}_axes", 1
                while name in used:
                    name, counter = f"{node.name or node.output[0]}_axes_{counter}", counter + 1
                used.add(name)
                constants.append(helper.make_node("Constant", [], [name],
                                                  value=numpy_helper.from_array(values, name)))
                node.input.append(name)
        elif (node.op_type == "Split" and (len(node.input) < 2 or not node.input[1])
              and not any(a.name == "num_outputs" for a in node.attribute)):
            node.attribute.append(helper.make_attribute("num_outputs", len(node.output)))
    for index, constant in enumerate(constants):  # first in the graph: read before any node needs them
        graph.node.insert(index, constant)


def _set_opset(model: onnx.ModelProto, target: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
            break
    else:
        model.opset_import.append(helper.make_opsetid("", target))
    # The opset needs an IR version that knows it (opset 21: IR 10, which also has int4 tensors).
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True))


def _convert_without_weights(model: onnx.ModelProto, target: int) -> None:
    """onnx's converter on a copy of the graph whose initializers are data-less placeholders (external data
    pointing nowhere, which the converter carries through untouched); the weights stay where they are."""
    from onnx import version_converter

    light = onnx.ModelProto()
    _copy_without_initializers(model, light)
    try:
        converted = version_converter.convert_version(light, target)
    except Exception as exc:  # noqa: BLE001  (the converter raises many types)
        raise ConversionError(f"cannot raise the model's opset to {target} ({exc})") from None
    originals = {t.name for t in model.graph.initializer}
    added = [t for t in converted.graph.initializer if not _is_placeholder(t)]
    kept = {t.name for t in converted.graph.initializer if _is_placeholder(t)}
    if originals - kept:  # the converter dropped some: rebuild the list without them
        remaining = [t for t in model.graph.initializer if t.name in kept]
        del model.graph.initializer[:]
        model.graph.initializer.extend(remaining)
    model.graph.initializer.extend(added)
    for field in ("node", "input", "output", "value_info"):
        getattr(model.graph, field).__delitem__(slice(None))
        getattr(model.graph, field).extend(getattr(converted.graph, field))
    del model.opset_import[:]
    model.opset_import.extend(converted.opset_import)
    _set_opset(model, target)


def _copy_without_initializers(model: onnx.ModelProto, light: onnx.ModelProto) -> None:
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        graph.initializer.append(_placeholder(tensor))


def _placeholder(tensor: onnx.TensorProto) -> onnx.TensorProto:
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", _PLACEHOLDER
    return stub


def _is_placeholder(tensor: onnx.TensorProto) -> bool:
    return any(e.key == "location" and e.value == _PLACEHOLDER for e in tensor.external_data)

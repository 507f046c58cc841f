"""Local error of each quantized node: the node as the quantized graph runs it (quantized weights, its inputs
through their own quantizers, its output through its own), fed with the float model's values, so what it shows is
the error this node introduces, not what it inherits from the nodes before it.

Built on names only, for every quant mode: one model holds the float graph and, beside it, copies of the quantized
graph's nodes. A copy reads a value of the float graph wherever the quantized graph reads a tensor of the same name
that the float graph computes (an activation), so everything upstream of the node is float; weights, codes and
decoders come from the quantized graph. For a tensor T compared in the reports, the value its consumer reads in the
quantized graph (e.g. T's DequantizeLinear output) is rebuilt from the first node before it that is not a
QuantizeLinear/DequantizeLinear: that node runs on the float-fed copies of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import AttributeProto

# Nodes that only carry a value between its producer and its consumer (looked through to find the node at work).
_PASS_THROUGH = frozenset({"QuantizeLinear", "DequantizeLinear"})
_PREFIX = "ptqlite_local"


@dataclass(frozen=True)
class LocalValues:
    model: onnx.ModelProto  # the float model plus the float-fed copies
    names: dict[str, str]  # quantized-graph tensor (a reports counterpart) -> its local value in `model`
    nodes: dict[str, str]  # the same keys -> name of the quantized-graph node that was run on float inputs


def local_values(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                 counterparts: list[str]) -> LocalValues:
    """The float model with, for each counterpart (a tensor of the quantized graph), its value computed by the node
    that makes it on float inputs. Counterparts that cannot be rebuilt (a node with a subgraph on the way, an
    unknown tensor) are left out."""
    combined = onnx.ModelProto()
    combined.CopyFrom(float_model)
    graph = combined.graph
    float_inits = {t.name for t in graph.initializer}
    float_values = {v.name for v in graph.input if v.name not in float_inits}
    float_values |= {o for n in graph.node for o in n.output if o}
    taken = float_inits | float_values | {n.name for n in graph.node}
    prefix = _PREFIX
    while any(name.startswith(prefix) for name in taken):
        prefix += "_"

    qgraph = quant_model.graph
    q_inits = {t.name: t for t in qgraph.initializer}
    producer = {o: node for node in qgraph.node for o in node.output if o}
    added_inits: dict[str, str] = {}
    memo: dict[tuple[str, str], str | None] = {}

    def constant(name: str) -> str:
        if name not in added_inits:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(q_inits[name])
            tensor.name = added_inits[name] = f"{prefix}/q/{name}"
            graph.initializer.append(tensor)
        return added_inits[name]

    def copy(node: onnx.NodeProto, tag: str, inputs: list[str | None]) -> onnx.NodeProto | None:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute) or None in inputs:
            return None
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = f"{prefix}/{tag}/{node.name or node.output[0]}"
        del twin.input[:]
        twin.input.extend(inputs)
        del twin.output[:]
        twin.output.extend(f"{prefix}/{tag}/{o}" if o else "" for o in node.output)
        graph.node.append(twin)
        for o in node.output:
            if o:
                memo[tag, o] = f"{prefix}/{tag}/{o}"
        return twin

    def iso(name: str) -> str | None:
        """`name` of the quantized graph with every float activation taken from the float graph."""
        if not name:
            return ""
        if name in float_values:
            return name
        if name in q_inits:
            return constant(name)
        if ("iso", name) not in memo:
            node = producer.get(name)
            memo["iso", name] = None  # cut cycles (not expected in a valid graph)
            if node is not None:
                copy(node, "iso", [iso(i) for i in node.input])
        return memo["iso", name]

    def local(name: str) -> tuple[str | None, onnx.NodeProto | None]:
        """`name` rebuilt from the first node before it that is not a quantizer, run on float-fed inputs."""
        if ("loc", name) in memo:
            return memo["loc", name], at_work.get(name)
        node = producer.get(name)
        if node is None:
            return iso(name), None
        if node.op_type in _PASS_THROUGH:
            head, worker = local(node.input[0])
            inputs = [head, *(iso(i) for i in node.input[1:])]
        else:
            worker = node
            inputs = [iso(i) for i in node.input]
        memo["loc", name] = None
        if copy(node, "loc", inputs) is not None:
            at_work.update((o, worker) for o in node.output if o)
        return memo["loc", name], worker

    at_work: dict[str, onnx.NodeProto | None] = {}
    names, nodes = {}, {}
    for counterpart in dict.fromkeys(counterparts):
        value, worker = local(counterpart)
        if value is not None:
            names[counterpart] = value
            nodes[counterpart] = worker.name if worker is not None else ""
    _merge_imports(combined, quant_model)
    return LocalValues(combined, names, nodes)


def _merge_imports(combined: onnx.ModelProto, quant_model: onnx.ModelProto) -> None:
    """Opsets of the quantized graph (a pass may have raised the default one), its functions, the newer IR."""
    versions = {o.domain: o.version for o in combined.opset_import}
    for opset in quant_model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del combined.opset_import[:]
    combined.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())
    have = {(f.domain, f.name) for f in combined.functions}
    combined.functions.extend(f for f in quant_model.functions if (f.domain, f.name) not in have)
    combined.ir_version = max(combined.ir_version, quant_model.ir_version)

"""FULL_QUANT planning: which nodes of the prepared float graph run in int8, and which activation tensors get a
QuantizeLinear/DequantizeLinear pair (docs/full_quant.md, "Which ops run in int8").

"compute" nodes get their own output parameters, "shared" nodes (Reshape, MaxPool...) reuse their input's, "float"
nodes stay float: skip_quant_node, ops without int8 kernels on the preset, Softmax on most presets, ops that no int8
op reads. The plan is pure data; statistics, parameters and the rewrite read it and never change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ...model import GraphIndex, attribute
from ...plan import WeightSpec
from ...prepare import is_float
from ...targets import FUSABLE_ACTIVATIONS, WEIGHTED_OPS, Target

# Ops whose every float input is data to quantize; the others quantize input 0 only (Clip bounds, Resize scales,
# normalisation weights stay float).
ALL_INPUTS = {"Add", "Mul", "Sub", "Div", "Concat", "PRelu"}
# Ops that only reshape or rename a tensor: a chain of them may carry a weighted op's float output to the graph.
_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
# A Softmax input at or below -MASK_VALUE is an additive attention mask (exp(-1e4) is 0 in float32).
MASK_VALUE = 1e4
# An int8 Concat output has one scale: inputs whose ranges differ by more than this factor would keep 4 bits or
# fewer of the narrow one (a YOLO head joins box coordinates of 0..320 pixels and class scores of 0..1; in int8
# every score became 0 or 1.25).
CONCAT_SPREAD = 16.0


@dataclass(frozen=True)
class GraphPlan:
    """Decisions on the prepared float graph (node positions index graph.node)."""

    roles: tuple[str, ...]  # per node: "compute", "shared" or "float"
    tensors: dict[str, str] = field(default_factory=dict)  # quantized activation -> tensor giving its range
    fused: dict[str, int] = field(default_factory=dict)  # activation output -> position of a fusable Relu/Clip
    weights: dict[str, WeightSpec] = field(default_factory=dict)



def plan_graph(model: onnx.ModelProto, types: dict[str, int], weights: list[WeightSpec], preset: Target,
               skip: set[str]) -> GraphPlan:
    """Which nodes run in int8 and which activation tensors get a QDQ pair."""
    graph = model.graph
    index = GraphIndex(graph)
    weight_specs = {s.tensor: s for s in weights}

    def is_activation(name: str) -> bool:
        return bool(name) and is_float(types, name) and name not in index.initializers

    roles: list[str] = []
    producer_role: dict[str, str] = {}
    for node in graph.node:
        role = "float"
        op = node.op_type
        if node.name and node.name in skip:
            role = "float"
        elif op in WEIGHTED_OPS:
            role = "compute" if _weighted_ok(node, index, weight_specs, is_activation) else "float"
        elif op in preset.compute_ops:
            data = _data_inputs(node)
            if data and any(is_activation(n) for n in data) and all(
                    is_activation(n) or (n in index.initializers and is_float(types, n)) for n in data):
                role = "compute"
            if op == "Clip" and not _constant_bounds(node, index):
                role = "float"
            # A Relu/Clip after a float op stays float too: quantizing its unbounded input would waste the codes
            # on values it then clips (measured on MobileNet V2 with the first conv skipped: cosine 0.981).
            if op in FUSABLE_ACTIVATIONS and producer_role.get(node.input[0], "float") == "float":
                role = "float"
        elif (op in preset.shared_ops and is_activation(node.input[0])
              and producer_role.get(node.input[0]) in ("compute", "shared")):
            role = "shared"
        if role != "float" and not all(is_float(types, o) for o in node.output):
            role = "float"
        roles.append(role)
        for out in node.output:
            producer_role[out] = role

    tails = _float_tails(graph, index, roles, preset.float_output_ops)
    for pos in tails:
        roles[pos] = "float"
    positions = {id(n): i for i, n in enumerate(graph.node)}
    _demote_unread(graph, index, roles, positions)
    fused: dict[str, int] = {}
    for pos, node in enumerate(graph.node):
        if roles[pos] == "compute" and node.op_type in FUSABLE_ACTIVATIONS:
            src = node.input[0]
            prod = index.producer.get(src)
            if (prod is not None and producer_role.get(src) == "compute" and prod.op_type not in FUSABLE_ACTIVATIONS
                    and len(index.consumers[src]) == 1 and src not in index.graph_output_names):
                fused[node.output[0]] = pos

    pre_activation = {graph.node[pos].input[0] for pos in fused.values()}
    wanted: list[str] = []
    for value in graph.input:
        if is_activation(value.name) and _read_as_data(value.name, index, roles, positions):
            wanted.append(value.name)
    for pos, node in enumerate(graph.node):
        for out in node.output:
            if not is_activation(out) or out in pre_activation:
                continue
            # A MatMul/Gemm that no int8 op reads keeps a float output (int8 kernel with float output).
            if roles[pos] == "compute" and node.op_type in preset.float_output_ops \
                    and (_output_only(out, index, roles, positions)
                         or (out not in index.graph_output_names
                             and not _read_as_data(out, index, roles, positions))):
                continue
            if roles[pos] != "float" or _read_as_data(out, index, roles, positions):
                wanted.append(out)
    tensors: dict[str, str] = {}
    for name in wanted:
        prod = index.producer.get(name)
        if prod is not None and roles[positions[id(prod)]] == "shared" and prod.input[0] in tensors:
            tensors[name] = tensors[prod.input[0]]
        else:
            tensors[name] = name
    return GraphPlan(tuple(roles), tensors, fused, weight_specs)


def _demote_unread(graph: onnx.GraphProto, index: GraphIndex, roles: list[str], positions: dict[int, int]) -> None:
    """An unweighted op computes in int8 only when an int8 op reads its output: otherwise its quantized output
    would be dequantized at once, losing precision for nothing. Consumers come later in graph.node, so one
    backward sweep settles chains (e.g. attention's scale Mul -> mask Add -> float Softmax: quantizing that Add's
    output would spend all 256 codes on the mask's -3.4e38)."""
    for pos in reversed(range(len(graph.node))):
        node = graph.node[pos]
        if roles[pos] == "float" or node.op_type in WEIGHTED_OPS:
            continue
        if any(o in index.graph_output_names or _read_as_data(o, index, roles, positions) for o in node.output):
            continue
        roles[pos] = "float"


def _output_only(name: str, index: GraphIndex, roles: list[str], positions: dict[int, int]) -> bool:
    """True when `name` only reaches graph outputs, through float nodes that merely move values."""
    if name in index.graph_output_names:
        return not index.consumers.get(name)
    users = index.consumers.get(name, [])
    return bool(users) and all(
        roles[positions[id(n)]] == "float" and n.op_type in _SHAPE_OPS and slot == 0
        and all(_output_only(o, index, roles, positions) for o in n.output) for n, slot in users)


def _float_tails(graph: onnx.GraphProto, index: GraphIndex, roles: list[str],
                 float_output_ops: frozenset[str]) -> list[int]:
    """Shared nodes (Flatten, Reshape, Identity...) between a MatMul/Gemm and a graph output: they stay float so
    that its output is not quantized (logits keep full precision; onnxruntime runs it as an int8 kernel with
    float output)."""
    positions = {id(n): i for i, n in enumerate(graph.node)}
    tails: list[int] = []
    trial = list(roles)
    for pos in reversed(range(len(graph.node))):
        node = graph.node[pos]
        if roles[pos] == "shared" and node.op_type in _SHAPE_OPS:
            trial[pos] = "float"
            if all(_output_only(o, index, trial, positions) for o in node.output):
                tails.append(pos)
                continue
            trial[pos] = roles[pos]
    # Keep only chains that start at a weighted op: elsewhere the integer tensor may as well stay integer.
    keep = []
    for pos in tails:
        src = graph.node[pos].input[0]
        while (prod := index.producer.get(src)) is not None and positions[id(prod)] in tails:
            src = prod.input[0]
        if prod is not None and prod.op_type in float_output_ops and roles[positions[id(prod)]] == "compute":
            keep.append(pos)
    return keep


def _weighted_ok(node: onnx.NodeProto, index: GraphIndex, specs: dict[str, WeightSpec], is_activation) -> bool:
    if len(node.input) < 2 or not is_activation(node.input[0]):
        return False
    weight = node.input[1]
    if node.op_type == "MatMul":
        return weight in specs or is_activation(weight)
    if weight not in specs:
        return False
    if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                                   or attribute(node, "beta", 1.0) != 1.0):
        return False
    # The bias becomes int32 with a scale of its own node: it must be a 1-D constant used by this node alone.
    bias = node.input[2] if len(node.input) > 2 else ""
    return not bias or (bias in index.initializers and len(index.initializers[bias].dims) == 1
                        and len(index.consumers[bias]) == 1)


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    if node.op_type in ALL_INPUTS:
        return [n for n in node.input if n]
    return [node.input[0]] if node.input and node.input[0] else []


def data_slots(node: onnx.NodeProto) -> list[int]:
    if node.op_type in WEIGHTED_OPS:
        return [0, 1] if node.op_type == "MatMul" else [0]
    if node.op_type in ALL_INPUTS:
        return [i for i, n in enumerate(node.input) if n]
    return [0]


def _read_as_data(name: str, index: GraphIndex, roles: list[str], positions: dict[int, int]) -> bool:
    """True when an int8 node reads `name` as one of its quantized inputs."""
    for node, slot in index.consumers.get(name, []):
        if roles[positions[id(node)]] != "float" and slot in data_slots(node):
            return True
    return False


def _constant_bounds(node: onnx.NodeProto, index: GraphIndex) -> bool:
    return all(not n or n in index.initializers for n in node.input[1:3])


def clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, np.inf
    lo, hi = attribute(node, "min", -np.inf), attribute(node, "max", np.inf)
    if len(node.input) > 1 and node.input[1]:
        lo = float(index.array(node.input[1]))
    if len(node.input) > 2 and node.input[2]:
        hi = float(index.array(node.input[2]))
    return lo, hi


def masked_softmax(model: onnx.ModelProto, plan: GraphPlan, ranges: dict[str, tuple[float, float]]) -> set[str]:
    """int8 Softmax nodes (presets that quantize Softmax) whose calibrated input reaches -MASK_VALUE or below: in
    float32 exp(-1e4) is 0, so such values are an attention mask, not logits, and quantizing them would leave the
    real scores a handful of codes (MiniLM, DSP preset: sentence cosine 0.11)."""
    masked = set()
    for pos, node in enumerate(model.graph.node):
        if node.op_type == "Softmax" and plan.roles[pos] == "compute" and node.name:
            source = plan.tensors.get(node.input[0])
            if source in ranges and ranges[source][0] <= -MASK_VALUE:
                masked.add(node.name)
    return masked


def correctable_nodes(model: onnx.ModelProto, plan: GraphPlan) -> list[int]:
    """Weighted int8 nodes whose bias can absorb a per-channel correction."""
    return [pos for pos, node in enumerate(model.graph.node)
            if plan.roles[pos] == "compute" and node.op_type in ("Conv", "ConvTranspose", "Gemm")]


def wide_concats(model: onnx.ModelProto, plan: GraphPlan, ranges: dict[str, tuple[float, float]]) -> set[str]:
    """int8 Concat nodes whose quantized inputs' calibrated ranges differ by more than CONCAT_SPREAD."""
    wide = set()
    for pos, node in enumerate(model.graph.node):
        if node.op_type != "Concat" or plan.roles[pos] != "compute" or not node.name:
            continue
        spans = [max(hi, 0.0) - min(lo, 0.0) for lo, hi in
                 (ranges[plan.tensors[name]] for name in node.input if plan.tensors.get(name) in ranges)]
        if len(spans) >= 2 and min(spans) > 0 and max(spans) / min(spans) > CONCAT_SPREAD:
            wide.add(node.name)
    return wide

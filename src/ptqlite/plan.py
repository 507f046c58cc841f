"""Which constant weights get quantized, along which axis, and why the others are skipped.

The plan is pure data: the passes read it, and the report prints it.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from .config import QuantConfig
from .model import GraphIndex, all_nodes, attribute

log = logging.getLogger(__name__)

# op type -> input slots that hold weights (when they are constants)
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "MatMul": (0, 1),
    "Gemm": (0, 1),
    "Gather": (0,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}
CONV_OPS = ("Conv", "ConvTranspose")


def channel_axis(node: onnx.NodeProto, slot: int, rank: int) -> int:
    """The axis of a weight that indexes the op's output channels (one scale per slice along it)."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "MatMul":
        return rank - 1 if slot == 1 else rank - 2
    if op == "Gemm":
        transposed = attribute(node, "transB" if slot == 1 else "transA", 0)
        if slot == 1:
            return 0 if transposed else 1
        return 1 if transposed else 0
    if op == "Gather":
        return attribute(node, "axis", 0) % rank
    return 1  # LSTM/GRU/RNN: [directions, gates*hidden, size]


def output_channels(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    if node.op_type == "ConvTranspose":
        return shape[1] * attribute(node, "group", 1)
    return shape[0]


@dataclass
class WeightSpec:
    """One constant weight and what to do with it."""

    tensor: str
    op_type: str
    nodes: tuple[str, ...]
    shape: tuple[int, ...]
    bits: int = 0
    axis: int | None = None  # per-channel axis; None = one scale for the tensor
    correction_axis: int | None = None  # axis along which bias correction works
    skip_reason: str = ""

    @property
    def quantized(self) -> bool:
        return not self.skip_reason

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class WeightPlan:
    specs: list[WeightSpec] = field(default_factory=list)

    @property
    def quantized(self) -> list[WeightSpec]:
        return [s for s in self.specs if s.quantized]

    @property
    def skipped(self) -> list[WeightSpec]:
        return [s for s in self.specs if not s.quantized]


def plan_weights(model: onnx.ModelProto, config: QuantConfig, *, apply_size_filters: bool = True,
                 per_channel: bool = True, ops: tuple[str, ...] | None = None) -> WeightPlan:
    """Decide, for every constant weight of a weighted op, whether and how it is quantized."""
    index = GraphIndex(model.graph)
    common = config.common
    skip_nodes = set(common.skip_quant_node)
    nodes = [node for node, _ in all_nodes(model.graph)]  # weights inside If/Loop/Scan bodies too
    node_names = {n.name for n in nodes}
    for name in sorted(skip_nodes - node_names):
        near = difflib.get_close_matches(name, sorted(node_names), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        log.warning("skip_quant_node: no node is named '%s'%s", name, hint)
    allowed_ops = ops or tuple(WEIGHT_SLOTS)

    # weight tensor -> [(node, slot)] for weight slots of weighted ops
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    reads: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # every read, in any graph
    for node in nodes:
        for slot, name in enumerate(node.input):
            if name in index.initializers:
                reads.setdefault(name, []).append((node, slot))
        if node.op_type not in allowed_ops:
            continue
        for slot in WEIGHT_SLOTS[node.op_type]:
            if slot < len(node.input) and node.input[slot] in index.initializers:
                uses.setdefault(node.input[slot], []).append((node, slot))

    plan = WeightPlan()
    for tensor_name, tensor_uses in uses.items():
        tensor = index.initializers[tensor_name]
        shape = tuple(int(d) for d in tensor.dims)
        first_node = tensor_uses[0][0]
        spec = WeightSpec(tensor_name, first_node.op_type, tuple(n.name for n, _ in tensor_uses), shape,
                          bits=common.bit_num)
        plan.specs.append(spec)
        spec.skip_reason = _skip_reason(spec, tensor, tensor_uses, reads[tensor_name], index, skip_nodes, config,
                                        apply_size_filters)
        if spec.skip_reason:
            continue
        axes = {channel_axis(n, s, len(shape)) for n, s in tensor_uses}
        # A weight shared by consumers that disagree on the channel axis gets one scale for the tensor.
        shared_axis = axes.pop() if len(axes) == 1 else None
        spec.correction_axis = shared_axis
        spec.axis = shared_axis if per_channel else None
    return plan


def _skip_reason(spec: WeightSpec, tensor: onnx.TensorProto, tensor_uses, tensor_reads, index: GraphIndex,
                 skip_nodes: set[str], config: QuantConfig, apply_size_filters: bool) -> str:
    common = config.common
    if tensor.data_type != TensorProto.FLOAT:
        return f"dtype {TensorProto.DataType.Name(tensor.data_type).lower()} is not float32"
    if len(spec.shape) < 2:
        return f"rank {len(spec.shape)} < 2"
    if spec.tensor in index.graph_input_names:
        return "also a graph input (its value can be overridden at run time)"
    weight_uses = {(n.name, s) for n, s in tensor_uses}
    other = [n for n, s in tensor_reads if (n.name, s) not in weight_uses]
    if other:
        return f"also read by {other[0].op_type} node '{other[0].name}' as a non-weight input"
    if spec.tensor in index.graph_output_names:
        return "also a graph output"
    skipped = [n.name for n, _ in tensor_uses if n.name in skip_nodes]
    if skipped:
        return f"skip_quant_node lists '{skipped[0]}'"
    if apply_size_filters:
        if spec.elements <= common.min_quant_weight_size:
            return f"{spec.elements} elements <= min_quant_weight_size={common.min_quant_weight_size}"
        for node, _ in tensor_uses:
            if node.op_type in CONV_OPS:
                channels = output_channels(node, spec.shape)
                if channels <= common.min_quant_weight_channel:
                    return f"{channels} output channels <= min_quant_weight_channel={common.min_quant_weight_channel}"
    return ""


def weight_tensors(model: onnx.ModelProto) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every float constant of rank >= 2 that some op reads in a weight slot (subgraphs included): name ->
    (op type of its first reader, the reading nodes). What a conversion's summary accounts for."""
    index = GraphIndex(model.graph)
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for node, _ in all_nodes(model.graph):
        for slot in WEIGHT_SLOTS.get(node.op_type, ()):
            name = node.input[slot] if slot < len(node.input) else ""
            tensor = index.initializers.get(name)
            if tensor is None or tensor.data_type != TensorProto.FLOAT or len(tensor.dims) < 2:
                continue
            op, nodes = found.get(name, (node.op_type, ()))
            found[name] = (op, (*nodes, node.name))
    return found

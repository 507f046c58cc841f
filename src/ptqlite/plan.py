"""Which constant weights get quantized, along which axis, and why the others are skipped.

The plan is pure data: the passes read it, and the report prints it.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from .config import QuantConfig
from .model import GraphIndex, all_nodes, attribute

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class WeightLayout:
    """How an op reads one of its weights."""

    output_axis: int  # indexes the op's output channels: one scale per slice along it
    input_axis: int | None  # multiplied with the input's channels and summed (None for a Gather table)
    channels: int  # the op's output channels
    kernel_axes: tuple[int, ...] = ()  # summed with the input axis (a convolution's kernel taps)


# The one table of weight layouts: (op type, weight slot, transposed) -> (output axis, input axis), negative axes
# counting from the last. `transposed` is Gemm's transA for slot 0 and transB for slot 1; a Gather's output axis
# is its `axis` attribute. The slots listed are the inputs that hold weights when they are constants.
_AXES: dict[tuple[str, int, bool], tuple[int, int | None]] = {
    ("Conv", 1, False): (0, 1),  # [M, C/group, k...]
    ("ConvTranspose", 1, False): (1, 0),  # [C, M/group, k...]
    ("MatMul", 0, False): (-2, -1),  # A [.., M, K]
    ("MatMul", 1, False): (-1, -2),  # B [.., K, N]
    ("Gemm", 0, False): (0, 1),  # A [M, K]
    ("Gemm", 0, True): (1, 0),
    ("Gemm", 1, False): (1, 0),  # B [K, N]
    ("Gemm", 1, True): (0, 1),
    ("Gather", 0, False): (0, None),
    **{(op, slot, False): (1, 2) for op in ("LSTM", "GRU", "RNN") for slot in (1, 2)},  # [dirs, gates*hidden, K]
}
# op type -> input slots that hold weights (when they are constants)
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {}
for _op, _slot, _ in _AXES:
    WEIGHT_SLOTS[_op] = tuple(sorted({*WEIGHT_SLOTS.get(_op, ()), _slot}))
CONV_OPS = ("Conv", "ConvTranspose")
# Ops whose int8 form on x86 is a u8*s8 GEMM summing over the input (and kernel) axes (qmath.int16_pair_limit).
INT8_GEMM_OPS = ("Conv", "MatMul", "Gemm")


def layout_for(op_type: str, slot: int, shape: tuple[int, ...], *, transposed: bool = False, gather_axis: int = 0,
               group: int = 1) -> WeightLayout:
    """The layout of a weight of `shape` read by `op_type` at input `slot` (see _AXES)."""
    rank = len(shape)
    out, inp = _AXES[(op_type, slot, transposed)]
    out = (gather_axis if op_type == "Gather" else out) % rank
    inp = None if inp is None else inp % rank
    channels = shape[out] * (group if op_type == "ConvTranspose" else 1)
    kernel = tuple(range(2, rank)) if op_type in CONV_OPS else ()
    return WeightLayout(out, inp, channels, kernel)


def weight_layout(node: onnx.NodeProto, slot: int, shape: tuple[int, ...]) -> WeightLayout:
    """The layout of the weight that `node` reads at input `slot`."""
    transposed = node.op_type == "Gemm" and bool(attribute(node, "transA" if slot == 0 else "transB", 0))
    return layout_for(node.op_type, slot, shape, transposed=transposed, gather_axis=attribute(node, "axis", 0),
                      group=attribute(node, "group", 1))


def gemm_rows(w: np.ndarray, op_type: str, trans_b: bool) -> np.ndarray | None:
    """The weight (input B of `op_type`) as [output channel, K] in onnxruntime's summation order: (kh, kw, input
    channel) for a Conv (it runs convolutions NHWC), K for MatMul/Gemm. None for ops without an x86 int8 GEMM
    (ConvTranspose) and for vector weights."""
    if w.ndim < 2 or op_type not in INT8_GEMM_OPS:
        return None
    layout = layout_for(op_type, 1, w.shape, transposed=trans_b and op_type == "Gemm")
    k = w.shape[layout.input_axis] * int(np.prod([w.shape[a] for a in layout.kernel_axes], dtype=np.int64))
    return np.moveaxis(w, layout.input_axis, -1).reshape(-1, k)


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


@dataclass(frozen=True)
class WeightRules:
    """What plan_weights decides by; each pass states its own."""

    bits: int
    per_channel: bool = True  # one scale per output channel (else one per tensor)
    ops: frozenset[str] = frozenset(WEIGHT_SLOTS)  # op types whose weights are planned
    skip_nodes: frozenset[str] = frozenset()  # skip_quant_node: weights these nodes read stay float
    # WEIGHT_QUANT's size rules (None: none): a weight of at most min_size elements, or a convolution weight of
    # at most min_channels output channels, stays float.
    min_size: int | None = None
    min_channels: int | None = None


def expand_skips(model: onnx.ModelProto, config: QuantConfig) -> QuantConfig:
    """The config with skip_quant_node as exact node names: an entry that names a node is that node (so names
    with `*`, `?` or `[` keep their meaning); else an entry with those characters is an fnmatch pattern over every
    node name (subgraphs included); skip_quant_op_type adds every node of those op types. Entries matching nothing
    are warned about (plan_weights warns about unknown exact names)."""
    common = config.common
    if not common.skip_quant_op_type and not any(_is_pattern(e) for e in common.skip_quant_node):
        return config
    nodes = [node for node, _ in all_nodes(model.graph)]
    names = [n.name for n in nodes if n.name]
    known = set(names)
    expanded: list[str] = []
    for entry in common.skip_quant_node:
        if entry in known or not _is_pattern(entry):
            expanded.append(entry)
            continue
        matched = [name for name in names if fnmatch.fnmatchcase(name, entry)]
        if not matched:
            log.warning("skip_quant_node: the pattern '%s' matches no node name", entry)
        log.info("skip_quant_node: '%s' matches %d nodes", entry, len(matched))
        expanded += matched
    for op_type in common.skip_quant_op_type:
        matched = [n.name for n in nodes if n.op_type == op_type and n.name]
        if not matched:
            log.warning("skip_quant_op_type: no node of this model is a %s", op_type)
        log.info("skip_quant_op_type: %d %s nodes stay float", len(matched), op_type)
        expanded += matched
    common = dataclasses.replace(common, skip_quant_node=tuple(dict.fromkeys(expanded)))
    return dataclasses.replace(config, common=common)


def _is_pattern(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def weight_quant_rules(config: QuantConfig, per_channel: bool) -> WeightRules:
    """WEIGHT_QUANT's rules: the config's bit width, skip list and size thresholds."""
    common = config.common
    return WeightRules(common.bit_num, per_channel, skip_nodes=frozenset(common.skip_quant_node),
                       min_size=common.min_quant_weight_size, min_channels=common.min_quant_weight_channel)


def int8_rules(config: QuantConfig, ops: Iterable[str], per_channel: bool = True) -> WeightRules:
    """FULL_QUANT's and DYNAMIC_QUANT's rules: int8 weights of `ops`, the config's skip list, no size rule."""
    common = config.common
    return WeightRules(common.bit_num, per_channel, frozenset(ops), frozenset(common.skip_quant_node))


def plan_weights(model: onnx.ModelProto, rules: WeightRules) -> WeightPlan:
    """Decide, for every constant weight of a weighted op, whether and how it is quantized."""
    index = GraphIndex(model.graph)
    skip_nodes = rules.skip_nodes
    nodes = [node for node, _ in all_nodes(model.graph)]  # weights inside If/Loop/Scan bodies too
    node_names = {n.name for n in nodes}
    for name in sorted(skip_nodes - node_names):
        near = difflib.get_close_matches(name, sorted(node_names), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        log.warning("skip_quant_node: no node is named '%s'%s", name, hint)

    # weight tensor -> [(node, slot)] for weight slots of weighted ops
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    reads: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # every read, in any graph
    for node in nodes:
        for slot, name in enumerate(node.input):
            if name in index.initializers:
                reads.setdefault(name, []).append((node, slot))
        if node.op_type not in rules.ops:
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
                          bits=rules.bits)
        plan.specs.append(spec)
        spec.skip_reason = _skip_reason(spec, tensor, tensor_uses, reads[tensor_name], index, rules)
        if spec.skip_reason:
            continue
        axes = {weight_layout(n, s, shape).output_axis for n, s in tensor_uses}
        # A weight shared by consumers that disagree on the channel axis gets one scale for the tensor.
        shared_axis = axes.pop() if len(axes) == 1 else None
        spec.correction_axis = shared_axis
        spec.axis = shared_axis if rules.per_channel else None
    return plan


def _skip_reason(spec: WeightSpec, tensor: onnx.TensorProto, tensor_uses, tensor_reads, index: GraphIndex,
                 rules: WeightRules) -> str:
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
    skipped = [n.name for n, _ in tensor_uses if n.name in rules.skip_nodes]
    if skipped:
        return f"skip_quant_node lists '{skipped[0]}'"
    if rules.min_size is not None and spec.elements <= rules.min_size:
        return f"{spec.elements} elements <= min_quant_weight_size={rules.min_size}"
    if rules.min_channels is not None:
        for node, _ in tensor_uses:
            if node.op_type in CONV_OPS:
                channels = weight_layout(node, 1, spec.shape).channels
                if channels <= rules.min_channels:
                    return f"{channels} output channels <= min_quant_weight_channel={rules.min_channels}"
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

"""FULL_QUANT rewrite: the planned float graph becomes the QDQ graph, in one pass, from the plan and the
parameters (nothing is computed here but names and nodes).

QuantizeLinear/DequantizeLinear pairs on the planned activations, int8 weights and int32 biases behind a
DequantizeLinear, quantized constants; a Relu/Clip right after an int8 op is dropped when the output quantizer
clamps exactly as it would. Graph outputs keep their names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...model import GraphIndex, attribute, remove_initializers
from ...prepare import drop_unused_initializers
from ...qmath import QParams, round_half_away
from ...targets import WEIGHTED_OPS, Target
from .graph_plan import GraphPlan, clip_bounds, data_slots
from .params import QuantParams


@dataclass(frozen=True)
class RewriteSummary:
    dropped: int  # Relu/Clip folded into the op before them
    float_ops: frozenset[str]  # op types left in float


def rewrite(model: onnx.ModelProto, plan: GraphPlan, params: QuantParams, preset: Target) -> RewriteSummary:
    """Rewrite `model` (the graph the plan was made on) in place."""
    writer = _Writer(model, plan, params, preset)
    writer.run()
    return RewriteSummary(len(writer.dropped), frozenset(writer.float_ops))


class _Writer:
    def __init__(self, model: onnx.ModelProto, plan: GraphPlan, params: QuantParams, preset: Target):
        self.graph = model.graph
        self.plan = plan
        self.params = params
        self.preset = preset
        self.index = GraphIndex(model.graph)
        self.new_inits: list[onnx.TensorProto] = []
        self.dropped: set[int] = set()
        self.float_ops: set[str] = set()

    def _name(self, base: str) -> str:
        return self.index.unique_name(base)

    def _init(self, array: np.ndarray, base: str) -> str:
        name = self._name(base)
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def _qdq_constants(self, base: str, params: QParams, dtype: int, axis: int | None = None) -> tuple[str, str]:
        scale = params.scale.reshape(-1).astype(np.float32)
        zero = params.zero_point.reshape(-1).astype(helper.tensor_dtype_to_np_dtype(dtype))
        if axis is None:
            scale, zero = scale.reshape(()), zero.reshape(())
        return self._init(scale, f"{base}_scale"), self._init(zero, f"{base}_zero_point")

    def _dequantize_node(self, q_name: str, scale: str, zero: str, out: str, axis: int | None) -> onnx.NodeProto:
        attrs = {"axis": axis} if axis is not None else {}
        return helper.make_node("DequantizeLinear", [q_name, scale, zero], [out],
                                name=self._name(f"{out}/DequantizeLinear"), **attrs)

    def run(self) -> None:
        graph, plan = self.graph, self.plan
        self._fold_activations()
        read_as: dict[str, str] = {}
        head: list[onnx.NodeProto] = []
        body: list[onnx.NodeProto] = []
        outputs = {o.name for o in graph.output}

        quantized: dict[str, str] = {}  # activation -> its QuantizeLinear output

        def add_qdq(tensor: str, into: list[onnx.NodeProto], q: str | None = None) -> None:
            """A QuantizeLinear/DequantizeLinear pair on `tensor`; only the DequantizeLinear when `q` is the
            integer tensor already (a Pad run on the codes)."""
            scale, zero = self._qdq_constants(tensor, self.params.activations[tensor], self.preset.activation_type)
            if q is not None:
                into.append(self._dequantize_node(q, scale, zero, self._name(f"{tensor}_dequantized"), None))
                read_as[tensor] = into[-1].output[0]
                return
            q = self._name(f"{tensor}_quantized")
            quantized[tensor] = q
            if tensor in outputs:
                # A graph output keeps its name: the producer writes a new name, the DequantizeLinear the old one.
                source, dq = self._name(f"{tensor}_float"), tensor
                producer = self.index.producer[tensor]
                producer.output[list(producer.output).index(tensor)] = source
            else:
                source, dq = tensor, self._name(f"{tensor}_dequantized")
                read_as[tensor] = dq
            into.append(helper.make_node("QuantizeLinear", [source, scale, zero], [q],
                                         name=self._name(f"{tensor}/QuantizeLinear")))
            into.append(self._dequantize_node(q, scale, zero, dq, None))

        for value in graph.input:
            if value.name in plan.tensors:
                add_qdq(value.name, head)
        weight_reads = self._write_weights(head)
        for pos, node in enumerate(list(graph.node)):
            if pos in self.dropped:
                continue
            role = plan.roles[pos]
            original = list(node.input)
            for slot, name in enumerate(original):
                if name in read_as:
                    node.input[slot] = read_as[name]
                elif role == "compute" and name in weight_reads:
                    node.input[slot] = weight_reads[name]
            if role == "float":
                self.float_ops.add(node.op_type)
            elif node.op_type in WEIGHTED_OPS:
                body += self._write_bias(pos, node, original)
            else:
                body += self._write_constants(node)
            produced = list(node.output)
            codes = self._pad_on_codes(node, role, original, quantized, outputs)
            body.append(node)
            for out in produced:
                if out in plan.tensors:
                    add_qdq(out, body, codes)
        del graph.node[:]
        graph.node.extend(head + body)
        remove_initializers(graph, self.params.weight_only)  # now DequantizeLinear outputs
        graph.initializer.extend(self.new_inits)
        drop_unused_initializers(self.graph)

    def _pad_on_codes(self, node: onnx.NodeProto, role: str, original: list[str], quantized: dict[str, str],
                      outputs: set[str]) -> str | None:
        """A constant-mode Pad between the QDQ pairs of one set of parameters is written on the integer codes,
        padding with the code of its value (the zero point for 0), and only a DequantizeLinear follows: the same
        integers as QuantizeLinear(Pad(DequantizeLinear(q))), which onnxruntime computes. OpenVINO 2026.4 moves
        the DequantizeLinear below a float Pad and, where it pads the channel axis, pads with code 0 whatever the
        zero point (ResNet20 ASCEND preset, int8 activations with zero point -128: output cosine 0.31 to onnxruntime).
        Returns the new integer output, or None where the Pad stays as it is."""
        if role != "shared" or node.op_type != "Pad" or attribute(node, "mode", b"constant") != b"constant":
            return None
        source, out = original[0], node.output[0]
        params, before = self.params.activations.get(out), self.params.activations.get(source)
        if source not in quantized or out in outputs or params is None or before is None or not (
                np.array_equal(params.scale.astype(np.float32), before.scale.astype(np.float32))
                and np.array_equal(params.zero_point, before.zero_point)):
            return None
        value = 0.0
        if len(original) > 2 and original[2]:
            if original[2] not in self.index.initializers:
                return None
            value = float(self.index.array(original[2]).ravel()[0])
        dtype = helper.tensor_dtype_to_np_dtype(self.preset.activation_type)
        scale, zero = float(params.scale.ravel()[0]), int(params.zero_point.ravel()[0])
        code = np.clip(np.rint(np.float32(value) / np.float32(scale)) + zero, params.qmin, params.qmax)
        node.input[0] = quantized[source]
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = self._init(np.array(code, dtype), f"{out}_pad_code")
        node.output[0] = self._name(f"{out}_quantized")
        return node.output[0]

    def _fold_activations(self) -> None:
        """Drop a Relu/Clip after an int8 op when its output quantizer clamps identically (zero point at the
        bottom code for ReLU, the cap at or beyond the top code for Clip); the producer then writes its output."""
        for out, pos in self.plan.fused.items():
            node = self.graph.node[pos]
            params = self.params.activations.get(out)
            if params is None:
                continue
            lo, hi = clip_bounds(node, self.index)
            scale, zero = float(params.scale.ravel()[0]), int(params.zero_point.ravel()[0])
            low_ok = lo == -np.inf or round_half_away(np.array(lo / scale)) + zero <= params.qmin
            high_ok = hi == np.inf or round_half_away(np.array(hi / scale)) + zero >= params.qmax
            if low_ok and high_ok:
                producer = self.index.producer[node.input[0]]
                producer.output[0] = out
                self.index.producer[out] = producer
                self.dropped.add(pos)

    def _write_weights(self, head: list[onnx.NodeProto]) -> dict[str, str]:
        reads = {}
        for name, weight in self.params.weights.items():
            q_name = self._init(weight.codes.astype(helper.tensor_dtype_to_np_dtype(weight.dtype)),
                                f"{name}_quantized")
            scale, zero = self._qdq_constants(name, weight.params, weight.dtype, weight.axis)
            dq = self._name(f"{name}_dequantized")
            head.append(self._dequantize_node(q_name, scale, zero, dq, weight.axis))
            reads[name] = dq
        for name, weight in self.params.weight_only.items():
            q_name = self._init(weight.codes.astype(helper.tensor_dtype_to_np_dtype(weight.dtype)),
                                f"{name}_quantized")
            scale, zero = self._qdq_constants(name, weight.params, weight.dtype, weight.axis)
            head.append(self._dequantize_node(q_name, scale, zero, name, weight.axis))
        return reads

    def _write_bias(self, pos: int, node: onnx.NodeProto, original: list[str]) -> list[onnx.NodeProto]:
        bias = self.params.biases.get(pos)
        if bias is None:
            return []
        has_bias = len(original) > 2 and bool(original[2])
        base = original[2] if has_bias else f"{node.output[0]}_bias"
        q_name = self._init(bias.codes, f"{base}_quantized")
        s_name = self._init(bias.scale.astype(np.float32), f"{base}_scale")
        z_name = self._init(np.zeros(bias.codes.size, np.int32), f"{base}_zero_point")
        dq = self._name(f"{base}_dequantized")
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = dq
        return [self._dequantize_node(q_name, s_name, z_name, dq, 0)]

    def _write_constants(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        nodes = []
        for slot in data_slots(node):
            name = node.input[slot] if slot < len(node.input) else ""
            constant = self.params.constants.get(name)
            if constant is None:
                continue
            dtype = self.preset.activation_type
            q_name = self._init(constant.codes.astype(helper.tensor_dtype_to_np_dtype(dtype)), f"{name}_quantized")
            scale, zero = self._qdq_constants(name, constant.params, dtype)
            dq = self._name(f"{name}_dequantized")
            nodes.append(self._dequantize_node(q_name, scale, zero, dq, None))
            node.input[slot] = dq
        return nodes


def keep_bias_adds_apart(model: onnx.ModelProto, ranks: dict[str, int]) -> None:
    """A MatMul with int8 inputs and float output, on a static 3-D (or higher) input, followed by an Add of a 1-D
    bias: the bias is given the output's rank ([1, .., 1, N], same broadcast, same values), so that onnxruntime's
    MatMulAddFusion, which only takes a 1-D bias for inputs it must reshape, leaves the int8 MatMul kernel alone
    (targets.Target.bias_with_output_rank). `ranks` come from the shape inference before the rewrite, which keeps
    such a MatMul's output name."""
    graph = model.graph
    index = GraphIndex(graph)
    for node in graph.node:
        if node.op_type != "MatMul" or any(
                (p := index.producer.get(name)) is None or p.op_type != "DequantizeLinear" for name in node.input[:2]):
            continue
        users = index.consumers.get(node.output[0], [])
        rank = ranks.get(node.output[0], 0)
        if len(users) != 1 or users[0][0].op_type != "Add" or rank < 3:
            continue
        add = users[0][0]
        slot = 1 - users[0][1]
        bias = add.input[slot]
        if bias not in index.initializers or len(index.initializers[bias].dims) != 1:
            continue
        value = index.array(bias)
        name = index.unique_name(f"{bias}_rank{rank}")
        graph.initializer.append(numpy_helper.from_array(value.reshape([1] * (rank - 1) + [-1]), name))
        add.input[slot] = name
    drop_unused_initializers(graph)

"""Integer graph inputs and outputs of a FULL_QUANT model (--inputDataType / --outputDataType INT8 or UINT8).

A float graph input becomes the int8 (uint8) codes of the QuantizeLinear that read it: that QuantizeLinear goes
and the DequantizeLinear after it reads the codes (for uint8 with the zero point moved by 128), which is exact.
An input that no QuantizeLinear reads gets a DequantizeLinear with the range of the calibration samples. A float
graph output becomes the codes of the QuantizeLinear in front of its DequantizeLinear (exact), or, where a float
op computes it, of a QuantizeLinear appended with the range the quantized model gives on the calibration samples.
Callers must apply the scales themselves (x_q = clamp(round(x / scale) + zero_point), y = (y_q - zero_point) *
scale): they are in the summary and in the model's metadata_props under METADATA_KEY, as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import UsageError
from .model import GraphIndex
from .prepare import drop_unused_initializers
from .qmath import asymmetric_params

METADATA_KEY = "ptqlite.io_quantization"
TYPES = {"INT8": TensorProto.INT8, "UINT8": TensorProto.UINT8}


@dataclass(frozen=True)
class BoundaryQuant:
    """How one graph input or output is quantized: float = (code - zero_point) * scale."""

    kind: str  # "input" or "output"
    tensor: str
    dtype: str  # "int8" or "uint8"
    scale: float
    zero_point: int
    source: str  # where the parameters come from

    def describe(self) -> str:
        return (f"{self.kind} '{self.tensor}' is {self.dtype}: float = ({self.tensor} - {self.zero_point}) * "
                f"{self.scale:.9g} ({self.source})")


def quantize_io(model: onnx.ModelProto, input_type: str | None, output_type: str | None,
                samples: Iterable[dict[str, np.ndarray]]) -> list[BoundaryQuant]:
    """Make the float graph inputs (input_type) and outputs (output_type) of `model` INT8 or UINT8 codes, in
    place; `samples` (float inputs, re-iterable) give the ranges where no QuantizeLinear/DequantizeLinear does.
    Returns what was done, also written to metadata_props."""
    done: list[BoundaryQuant] = []
    if output_type:
        done += _outputs(model, output_type, samples)
    if input_type:
        done += _inputs(model, input_type, samples)
    if done:
        drop_unused_initializers(model.graph)  # parameters of the QuantizeLinear nodes that went
        entry = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
        if entry is None:
            entry = model.metadata_props.add()
            entry.key = METADATA_KEY
        entry.value = json.dumps([asdict(b) for b in done])
    return done


def _float_values(graph_values) -> list[onnx.ValueInfoProto]:
    return [v for v in graph_values if v.type.tensor_type.elem_type == TensorProto.FLOAT]


def _scalar(index: GraphIndex, name: str) -> np.ndarray | None:
    tensor = index.initializers.get(name)
    if tensor is None or int(np.prod(tensor.dims, dtype=np.int64)) != 1:
        return None
    return numpy_helper.to_array(tensor).reshape(())


def _node_params(index: GraphIndex, node: onnx.NodeProto) -> tuple[float, int, str] | None:
    """(scale, zero point as int8, code type) of a per-tensor QuantizeLinear/DequantizeLinear with constant
    parameters (uint8 codes are int8 codes + 128, so one signed zero point describes both)."""
    if len(node.input) < 3:
        return None
    scale, zero = _scalar(index, node.input[1]), _scalar(index, node.input[2])
    if scale is None or zero is None or zero.dtype not in (np.int8, np.uint8):
        return None
    return float(scale), int(zero) - (128 if zero.dtype == np.uint8 else 0), str(zero.dtype)


def _constants(model: onnx.ModelProto, index: GraphIndex, base: str, scale: float, zero: int,
               dtype: str) -> tuple[str, str]:
    scale_name, zero_name = index.unique_name(f"{base}_io_scale"), index.unique_name(f"{base}_io_zero_point")
    codes = np.array(_code_zero(zero, dtype), dtype=np.uint8 if dtype == "uint8" else np.int8)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                                    numpy_helper.from_array(codes, zero_name)])
    return scale_name, zero_name


def _code_zero(zero: int, dtype: str) -> int:
    """The zero point of codes of `dtype` for the signed zero point `zero`."""
    return zero + 128 if dtype == "uint8" else zero


def _range_params(values: list[np.ndarray]) -> tuple[float, int]:
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    params = asymmetric_params(np.array([lo, hi]), 8, None)
    return float(params.scale.ravel()[0]), int(params.zero_point.ravel()[0])


def _set_type(value: onnx.ValueInfoProto, dtype: str) -> None:
    value.type.tensor_type.elem_type = TYPES[dtype.upper()]


def _drop_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    kept = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _inputs(model: onnx.ModelProto, flag: str, samples) -> list[BoundaryQuant]:
    dtype = flag.lower()
    graph = model.graph
    index = GraphIndex(graph)
    done = []
    for value in _float_values(graph.input):
        name = value.name
        if name in index.initializers:
            continue  # an initializer listed as an input (old exporters): a weight, not data
        readers = index.consumers.get(name, [])
        if any(slot < 0 for _, slot in readers):
            raise UsageError(f"--inputDataType={flag}: input '{name}' is read inside an If/Loop/Scan body; "
                             "ptqlite can only make inputs read by main-graph nodes integer")
        quantizers = [n for n, slot in readers if n.op_type == "QuantizeLinear" and slot == 0]
        params = {_node_params(index, n) for n in quantizers}
        if len(params) == 1 and None not in params:
            scale, zero, _ = found = params.pop()
            source = "the scale of its QuantizeLinear"
        else:
            scale, zero = _range_params([s[name] for s in samples])
            quantizers, source = [], "range of the calibration samples"
        scale_name, zero_name = _constants(model, index, name, scale, zero, dtype)
        floats = index.unique_name(f"{name}_dequantized_input")
        for node, slot in readers:
            node.input[slot] = floats
        dequantize = helper.make_node("DequantizeLinear", [name, scale_name, zero_name], [floats])
        removed = set()  # outputs of the QuantizeLinear nodes that go
        for q in quantizers:  # the codes are the input now: the DequantizeLinear after q reads them
            left = 0
            for node, slot in index.consumers.get(q.output[0], []):
                if node.op_type == "DequantizeLinear" and slot == 0 and _node_params(index, node) == found:
                    node.input[0], node.input[2] = name, zero_name
                else:
                    left += 1
            if not left and q.output[0] not in index.graph_output_names:
                removed.add(q.output[0])
        nodes = [n for n in graph.node if not (n.op_type == "QuantizeLinear" and n.output[0] in removed)]
        if any(floats in n.input for n in nodes):
            nodes.insert(0, dequantize)
        del graph.node[:]
        graph.node.extend(nodes)
        _set_type(value, dtype)
        done.append(BoundaryQuant("input", name, dtype, scale, _code_zero(zero, dtype), source))
        index = GraphIndex(graph)
    return done


def _outputs(model: onnx.ModelProto, flag: str, samples) -> list[BoundaryQuant]:
    dtype = flag.lower()
    graph = model.graph
    index = GraphIndex(graph)
    outputs = _float_values(graph.output)
    exact = {v.name: _exact_output(index, v.name) for v in outputs}
    measured = _output_ranges(model, [n for n, how in exact.items() if how is None], samples)
    done = []
    for value in outputs:
        name = value.name
        floats = index.unique_name(f"{name}_float")
        producer = index.producer[name]
        producer.output[list(producer.output).index(name)] = floats
        for node, slot in index.consumers.get(name, []):
            node.input[slot] = floats
        if exact[name] is not None:
            q, (scale, zero, _) = exact[name]
            codes = q.output[0]
            _, zero_name = _constants(model, index, name, scale, zero, dtype)
            q.output[0] = name  # the codes are the graph output; every reader of them (DequantizeLinear) follows
            q.input[2] = zero_name
            for node, slot in index.consumers.get(codes, []):
                node.input[slot] = name
                node.input[2] = zero_name
            _drop_value_info(model, {codes, name})
            if not any(floats in n.input for n in graph.node):
                graph.node.remove(producer)
            source = "the scale of its QuantizeLinear"
        else:
            scale, zero = _range_params(measured[name])
            scale_name, zero_name = _constants(model, index, name, scale, zero, dtype)
            graph.node.append(helper.make_node("QuantizeLinear", [floats, scale_name, zero_name], [name]))
            _drop_value_info(model, {name})
            source = "range of the quantized model's output on the calibration samples"
        _set_type(value, dtype)
        done.append(BoundaryQuant("output", name, dtype, scale, _code_zero(zero, dtype), source))
        index = GraphIndex(graph)
    return done


def _exact_output(index: GraphIndex, name: str):
    """(QuantizeLinear, params) when `name` is DequantizeLinear(QuantizeLinear(...)) and every reader of the codes
    is a DequantizeLinear with the same parameters (so they can all read uint8 codes too); else None."""
    dq = index.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = index.producer.get(dq.input[0])
    params = _node_params(index, dq)
    if q is None or q.op_type != "QuantizeLinear" or params is None or _node_params(index, q) != params:
        return None
    readers = index.consumers.get(dq.input[0], [])
    if dq.input[0] in index.graph_output_names or any(
            n.op_type != "DequantizeLinear" or s != 0 or _node_params(index, n) != params for n, s in readers):
        return None
    return q, params


def _output_ranges(model: onnx.ModelProto, names: list[str], samples) -> dict[str, list[np.ndarray]]:
    if not names:
        return {}
    from .runtime import cpu_session, session_feeds

    session = cpu_session(model, "to measure its output ranges", spinning=False)
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for sample in samples:
        for name, out in zip(names, session.run(names, session_feeds(session, sample)), strict=True):
            values[name].append(np.asarray(out))
    if not next(iter(values.values())):
        raise UsageError("--outputDataType needs calibration samples to measure the output range; there are none")
    return values

"""int8 embedding tables: a Gather table stored as int8 codes with one symmetric scale per row, and only the
gathered rows dequantized after the Gather (Gather codes, Gather scales, Cast, Mul), so the table stays int8 in
memory as well as on disk. DYNAMIC_QUANT writes every table this way; FULL_QUANT does on presets whose runtime
runs it (targets.Target.int8_gather_tables).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config import QuantConfig
from .model import GraphIndex, attribute, remove_initializers, subgraphs
from .plan import int8_rules, plan_weights
from .qmath import QParams, quantize_rows, symmetric_params
from .result import QuantizedTensor, SkippedTensor
from .stream import spill

SCHEME = "symmetric per-row axis 0"
STORAGE = "Gather int8, rows dequantized after gathering"


class GraphBuilder:
    """New constants and nodes for one graph, named uniquely against it."""

    def __init__(self, graph: onnx.GraphProto):
        self.index = GraphIndex(graph)
        self.initializers: list[onnx.TensorProto] = []

    def const(self, array: np.ndarray, base: str) -> str:
        name = self.index.unique_name(base)
        # a streaming conversion writes it to the output's data file now
        self.initializers.append(*spill([numpy_helper.from_array(np.ascontiguousarray(array), name)]))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, output: str | None = None, **attrs) -> tuple:
        out = output or self.index.unique_name(f"{prefix}/{op}_output")
        return helper.make_node(op, inputs, [out], name=self.index.unique_name(f"{prefix}/{op}"), **attrs), out


class TableWriter:
    """Quantizes each table once and rewrites each Gather that reads it."""

    def __init__(self, builder: GraphBuilder):
        self.builder = builder
        self.tables: dict[str, tuple[str, str, QParams, float]] = {}

    def gather(self, node: onnx.NodeProto, tensor: str) -> tuple[list[onnx.NodeProto], float, QParams]:
        """Nodes replacing `node` (a Gather of rows of `tensor`), the relative error of the dequantized table
        (not the table itself: a float copy per table until the pass ends) and its parameters."""
        b = self.builder
        if tensor not in self.tables:
            table = b.index.array(tensor)
            params = symmetric_params(table, 8, 0, narrow=True)
            codes, error = quantize_rows(table, params, np.int8)  # by rows: no whole float64 copies of a table
            del table
            base = tensor.replace("::", "_").strip("/")
            q_name = b.const(codes, f"{base}_quantized")
            del codes
            s_name = b.const(params.scale.astype(np.float32), f"{base}_scale")
            self.tables[tensor] = (q_name, s_name, params, error)
        q_name, s_name, params, error = self.tables[tensor]
        prefix = node.name or b.index.unique_name("Gather")
        ids = node.input[1]
        g_codes, codes_out = b.node("Gather", [q_name, ids], prefix, axis=0)
        g_scale, scale_out = b.node("Gather", [s_name, ids], prefix, axis=0)
        cast, cast_out = b.node("Cast", [codes_out], prefix, to=TensorProto.FLOAT)
        # scale rows are [V, 1, ...]: gathered they broadcast over each row's elements
        mul, _ = b.node("Mul", [cast_out, scale_out], prefix, output=node.output[0])
        return [g_codes, g_scale, cast, mul], error, params


def unsupported_gather(node: onnx.NodeProto) -> str:
    """Why a Gather of a table cannot read int8 rows ('' when it can)."""
    if attribute(node, "axis", 0) != 0:
        return f"Gather '{node.name}' gathers along axis {attribute(node, 'axis', 0)}, not rows (axis 0)"
    return ""


def table_record(tensor: str, spec, table: onnx.TensorProto, error: float, params: QParams) -> QuantizedTensor:
    size = int(np.prod(table.dims, dtype=np.int64))
    nbytes = size * helper.tensor_dtype_to_np_dtype(table.data_type).itemsize
    return QuantizedTensor(tensor, "Gather", spec.nodes, spec.shape, 8, SCHEME, STORAGE, bytes_before=nbytes,
                           bytes_after=size + 4 * params.scale.size,
                           relative_error=error, scale=params.scale.ravel(),
                           zero_point=params.zero_point.ravel())


def int8_gather_tables(model: onnx.ModelProto, config: QuantConfig
                       ) -> tuple[list[QuantizedTensor], list[SkippedTensor]]:
    """Rewrite every planned Gather table of `model` in place; what was quantized and what was skipped."""
    plan = plan_weights(model, int8_rules(config, ("Gather",)))
    skipped = [SkippedTensor(s.tensor, s.op_type, s.nodes, s.skip_reason) for s in plan.skipped]
    specs = {s.tensor: s for s in plan.quantized}
    writer = TableWriter(GraphBuilder(model.graph))
    kept_float: dict[str, str] = {}
    done: dict[str, QuantizedTensor] = {}
    nodes = _rewrite_gathers(list(model.graph.node), writer, specs, kept_float, done)
    quantized = []
    for tensor, record in done.items():
        if tensor in kept_float:
            record.storage += f" (a float copy stays for a user that cannot be rewritten: {kept_float[tensor]})"
        quantized.append(record)
    skipped += [SkippedTensor(t, specs[t].op_type, specs[t].nodes, why) for t, why in kept_float.items()
                if t not in done]
    removed = {t for t in done if t not in kept_float}
    remove_initializers(model.graph, removed)
    model.graph.initializer.extend(writer.builder.initializers)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return quantized, skipped


def _rewrite_gathers(graph_nodes: list[onnx.NodeProto], writer: TableWriter, specs: dict, kept_float: dict[str, str],
                     done: dict[str, QuantizedTensor]) -> list[onnx.NodeProto]:
    """The nodes of one graph with each planned Gather rewritten, bodies first. A function of the module, not a
    closure that calls itself: such a closure is a reference cycle, and through its writer it kept the whole
    rewritten model alive until Python's cycle collector ran (330 MB on MiniLM's FULL_QUANT, docs/results.md)."""
    nodes: list[onnx.NodeProto] = []
    for node in graph_nodes:
        for sub in subgraphs(node):  # bodies read the int8 tables from the outer scope
            rewritten = _rewrite_gathers(list(sub.node), writer, specs, kept_float, done)
            del sub.node[:]
            sub.node.extend(rewritten)
        tensor = next((n for n in node.input[:2] if n in specs), None) if node.op_type == "Gather" else None
        reason = unsupported_gather(node) if tensor else ""
        if tensor is None or reason:
            if reason:
                kept_float.setdefault(tensor, reason)
            nodes.append(node)
            continue
        new_nodes, error, params = writer.gather(node, tensor)
        nodes += new_nodes
        if tensor not in done:
            done[tensor] = table_record(tensor, specs[tensor], writer.builder.index.initializers[tensor], error,
                                        params)
    return nodes

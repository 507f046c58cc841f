"""DYNAMIC_QUANT: int8 weights offline, activations quantized at run time by standard ONNX ops.

Each MatMul/Gemm with a constant weight B becomes

    ALWC (default): DynamicQuantizeLinear(x) -> MatMulInteger(x_u8, W_s8) -> Cast -> Mul(x_scale * w_scale[N])
    ACWL:           per-row scale s = max|x| / 127 over the last axis; x_u8 = Round(x / s) + 128
                    -> MatMulInteger(x_u8, W_u8) -> Cast -> Mul(s * w_scale)

ONNX Runtime fuses these into its DynamicQuantizeMatMul / MatMulIntegerToFloat kernels. The weight codes are
symmetric int8 in [-127, 127] (per output channel for ALWC, per tensor for ACWL). On x86 CPUs without VNNI the
uint8 x int8 kernel adds the products of neighbouring K positions in saturating 16-bit arithmetic, so ALWC
widens a column's scale where two same-sign neighbouring codes could sum above 128 (as FULL_QUANT's CPU preset
does) and keeps the faster int8 kernel exact. ACWL's one per-tensor weight scale would take the worst pair of
the whole tensor: it stores q + 128 as uint8 (zero point 128), whose uint8 x uint8 product is exact (see
docs/dynamic_quant.md). The `alwc_weights="uint8"` option gives ALWC that storage too (for comparisons). A
MatMul of two activations stays float.

Gather embedding tables get int8 codes with one symmetric scale per row; the gathered rows are dequantized
after the Gather, so the table stays int8 in memory as well as on disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import embedding
from ..config import QuantConfig
from ..embedding import GraphBuilder, TableWriter
from ..model import GraphIndex, attribute, ensure_opset, opset_version, subgraphs
from ..plan import WeightSpec, gemm_rows, int8_rules, plan_weights, weight_layout
from ..qmath import (
    QParams,
    dequantize,
    int16_pair_limit,
    quantize,
    relative_error,
    symmetric_params,
)
from ..result import ConversionResult, QuantizedTensor, SkippedTensor
from ..targets import target

log = logging.getLogger(__name__)

_OPS = ("MatMul", "Gemm", "Gather")
# The integer kernels DYNAMIC_QUANT's graph runs on: onnxruntime's CPU provider.
_PRESET = target("CPU")
# Stored codes are q + 128, q in [-127, 127]; MatMulInteger subtracts the zero point.
_ZERO = 128
# Keeps the per-row scale of an all-zero row finite (x / s is then 0, as it should be).
_TINY = np.float32(1e-30)


@dataclass
class _IntWeight:
    q_name: str  # int8 codes q, or uint8 codes q + 128, layout [.., K, N]
    zero_name: str  # "" for int8 codes (zero point 0)
    params: QParams
    w_hat: np.ndarray  # the float weight the integer path computes with, layout [.., K, N]
    equalizer: str | None = None  # ACWL: per-input-channel factor applied to x (the weight was divided by it)


def _row_equalizer(w: np.ndarray) -> np.ndarray:
    """ACWL: d[k] = sqrt(max |w[k, :]|), normalised to a geometric mean of 1.

    One scale for a whole weight is dominated by its largest rows (in BERT one input channel of a feed-forward
    weight reaches 175 standard deviations). Dividing row k by d[k] and multiplying activation column k by
    d[k] leaves x @ w unchanged and splits that spread evenly between the weight and the per-row activation
    scale.
    """
    peak = np.abs(w).max(axis=1).astype(np.float64)
    d = np.sqrt(np.where(peak > 0, peak, 1.0))
    return d / np.exp(np.log(d).mean())


class _Rewriter(GraphBuilder):
    """Builds the replacement nodes and constants for one model."""

    def __init__(self, model: onnx.ModelProto, strategy: str, int8_weights: bool):
        super().__init__(model.graph)
        self.strategy = strategy
        self.int8_weights = int8_weights
        # int8 codes meet the u8*s8 kernel, whose pair sums the preset may ask to keep inside int16
        self.pair_safe = int8_weights and _PRESET.int16_pair_sums
        self.opset = opset_version(model)
        self.constants: dict[tuple, str] = {}
        self.weights: dict[tuple[str, bool], _IntWeight] = {}
        self.tables = TableWriter(self)

    def shared(self, array: np.ndarray) -> str:
        """A small constant (zero points, 1/127) stored once per model."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.constants[key] = self.const(array, "ptq_dq_c")
        return self.constants[key]

    def matmul_weight(self, tensor: str, transpose: bool) -> _IntWeight:
        """Integer codes [.., K, N] and their parameters, quantized once per (tensor, layout)."""
        key = (tensor, transpose)
        if key not in self.weights:
            w = self.index.array(tensor).astype(np.float32)
            if transpose:
                w = np.ascontiguousarray(w.T)
            equalizer = None
            if self.strategy == "ALWC":
                axis = w.ndim - 1
            else:
                axis = None
                if w.ndim == 2:
                    equalizer = _row_equalizer(w)
                    w = w / equalizer[:, None]
            params = symmetric_params(w, 8, axis, narrow=True)
            if self.pair_safe:
                params = _pair_safe(w, params)
            codes = quantize(w, params)
            w_hat = dequantize(codes, params)
            base = tensor.replace("::", "_").strip("/")
            if self.int8_weights:
                q_name, zero_name = self.const(codes.astype(np.int8), f"{base}_quantized"), ""
            else:
                q_name = self.const((codes + _ZERO).astype(np.uint8), f"{base}_quantized")
                # A zero point per column takes ONNX Runtime's fast uint8 x uint8 path (a scalar one
                # was slower on some runs).
                zero = np.full(w.shape[-1], _ZERO, np.uint8) if w.ndim == 2 else np.array(_ZERO, np.uint8)
                zero_name = self.shared(zero)
            eq_name = None
            if equalizer is not None:
                eq_name = self.const(equalizer.astype(np.float32), f"{base}_equalizer")
                w_hat = w_hat * equalizer[:, None].astype(np.float32)
            self.weights[key] = _IntWeight(q_name, zero_name, params, w_hat, eq_name)
        return self.weights[key]

    def quantized_matmul(
        self, x: str, tensor: str, transpose: bool, output: str, prefix: str, alpha: float = 1.0
    ) -> list[onnx.NodeProto]:
        """Nodes computing alpha * x @ W (W = tensor, transposed if asked) with integer arithmetic."""
        weight = self.matmul_weight(tensor, transpose)
        q_name, zero_name = weight.q_name, weight.zero_name
        w_scale = (weight.params.scale.reshape(-1) * alpha).astype(np.float32)
        nodes = []

        def add(op, inputs, out=None, **attrs):
            node, name = self.node(op, inputs, prefix, out, **attrs)
            nodes.append(node)
            return name

        if self.strategy == "ALWC":
            dq = helper.make_node(
                "DynamicQuantizeLinear",
                [x],
                [self.index.unique_name(f"{prefix}/{s}") for s in ("x_quantized", "x_scale", "x_zero_point")],
                name=self.index.unique_name(f"{prefix}/DynamicQuantizeLinear"),
            )
            nodes.append(dq)
            x_q, x_scale, x_zero = dq.output
            acc = add("MatMulInteger", [x_q, q_name, x_zero] + ([zero_name] if zero_name else []))
            w_scale_name = self.const(
                w_scale if w_scale.size > 1 else w_scale.reshape(()), f"{prefix}_w_scale"
            )
            scale = add("Mul", [x_scale, w_scale_name])
        else:
            if weight.equalizer is not None:
                x = add("Mul", [x, weight.equalizer])
            amax = add("Max", [self.reduce_abs_max(x, prefix, nodes), self.shared(_TINY)])
            inverse = add("Div", [self.shared(np.float32(127)), amax])
            rounded = add("Round", [add("Mul", [x, inverse])])
            x_q = add("Cast", [add("Add", [rounded, self.shared(np.float32(_ZERO))])], to=TensorProto.UINT8)
            acc = add("MatMulInteger", [x_q, q_name, self.shared(np.uint8(_ZERO)), zero_name])
            # The output scale is made by a Div, not a Mul: ONNX Runtime 1.32 would otherwise fuse the product
            # (and a following bias Add) into MatMulIntegerToFloat, which then scales the bias by the
            # per-row scale too.
            scale = add(
                "Div", [amax, self.const((127 / w_scale).astype(np.float32).reshape(()), f"{prefix}_w_scale")]
            )
        add("Mul", [add("Cast", [acc], to=TensorProto.FLOAT), scale], out=output)
        return nodes

    def reduce_abs_max(self, x: str, prefix: str, nodes: list[onnx.NodeProto]) -> str:
        node, magnitude = self.node("Abs", [x], prefix)
        nodes.append(node)
        if self.opset >= 18:
            node, out = self.node(
                "ReduceMax", [magnitude, self.shared(np.array([-1], np.int64))], prefix, keepdims=1
            )
        else:
            node, out = self.node("ReduceMax", [magnitude], prefix, axes=[-1], keepdims=1)
        nodes.append(node)
        return out


def _pair_safe(w: np.ndarray, params: QParams) -> QParams:
    """Per-column scales widened so that two same-sign codes at K positions 2i, 2i+1 sum to at most 128.

    ONNX Runtime's uint8 x int8 kernel on x86 without VNNI adds those two products in saturating int16; with
    activation codes up to 255 a pair sum of 128 stays exact (255 * 128 = 32640). Sums of float weights at
    most 127 * scale round to at most 128."""
    limit = int16_pair_limit(gemm_rows(w, "MatMul", False).astype(np.float64)) / params.qmax
    limit = limit.reshape(-1, params.scale.size).max(axis=0).reshape(params.scale.shape)
    return QParams(np.maximum(params.scale, limit), params.zero_point, params.qmin, params.qmax)


def run(model: onnx.ModelProto, config: QuantConfig, alwc_weights: str = "int8", ops: tuple[str, ...] = _OPS,
        **_) -> ConversionResult:
    """Dynamic quantization of `model` in place (quant_strategy ALWC or ACWL).

    `alwc_weights`: "int8" (default; pair-safe scales, uint8 x int8 kernel) or "uint8" (q + 128, exact
    uint8 x uint8 kernel at any scale, slower on CPUs without VNNI). `ops` limits the rewrite to these op
    types (FULL_QUANT uses it for the embedding tables of Gather)."""
    strategy = config.dynamic.quant_strategy
    ensure_opset(model, 11)
    plan = plan_weights(model, int8_rules(config, ops))
    result = ConversionResult(model, config.quant_type)
    result.skipped += [SkippedTensor(s.tensor, s.op_type, s.nodes, s.skip_reason) for s in plan.skipped]
    specs = {s.tensor: s for s in plan.quantized}
    log.info("%s weight plan (%s): %d weights to int8, %d stay float", config.quant_type, "/".join(ops),
             len(plan.quantized), len(plan.skipped))
    int8_weights = strategy == "ALWC" and alwc_weights == "int8"
    rw = _Rewriter(model, strategy, int8_weights)

    kept_float: dict[str, str] = {}  # weight -> why one of its users stays float
    done: dict[str, QuantizedTensor] = {}

    def rewrite(graph_nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        new_nodes: list[onnx.NodeProto] = []
        for node in graph_nodes:
            for sub in subgraphs(node):  # If/Loop/Scan bodies read the new constants from the outer scope
                rewritten = rewrite(list(sub.node))
                del sub.node[:]
                sub.node.extend(rewritten)
            weight = _weight_input(node, specs)
            if weight is None:
                new_nodes.append(node)
                continue
            spec = specs[weight]
            reason = _unsupported(node, weight, rw.index)
            if reason:
                kept_float.setdefault(weight, reason)
                new_nodes.append(node)
                continue
            extra_bytes = 0  # stored besides codes and scales
            if node.op_type == "Gather":
                nodes, w_hat, params = rw.tables.gather(node, weight)
                scheme, storage = embedding.SCHEME, embedding.STORAGE
            else:
                nodes, w_hat, params, extra_bytes = _matmul_nodes(rw, node, weight)
                scheme = "symmetric per-channel axis -1 (N)" if strategy == "ALWC" else "symmetric per-tensor"
                scheme += f"; activations {_ACTIVATION_SCHEME[strategy]}"
                storage = "MatMulInteger uint8 (zero point 128)"
                if int8_weights:
                    storage = "MatMulInteger int8" + (" (pair sums kept within int16)" if rw.pair_safe else "")
            new_nodes += nodes
            if weight not in done:
                w = rw.index.array(weight)
                w_ref = w.T if _stored_transposed(node, w.shape) else w
                done[weight] = QuantizedTensor(
                    weight,
                    node.op_type,
                    spec.nodes,
                    spec.shape,
                    8,
                    scheme,
                    storage,
                    bytes_before=w.nbytes,
                    bytes_after=w.size + 4 * params.scale.size + extra_bytes,
                    relative_error=relative_error(w_ref, w_hat),
                    scale=params.scale.ravel(),
                    zero_point=params.zero_point.ravel(),
                )
        return new_nodes

    new_nodes = rewrite(list(model.graph.node))

    for weight, record in done.items():
        if weight in kept_float:
            record.storage += (
                f" (a float copy stays for a user that cannot be rewritten: {kept_float[weight]})"
            )
        result.quantized.append(record)
    for weight, reason in kept_float.items():
        if weight not in done:
            spec = specs[weight]
            result.skipped.append(SkippedTensor(weight, spec.op_type, spec.nodes, reason))
    removed = {w for w in done if w not in kept_float}
    kept = [t for t in model.graph.initializer if t.name not in removed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + rw.initializers)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if set(ops) - {"Gather"}:
        result.notes.append(
            f"quant_strategy={strategy}: activations {_ACTIVATION_SCHEME[strategy]}, quantized at run time"
        )
    return result


_ACTIVATION_SCHEME = {
    "ALWC": "uint8 asymmetric per-tensor (runtime min/max)",
    "ACWL": "int8 symmetric per-row (runtime max |x| of each row)",
}


def _weight_input(node: onnx.NodeProto, specs: dict[str, WeightSpec]) -> str | None:
    """The planned weight this node reads, if any."""
    if node.op_type not in _OPS:
        return None
    for name in node.input[:2]:
        if name in specs:
            return name
    return None


def _unsupported(node: onnx.NodeProto, weight: str, index: GraphIndex) -> str:
    """Why this user of a planned weight keeps the float weight ('' when it can be rewritten)."""
    op = node.op_type
    if op == "Gather":
        return embedding.unsupported_gather(node)
    if node.input[1] != weight:
        return f"the constant is the first input of {op} '{node.name}'; only a constant second input is done"
    if node.input[0] in index.initializers:
        return f"{op} '{node.name}' multiplies two constants"
    if op == "Gemm" and attribute(node, "transA", 0):
        return f"Gemm '{node.name}' has transA=1"
    return ""


def _stored_transposed(node: onnx.NodeProto, shape: tuple[int, ...]) -> bool:
    """Whether the weight `node` reads as B is stored [N, K] (input channels last, Gemm transB=1); the integer
    path computes with [.., K, N]. A Gather table is never transposed."""
    return node.op_type != "Gather" and weight_layout(node, 1, shape).input_axis == len(shape) - 1


def _matmul_nodes(rw: _Rewriter, node: onnx.NodeProto, weight: str):
    prefix = node.name or rw.index.unique_name(node.op_type)
    transpose = _stored_transposed(node, tuple(rw.index.initializers[weight].dims))
    if node.op_type == "MatMul":
        nodes = rw.quantized_matmul(node.input[0], weight, transpose, node.output[0], prefix)
    else:
        alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        product = node.output[0] if not bias or beta == 0 else rw.index.unique_name(f"{prefix}/product")
        nodes = rw.quantized_matmul(node.input[0], weight, transpose, product, prefix, alpha)
        if bias and beta != 0:
            if beta != 1.0:
                if bias in rw.index.initializers:
                    bias = rw.const((rw.index.array(bias) * beta).astype(np.float32), f"{prefix}_bias")
                else:
                    scaled, bias = rw.node(
                        "Mul", [bias, rw.const(np.float32(beta), f"{prefix}_beta")], prefix
                    )
                    nodes.append(scaled)
            add, _ = rw.node("Add", [product, bias], prefix, output=node.output[0])
            nodes.append(add)
    quantized = rw.matmul_weight(weight, transpose)  # memoised: the codes quantized_matmul used
    # ACWL stores one float equalisation factor per input channel besides the codes and the scale.
    extra = 4 * quantized.w_hat.shape[-2] if quantized.equalizer else 0
    return nodes, quantized.w_hat, quantized.params, extra

"""FULL_QUANT parameters: scales, zero points and integer codes of every activation, weight, bias and constant the
QDQ rewrite will write, computed from the plan and the calibrated ranges (pure numpy, no onnxruntime).

Weights are int8 symmetric per output channel (or per tensor as the preset says); every preset keeps pairs of
u8*s8 products inside int16 (targets.Target.int16_pair_sums). Biases are int32 with scale
input_scale * weight_scale. Float constants that an int8 op reads as data (an Add's constant operand) get
activation-style parameters from their own values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ...model import GraphIndex, all_nodes, attribute, outer_reads, subgraphs
from ...plan import WeightSpec, gemm_rows, weight_layout
from ...qmath import (
    QParams,
    asymmetric_params,
    dequantize,
    int16_pair_limit,
    qrange,
    quantize,
    relative_error,
    round_half_away,
    symmetric_params,
)
from ...result import QuantizedTensor
from ...targets import WEIGHTED_OPS, Target
from .graph_plan import GraphPlan, data_slots

_INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class WeightParams:
    params: QParams
    codes: np.ndarray  # int8 (uint8 for asymmetric per-tensor presets), the weight's shape
    dtype: int  # TensorProto type of the codes
    axis: int | None  # DequantizeLinear axis (None: per tensor)
    record: QuantizedTensor  # for the summary and the reports

    @property
    def dequantized(self) -> np.ndarray:
        """What the int8 graph computes with (made when asked: bias correction reads it layer by layer, and a
        float copy of every weight held with the parameters would stay alive until the pass ends)."""
        return dequantize(self.codes, self.params)


@dataclass(frozen=True)
class BiasParams:
    codes: np.ndarray  # int32, one per output channel
    scale: np.ndarray  # float64: input scale * weight scale
    correction: np.ndarray | None = None  # what bias correction added, per output channel (float), for the reports

    @property
    def dequantized(self) -> np.ndarray:
        return (self.codes * self.scale).astype(np.float32)


@dataclass(frozen=True)
class ConstantParams:
    params: QParams
    codes: np.ndarray  # in the preset's activation type


@dataclass(frozen=True)
class QuantParams:
    """Everything the QDQ rewrite writes, keyed as the rewrite looks it up."""

    activations: dict[str, QParams]  # quantized activation tensor -> its parameters
    weights: dict[str, WeightParams]  # weight initializer -> int8 codes
    # Weights read inside If/Loop/Scan bodies, whose activations stay float: int8 behind a DequantizeLinear that
    # writes the weight's own name, which the bodies read from the outer scope.
    weight_only: dict[str, WeightParams]
    biases: dict[int, BiasParams]  # node position -> int32 bias
    constants: dict[str, ConstantParams]  # float initializer read as data by an int8 op


def quant_params(model: onnx.ModelProto, plan: GraphPlan, ranges: dict[str, tuple[float, float]], preset: Target,
                 zero_bias_positions: list[int]) -> QuantParams:
    """Parameters of the planned graph. Nodes at `zero_bias_positions` (those bias correction will correct) get an
    all-zero int32 bias when they have none."""
    graph = model.graph
    index = GraphIndex(graph)
    positions = {id(n): i for i, n in enumerate(graph.node)}
    activations = {name: activation_params(*ranges[source], preset) for name, source in plan.tensors.items()}

    weights: dict[str, WeightParams] = {}
    for name, spec in plan.weights.items():
        users = index.consumers.get(name, [])
        if not users or any(plan.roles[positions[id(n)]] != "compute" for n, _ in users):
            continue
        weights[name] = _weight(index.array(name), spec, preset, [n for n, _ in users])
    in_bodies = {name for node in graph.node for sub in subgraphs(node) for name in outer_reads(sub)}
    weight_only: dict[str, WeightParams] = {}
    for name, spec in plan.weights.items():
        if name not in weights and name in in_bodies:
            uses = [node for node, _ in all_nodes(graph) if node.name in spec.nodes]
            weight = _weight(index.array(name), spec, preset, uses)
            weight.record.storage += " (weight only: read inside an If/Loop/Scan body, whose activations stay float)"
            weight_only[name] = weight

    biases: dict[int, BiasParams] = {}
    constants: dict[str, ConstantParams] = {}
    corrected = set(zero_bias_positions)
    for pos, node in enumerate(graph.node):
        if plan.roles[pos] == "float":
            continue
        if node.op_type in WEIGHTED_OPS:
            bias = _bias(node, index, plan, weights, activations, pos in corrected)
            if bias is not None:
                biases[pos] = bias
            continue
        for slot in data_slots(node):
            name = node.input[slot] if slot < len(node.input) else ""
            if name in index.initializers and index.initializers[name].data_type == TensorProto.FLOAT \
                    and name not in constants:
                value = index.array(name)
                params = activation_params(float(value.min()), float(value.max()), preset)
                constants[name] = ConstantParams(params, quantize(value, params))
    return QuantParams(activations, weights, weight_only, biases, constants)


def _weight(w: np.ndarray, spec: WeightSpec, preset: Target, users: list[onnx.NodeProto]) -> WeightParams:
    depthwise = all(n.op_type == "Conv" and attribute(n, "group", 1) > 1 and spec.shape[1] == 1 for n in users)
    first = users[0]
    rows = gemm_rows(w, first.op_type, bool(attribute(first, "transB", 0)))
    params = weight_params(w, spec, preset, depthwise, rows)
    dtype = TensorProto.INT8 if params.qmin < 0 else TensorProto.UINT8
    # the codes in their own type (int8 / uint8), not quantize's int64: the same values at an eighth of the memory
    codes = quantize(w, params).astype(helper.tensor_dtype_to_np_dtype(dtype))
    dequantized = dequantize(codes, params)
    scheme = "symmetric " if not params.zero_point.any() and params.qmin < 0 else "asymmetric "
    scheme += f"per-channel axis {spec.axis}" if spec.axis is not None else "per-tensor"
    storage = "DequantizeLinear " + TensorProto.DataType.Name(dtype).lower()
    record = QuantizedTensor(
        spec.tensor, spec.op_type, spec.nodes, spec.shape, 8, scheme, storage, w.nbytes,
        codes.size + 5 * params.scale.size, relative_error(w, dequantized), scale=params.scale.ravel(),
        zero_point=params.zero_point.ravel())
    return WeightParams(params, codes, dtype, spec.axis, record)


def _bias(node: onnx.NodeProto, index: GraphIndex, plan: GraphPlan, weights: dict[str, WeightParams],
          activations: dict[str, QParams], zero_if_absent: bool) -> BiasParams | None:
    """int32 bias with scale input_scale * weight_scale (zeros where a corrected node has none)."""
    weight = node.input[1]
    if weight not in weights or node.input[0] not in activations or node.op_type == "MatMul":
        return None
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if not has_bias and not zero_if_absent:
        return None
    channels = weight_layout(node, 1, plan.weights[weight].shape).channels
    bias = index.array(node.input[2]).astype(np.float64) if has_bias else np.zeros(channels)
    in_scale = float(activations[node.input[0]].scale.ravel()[0])
    scale = in_scale * np.broadcast_to(weights[weight].params.scale.reshape(-1), (channels,)).astype(np.float64)
    return BiasParams(bias_codes(bias, scale), scale)


def bias_codes(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 codes of a float bias (0 where the scale is 0), saturated to the int32 range."""
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(scale > 0, bias / scale, 0.0)
    return np.clip(round_half_away(codes), *_INT32).astype(np.int32)


def activation_params(lo: float, hi: float, preset: Target) -> QParams:
    """Scale and zero point of an activation with float range [lo, hi] (widened to hold 0)."""
    span = np.array([lo, hi], np.float64)
    if preset.activation_symmetric:
        return symmetric_params(span, 8, None, narrow=True)
    qmin, qmax = qrange(8, preset.activation_signed)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi <= lo:
        return asymmetric_params(span, 8, None, signed=preset.activation_signed)
    # An integer zero point shifts the exact grid by up to half a step, which would clip one end of the range
    # (and put inputs normalised as (x - 127.5) / 127.5 exactly on rounding ties). Of the integer zero points
    # around the exact one (and their neighbours, for ranges that touch 0), take the one that needs the smallest
    # scale to keep [lo, hi] whole.
    base = int(np.floor(qmin - lo * (qmax - qmin) / (hi - lo)))
    best = (np.inf, qmin)
    for zero in range(base - 1, base + 3):
        below, above = zero - qmin, qmax - zero
        if below < 0 or above < 0 or (lo < 0 and below == 0) or (hi > 0 and above == 0):
            continue
        scale = max(-lo / below if lo < 0 else 0.0, hi / above if hi > 0 else 0.0)
        if scale < best[0]:
            best = (scale, zero)
    scale, zero = best
    return QParams(np.array([scale]), np.array([zero], np.int64), qmin, qmax)


def weight_params(w: np.ndarray, spec: WeightSpec, preset: Target, depthwise: bool = False,
                  rows: np.ndarray | None = None) -> QParams:
    """int8 symmetric per channel (the kernels and every runtime accept it); per tensor as the preset says.
    `rows` is the weight as [output channel, K] in the order the int8 GEMM sums over K (see plan.gemm_rows); with
    a preset that keeps pair sums in int16, the scale grows where two neighbouring codes could overflow."""
    if spec.axis is not None or preset.weight_per_tensor_symmetric:
        params = symmetric_params(w, 8, spec.axis, narrow=True)
        if preset.int16_pair_sums and not depthwise and rows is not None:
            limit = int16_pair_limit(rows.astype(np.float64)) / params.qmax
            limit = limit.max() if spec.axis is None else limit.reshape(-1, params.scale.size).max(axis=0)
            params = QParams(np.maximum(params.scale, limit.reshape(params.scale.shape)), params.zero_point,
                             params.qmin, params.qmax)
        return params
    return asymmetric_params(w, 8, None, signed=preset.weight_per_tensor_type == TensorProto.INT8)

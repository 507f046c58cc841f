"""WEIGHT_QUANT with a fixed bit width (1..16): quantize constant weights, store them compactly.

Default strategy: the weight is rebuilt in float by a decoder subgraph that ONNX Runtime folds at load (see
encoding.py): the file shrinks, inference runs the float graph. ON_THE_FLY: the weight stays integer in the graph
with a DequantizeLinear before its consumers, so it also stays small in memory at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..config import QuantConfig
from ..encoding import MIN_OPSET, SharedConstants, build_decoder
from ..errors import ConversionError
from ..model import GraphIndex, ensure_opset, opset_version
from ..plan import WeightSpec, plan_weights
from ..qmath import asymmetric_params, dequantize, qrange, quantize, reduce_axes
from ..result import ConversionResult, QuantizedTensor, SkippedTensor

# Variance corrections outside this open interval are treated as degenerate and dropped (as the reference does).
_VAR_CORR_LIMITS = (0.0, 10.0)


@dataclass
class QuantizedWeight:
    """Integer codes plus the per-channel affine map that rebuilds the (corrected) float weight."""

    codes: np.ndarray  # unsigned, < 2^bits
    bits: int
    scale: np.ndarray  # multiplies codes (broadcastable to the weight)
    offset: np.ndarray  # added after scaling
    zero_codes: np.ndarray  # code of the channel's zero point
    # raw parameters, for reports and ON_THE_FLY
    q_scale: np.ndarray
    q_zero_point: np.ndarray
    var_corr: np.ndarray
    mean_corr: np.ndarray

    def decoded(self) -> np.ndarray:
        # float32 in the decoder's order (Mul, then Add), so this equals what onnxruntime computes
        return self.codes.astype(np.float32) * self.scale.astype(np.float32) + self.offset.astype(np.float32)


def quantize_weight(w: np.ndarray, bits: int, axis: int | None, correction_axis: int | None,
                    bias_correction: bool) -> QuantizedWeight:
    params = asymmetric_params(w, bits, axis)
    q = quantize(w, params)
    ones = np.ones_like(params.scale)
    var_corr, mean_corr = ones, np.zeros_like(params.scale)
    if bias_correction:
        var_corr, mean_corr = _distribution_correction(w, dequantize(q, params), correction_axis)
    a = params.scale * var_corr
    offset = (params.qmin - params.zero_point) * a + mean_corr
    return QuantizedWeight(
        codes=q - params.qmin, bits=bits, scale=a, offset=offset, zero_codes=params.zero_point - params.qmin,
        q_scale=params.scale, q_zero_point=params.zero_point, var_corr=var_corr, mean_corr=mean_corr,
    )


def _distribution_correction(w: np.ndarray, w_hat: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: scale the dequantized weight to the float weight's spread, then shift it to its mean."""
    axes = reduce_axes(w.ndim, axis)
    w64, h64 = w.astype(np.float64), w_hat.astype(np.float64)
    std_w, std_h = w64.std(axis=axes, keepdims=True), h64.std(axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        var_corr = std_w / std_h
    lo, hi = _VAR_CORR_LIMITS
    var_corr = np.where(np.isfinite(var_corr) & (var_corr > lo) & (var_corr < hi), var_corr, 1.0)
    mean_corr = w64.mean(axis=axes, keepdims=True) - h64.mean(axis=axes, keepdims=True) * var_corr
    return var_corr, mean_corr


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    denom = float(np.sum(w.astype(np.float64) ** 2))
    err = float(np.sum((w.astype(np.float64) - w_hat) ** 2))
    return float(np.sqrt(err / denom)) if denom > 0 else float(err > 0)


def run(model: onnx.ModelProto, config: QuantConfig, **_) -> ConversionResult:
    """Fixed-bit weight quantization of `model` in place."""
    common, options = config.common, config.weight
    on_the_fly = options.dequant_strategy == "ON_THE_FLY"
    plan = plan_weights(model, config, per_channel=options.per_channel)
    result = ConversionResult(model, config.quant_type)
    result.skipped += [SkippedTensor(s.tensor, s.op_type, s.nodes, s.skip_reason) for s in plan.skipped]
    if on_the_fly:
        _raise_opset_for_storage(model, common.bit_num, result)
    else:
        ensure_opset(model, MIN_OPSET)
    index = GraphIndex(model.graph)
    shared = SharedConstants(index)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    removed: set[str] = set()
    for spec in plan.quantized:
        w = index.array(spec.tensor)
        qw = quantize_weight(w, spec.bits, spec.axis, spec.correction_axis, options.bias_correction)
        if on_the_fly:
            nodes, inits, storage, dequantized = _dequantize_linear(index, spec, qw, opset_version(model))
        else:
            decoder = build_decoder(index, shared, spec.tensor, qw.codes, spec.bits, qw.scale, qw.offset, qw.zero_codes,
                                    encode=common.enable_encode)
            if decoder.stored_bytes >= w.nbytes:
                result.skipped.append(SkippedTensor(spec.tensor, spec.op_type, spec.nodes,
                                                    "quantized storage would not be smaller than float"))
                continue
            nodes, inits, storage, dequantized = decoder.nodes, decoder.initializers, decoder.encoding, qw.decoded()
        new_nodes += nodes
        new_inits += inits
        removed.add(spec.tensor)
        result.quantized.append(_record(spec, qw, storage, w, dequantized, sum(_nbytes(t) for t in inits)))
    _replace(model, removed, new_nodes, shared.used_by(new_nodes) + new_inits)
    return result


def _raise_opset_for_storage(model: onnx.ModelProto, bits: int, result: ConversionResult) -> None:
    """DequantizeLinear needs opset 13 for int8 per-axis and opset 21 for int16 and int4 weights."""
    if bits > 8:
        ensure_opset(model, 21)
        return
    if bits <= 4:
        try:
            ensure_opset(model, 21)
            return
        except ConversionError:
            result.notes.append("the model could not be moved to opset 21, so 4-bit weights are stored as int8")
    ensure_opset(model, 13)


def _scheme(spec: WeightSpec) -> str:
    return "asymmetric " + (f"per-channel axis {spec.axis}" if spec.axis is not None else "per-tensor")


def _record(spec: WeightSpec, qw: QuantizedWeight, storage: str, w: np.ndarray, w_hat: np.ndarray,
            stored: int) -> QuantizedTensor:
    return QuantizedTensor(
        spec.tensor, spec.op_type, spec.nodes, spec.shape, spec.bits, _scheme(spec), storage,
        bytes_before=w.nbytes, bytes_after=stored, relative_error=relative_error(w, w_hat),
        scale=qw.q_scale.ravel(), zero_point=qw.q_zero_point.ravel(),
        correction_var=qw.var_corr.ravel(), correction_mean=qw.mean_corr.ravel(),
    )


def _nbytes(tensor: onnx.TensorProto) -> int:
    return len(tensor.raw_data) or numpy_helper.to_array(tensor).nbytes


def _dequantize_linear(index: GraphIndex, spec: WeightSpec, qw: QuantizedWeight, opset: int):
    """ON_THE_FLY: integer weight + DequantizeLinear producing the weight's original name.

    The variance correction goes into the scale; the mean correction can only move the integer zero point, so it
    is rounded to whole steps there.
    """
    bits = spec.bits
    if bits <= 4 and opset >= 21:
        dtype, np_type, width = TensorProto.INT4, np.int8, 4
    elif bits <= 8:
        dtype, np_type, width = TensorProto.INT8, np.int8, 8
    else:
        dtype, np_type, width = TensorProto.INT16, np.int16, 16
    lo, hi = qrange(width)
    q = qw.codes + qrange(bits)[0]  # signed codes of the asymmetric scheme
    scale = np.broadcast_to(qw.q_scale * qw.var_corr, np.broadcast_shapes(qw.q_scale.shape, qw.var_corr.shape))
    zero = qw.q_zero_point - np.rint(qw.mean_corr / scale)
    zero = np.clip(np.broadcast_to(zero, scale.shape), lo, hi).astype(np_type)
    axis = None if scale.size == 1 else int(np.argmax(scale.shape))
    scale_vec = scale.reshape(-1).astype(np.float32) if axis is not None else scale.reshape(()).astype(np.float32)
    zero_vec = zero.reshape(-1) if axis is not None else zero.reshape(())
    prefix = spec.tensor.replace("::", "_").strip("/")
    q_name, s_name, z_name = (index.unique_name(f"{prefix}_{s}") for s in ("quantized", "scale", "zero_point"))
    if dtype == TensorProto.INT4:
        q_tensor = helper.make_tensor(q_name, dtype, q.shape, q.astype(np.int8).ravel().tolist())
        z_tensor = helper.make_tensor(z_name, dtype, zero_vec.shape, zero_vec.astype(np.int8).ravel().tolist())
    else:
        q_tensor = numpy_helper.from_array(q.astype(np_type), q_name)
        z_tensor = numpy_helper.from_array(zero_vec, z_name)
    s_tensor = numpy_helper.from_array(scale_vec, s_name)
    attrs = {"axis": axis} if axis is not None else {}
    node = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [spec.tensor],
                            name=index.unique_name(f"{prefix}/DequantizeLinear"), **attrs)
    dequantized = ((q - zero.reshape(scale.shape).astype(np.float64)) * scale).astype(np.float32)
    storage = f"DequantizeLinear {TensorProto.DataType.Name(dtype).lower()}"
    return [node], [q_tensor, s_tensor, z_tensor], storage, dequantized


def _replace(model: onnx.ModelProto, removed: set[str], nodes: list[onnx.NodeProto],
             inits: list[onnx.TensorProto]) -> None:
    """Swap quantized initializers for their decoders; decoders go first since they read only constants."""
    kept = [t for t in model.graph.initializer if t.name not in removed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + inits)
    old_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + old_nodes)

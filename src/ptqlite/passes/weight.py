"""WEIGHT_QUANT with a fixed bit width (1..16): quantize constant weights, store them compactly.

Default strategy: the codes are decoded by a subgraph that ONNX Runtime folds at load (see encoding.py), so the
file shrinks. Every float tensor that folding makes stays in memory until folding ends, so the decoder makes as
few as it can (see decode_on_consumers): a weight read only by MatMul is folded to float codes by one Cast and
its per-column scale and offset are applied to the MatMul's output; an embedding table read only by Gather stays
integer and the gathered rows are decoded; any other weight (Conv, Gemm, ...) is rebuilt in float at load, so
those ops run the float graph. With block_size the codes, zero codes and scales of the block search are stored
packed and MatMul/Gemm weights are rebuilt in float at load (Gather tables stay integer, gathered rows decoded).
ON_THE_FLY: the weight stays integer in the graph with a DequantizeLinear before its consumers, so it also stays
small in memory at run time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import latency
from ..blockwise import FLOAT16_MAX, BlockQuant, float16_grid, quantize_blocks
from ..config import QuantConfig
from ..encoding import (
    MIN_OPSET,
    Builder,
    Decoder,
    SharedConstants,
    build_block_decoder,
    build_block_tables,
    build_decoder,
    decode_blocks,
    packed_bytes,
)
from ..errors import ConversionError
from ..model import GraphIndex, attribute, ensure_opset, opset_version, remove_initializers, subgraph_inputs
from ..plan import WeightSpec, plan_weights, weight_quant_rules
from ..prepare import fold_batch_norm
from ..qmath import (
    asymmetric_params,
    asymmetric_params_of_range,
    code_groups,
    dequantize,
    group_layout,
    pack_code_groups,
    pack_int4_array,
    qrange,
    quantize,
    reduce_axes,
    relative_error,
    relative_error_by_ranges,
)
from ..result import ConversionResult, QuantizedTensor, SkippedTensor
from ..stream import is_external, raw_tensor, release_pages, spill, streaming, trim_heap
from . import on_the_fly_speed

log = logging.getLogger(__name__)

# Variance corrections outside this open interval are treated as degenerate and dropped (as the reference does).
_VAR_CORR_LIMITS = (0.0, 10.0)


# Values of a row block (8 MB of float64 temporaries): a weight larger than this is quantized a block of rows at
# a time where the values are the same (quantize_weight).
BLOCK_VALUES = 1 << 20


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
        return self.decoded_rows(0, len(self.codes)) if self.codes.ndim else self._decode(self.codes, 0, 1)

    def decoded_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of decoded(), computed from those rows alone (the same values)."""
        return self._decode(self.codes[start:stop], start, stop)

    def _decode(self, codes: np.ndarray, start: int, stop: int) -> np.ndarray:
        # float32 in the decoder's order (Mul, then Add), so this equals what onnxruntime computes
        scale, offset = (rows_of(v, start, stop) for v in (self.scale, self.offset))
        return codes.astype(np.float32) * scale.astype(np.float32) + offset.astype(np.float32)


def rows_of(param: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a parameter broadcastable to a weight (all of it when it has one row)."""
    return param[start:stop] if np.ndim(param) and np.shape(param)[0] > 1 else param


def quantize_weight(w: np.ndarray, bits: int, axis: int | None, correction_axis: int | None,
                    bias_correction: bool, codes_dtype: type = np.int64,
                    block_values: int | None = None) -> QuantizedWeight:
    """Asymmetric codes of `w` per channel along `axis` (None: per tensor), with the distribution correction
    along `correction_axis` when `bias_correction`. A weight of more than `block_values` values is worked a block
    of rows at a time where that gives the same values: channels along axis 0 (every reduction within a row) or
    the columns of a matrix (minimum and maximum of the blocks' minima and maxima, the correction's sums carried
    row by row as numpy adds along axis 0). Other layouts (per tensor, a middle channel axis, a correction axis
    other than the channel's) reduce across rows in numpy's pairwise order and keep the whole weight."""
    block_values = BLOCK_VALUES if block_values is None else block_values
    rows = _row_blocks(w, axis, correction_axis, bias_correction, block_values)
    if not rows:
        return _quantize_whole(w, bits, axis, correction_axis, bias_correction, codes_dtype)
    qw = (_quantize_by_rows if rows == "rows" else _quantize_columns)(w, bits, bias_correction, codes_dtype,
                                                                      block_values)
    trim_heap()  # the blocks' temporaries come from the heap (stream.heap_temporaries): freed, given back
    return qw


def _row_blocks(w: np.ndarray, axis: int | None, correction_axis: int | None, bias_correction: bool,
                block_values: int) -> str:
    """"rows", "columns" or "" (the whole weight at once): see quantize_weight."""
    if w.ndim < 2 or w.size <= block_values or axis is None:
        return ""
    axis %= w.ndim
    if bias_correction and (correction_axis is None or correction_axis % w.ndim != axis):
        return ""
    if axis == 0:
        return "rows"
    return "columns" if w.ndim == 2 and w.shape[1] > 1 and w.flags.c_contiguous else ""


def _block_rows(w: np.ndarray, block_values: int) -> int:
    return max(1, block_values // max(1, w[0].size))


def _quantize_whole(w: np.ndarray, bits: int, axis: int | None, correction_axis: int | None,
                    bias_correction: bool, codes_dtype: type = np.int64) -> QuantizedWeight:
    params = asymmetric_params(w, bits, axis)
    q = quantize(w, params)
    ones = np.ones_like(params.scale)
    var_corr, mean_corr = ones, np.zeros_like(params.scale)
    if bias_correction:
        var_corr, mean_corr = _distribution_correction(w, dequantize(q, params), correction_axis)
    a = params.scale * var_corr
    offset = (params.qmin - params.zero_point) * a + mean_corr
    q -= params.qmin
    return QuantizedWeight(
        codes=q if codes_dtype == np.int64 else q.astype(codes_dtype), bits=bits, scale=a, offset=offset,
        zero_codes=params.zero_point - params.qmin, q_scale=params.scale, q_zero_point=params.zero_point,
        var_corr=var_corr, mean_corr=mean_corr,
    )


def _quantize_by_rows(w: np.ndarray, bits: int, bias_correction: bool, codes_dtype: type,
                      block_values: int) -> QuantizedWeight:
    """Channels along axis 0: each block of rows is quantized on its own, exactly as the whole weight."""
    step = _block_rows(w, block_values)
    codes = np.empty(w.shape, codes_dtype)
    parts = []
    for start in range(0, w.shape[0], step):
        part = _quantize_whole(w[start:start + step], bits, 0, 0, bias_correction, codes_dtype)
        codes[start:start + step] = part.codes
        part.codes = None
        parts.append(part)
        _release_rows(w, start, start + step)

    def joined(field: str) -> np.ndarray:
        return np.concatenate([getattr(part, field) for part in parts])

    return QuantizedWeight(
        codes=codes, bits=bits, scale=joined("scale"), offset=joined("offset"), zero_codes=joined("zero_codes"),
        q_scale=joined("q_scale"), q_zero_point=joined("q_zero_point"), var_corr=joined("var_corr"),
        mean_corr=joined("mean_corr"),
    )


def _quantize_columns(w: np.ndarray, bits: int, bias_correction: bool, codes_dtype: type,
                      block_values: int) -> QuantizedWeight:
    """Channels along the columns of a matrix, a block of rows at a time: the per-column minimum and maximum of
    the blocks' (exact), elementwise rounding, and the correction's means and deviations summed row by row into
    a carried sum, the order in which numpy reduces a C-contiguous matrix along axis 0 (tests check it)."""
    step = _block_rows(w, block_values)
    blocks = range(0, w.shape[0], step)
    low = high = None
    for start in blocks:
        part = w[start:start + step]
        part_low, part_high = part.min(axis=0, keepdims=True), part.max(axis=0, keepdims=True)
        low = part_low if low is None else np.minimum(low, part_low)
        high = part_high if high is None else np.maximum(high, part_high)
        _release_rows(w, start, start + step)
    params = asymmetric_params_of_range(low, high, bits)
    codes = np.empty(w.shape, codes_dtype)
    sums = [None, None]  # of the float weight and of the dequantized one, in float64
    for start in blocks:
        part = w[start:start + step]
        q = quantize(part, params)
        if bias_correction:
            _carry(sums, 0, part.astype(np.float64))
            _carry(sums, 1, dequantize(q, params).astype(np.float64))
        q -= params.qmin
        codes[start:start + step] = q
        del q
        _release_rows(w, start, start + step)
    ones = np.ones_like(params.scale)
    var_corr, mean_corr = ones, np.zeros_like(params.scale)
    if bias_correction:
        count = w.shape[0]
        means = [np.true_divide(total, count) for total in sums]
        squares = [None, None]
        for start in blocks:
            part = w[start:start + step].astype(np.float64)
            decoded = dequantize(codes[start:start + step].astype(np.int64) + params.qmin, params)
            for k, values in enumerate((part, decoded.astype(np.float64))):
                values -= means[k]
                _carry(squares, k, np.multiply(values, values, out=values))
            _release_rows(w, start, start + step)
        std_w, std_h = (np.sqrt(np.true_divide(total, count)) for total in squares)
        var_corr, mean_corr = _corrections(std_w, std_h, means[0], means[1])
    a = params.scale * var_corr
    offset = (params.qmin - params.zero_point) * a + mean_corr
    return QuantizedWeight(
        codes=codes, bits=bits, scale=a, offset=offset, zero_codes=params.zero_point - params.qmin,
        q_scale=params.scale, q_zero_point=params.zero_point, var_corr=var_corr, mean_corr=mean_corr,
    )


def _carry(sums: list, k: int, rows: np.ndarray) -> None:
    """Add `rows` (keepdims shape [n, columns]) into sums[k] one row after another, the first row copied."""
    for row in rows:
        if sums[k] is None:
            sums[k] = row[None].copy()
        else:
            sums[k] += row


def _release_rows(w: np.ndarray, start: int, stop: int) -> None:
    """A mapped weight's pages of rows [start, stop), read: dropped (stream.release_pages)."""
    row = w[0].size if w.ndim else 1
    release_pages(w, start * row, min(stop, len(w)) * row)


def _distribution_correction(w: np.ndarray, w_hat: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: scale the dequantized weight to the float weight's spread, then shift it to its mean."""
    axes = reduce_axes(w.ndim, axis)
    w64, h64 = w.astype(np.float64), w_hat.astype(np.float64)
    std_w, std_h = w64.std(axis=axes, keepdims=True), h64.std(axis=axes, keepdims=True)
    return _corrections(std_w, std_h, w64.mean(axis=axes, keepdims=True), h64.mean(axis=axes, keepdims=True))


def _corrections(std_w: np.ndarray, std_h: np.ndarray, mean_w: np.ndarray,
                 mean_h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        var_corr = std_w / std_h
    lo, hi = _VAR_CORR_LIMITS
    var_corr = np.where(np.isfinite(var_corr) & (var_corr > lo) & (var_corr < hi), var_corr, 1.0)
    mean_corr = mean_w - mean_h * var_corr
    return var_corr, mean_corr


def run(model: onnx.ModelProto, config: QuantConfig, samples=None, input_format: str | None = None,
        own_shapes: onnx.ModelProto | None = None, speed_check: bool = True, **_) -> ConversionResult:
    """Fixed-bit weight quantization of `model` in place. With block_size and calibration data (`samples` in
    memory, else [data_preprocess_param] calibrate_path) the block search weights each input channel by its
    activations' mean square ([weight_quant_param] activation_weighted). ON_THE_FLY folds inference
    BatchNormalization into the Conv before it, and its output is timed against the float model
    (on_the_fly_speed.py; `own_shapes`: the model before --inputShape, for graphs ONNX Runtime runs only so;
    speed_check=False for callers that convert many variants and measure them themselves, e.g. analyze)."""
    common, options = config.common, config.weight
    on_the_fly = options.dequant_strategy == "ON_THE_FLY"
    float_model, folded, untimed = None, 0, ""
    if on_the_fly:
        untimed = latency.untimed(model) if speed_check else "not asked for"
        if not untimed:
            float_model = onnx.ModelProto()
            float_model.CopyFrom(model)
        folded = 0 if streaming() else fold_batch_norm(model)  # streaming: the fold would rewrite mapped weights
    plan = plan_weights(model, weight_quant_rules(config, options.per_channel))
    result = ConversionResult(model, config.quant_type)
    if folded:
        result.notes.append(f"ON_THE_FLY: {folded} BatchNormalization folded into the Conv before them (ONNX "
                            "Runtime cannot fold them into a weight DequantizeLinear makes at run time)")
        if common.debug_info_save_path:  # the reports compare against the float graph as quantized
            result.float_model = onnx.ModelProto()
            result.float_model.CopyFrom(model)
    result.skipped += [SkippedTensor(s.tensor, s.op_type, s.nodes, s.skip_reason) for s in plan.skipped]
    log.info("weight plan: %d weights to quantize to %d bit, %d stay float (size, channel, dtype or skip rules)",
             len(plan.quantized), common.bit_num, len(plan.skipped))
    block = options.block_size
    if on_the_fly:
        _raise_opset_for_storage(model, common.bit_num, block, result)
    else:
        ensure_opset(model, MIN_OPSET)
    index = GraphIndex(model.graph)
    shared = SharedConstants(index, opset_version(model))
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    removed: set[str] = set()
    after: dict[str, list[onnx.NodeProto]] = {}
    in_subgraphs = subgraph_inputs(model.graph)  # weights read there keep their name and float form
    importance = _importance(model, config, plan.quantized, samples, input_format, result) if block else {}
    for spec in plan.quantized:
        w = index.array(spec.tensor)
        axis = block_axis(spec) if block else None
        if axis is not None:
            rows = gathers_rows(index, spec.tensor, in_subgraphs)
            bits, width = (gathered_table_scheme(spec, block, options.gather_min_bit_num) if rows
                           else (spec.bits, block))
            h = importance.get(spec.tensor) if not rows else None
            if h is not None and h.shape != (w.shape[axis],):
                h = None
            # both strategies: the same codes
            bq = _quantize_blocks(w, bits, axis, width, half_scales=True, importance=h)
            float_bytes = w.nbytes
            del w  # a streaming conversion unmaps the float weight before the codes are packed
            if on_the_fly:
                nodes, inits = (_blocked_gathered_rows(index, spec, bq, after) if rows
                                else _blocked_dequantize_linear(index, spec, bq))
            elif _packed_block_bytes(bq) >= float_bytes:
                result.skipped.append(SkippedTensor(spec.tensor, spec.op_type, spec.nodes,
                                                    "quantized storage would not be smaller than float"))
                continue
            else:
                nodes, inits = _packed_blocks(index, shared, spec, bq, rows, after)
            new_nodes += nodes
            removed.add(spec.tensor)
            result.quantized.append(_record_blocks(spec, bq, float_bytes, sum(_nbytes(t) for t in inits),
                                                   rows=rows, on_the_fly=on_the_fly))
            del bq
            # a streaming conversion writes them to the output's data file now; the heap is trimmed once, after
            # the last weight: the next weight's search reuses these temporaries (the same sizes layer after
            # layer), where a trim per weight made it fault them in again (a third of the pass's system time)
            new_inits += spill(inits, trim=False)
            continue
        # codes < 2^16: uint16 until they are stored (int4/int8/int16 or packed), a quarter of int64's memory
        qw = quantize_weight(w, spec.bits, spec.axis, spec.correction_axis, options.bias_correction,
                             codes_dtype=np.uint16)
        if on_the_fly:
            nodes, inits, storage, dequantized = _dequantize_linear(index, spec, qw, opset_version(model))
        else:
            where = decode_on_consumers(index, spec.tensor, qw, in_subgraphs)
            decoder = build_decoder(index, shared, spec.tensor, qw.codes, spec.bits, qw.scale, qw.offset, qw.zero_codes,
                                    encode=common.enable_encode, result=_RESULTS[where])
            mapped_later = 0 if where == "load" else decoder.scale.nbytes + decoder.offset.nbytes
            if decoder.stored_bytes + mapped_later >= w.nbytes:
                result.skipped.append(SkippedTensor(spec.tensor, spec.op_type, spec.nodes,
                                                    "quantized storage would not be smaller than float"))
                continue
            nodes, inits, storage, dequantized = decoder.nodes, decoder.initializers, decoder.encoding, qw.decoded_rows
            if where != "load":
                for node, slot in index.consumers[spec.tensor]:  # for the debug reports: codes -> float weight
                    result.input_maps[(node.name, slot)] = (decoder.scale.astype(np.float32),
                                                            decoder.offset.astype(np.float32))
                inits = inits + _decode_after(index, shared, spec.tensor, decoder, where, after)
        new_nodes += nodes
        removed.add(spec.tensor)
        result.quantized.append(_record(spec, qw, storage, w, dequantized, sum(_nbytes(t) for t in inits)))
        del w, qw, dequantized
        new_inits += spill(inits)
    trim_heap()
    mapping = [n for nodes in after.values() for n in nodes]
    # shared values (the decoders' lookup tables) first: they read constants only
    new_nodes = shared.nodes_used_by(new_nodes + mapping) + new_nodes
    replace_weights(model, removed, new_nodes, shared.used_by(new_nodes + mapping) + new_inits, after)
    if on_the_fly and result.quantized:
        if float_model is not None:
            on_the_fly_speed.check(float_model, result, own_shapes)
        elif speed_check:
            result.notes.append(f"ON_THE_FLY speed not measured: {untimed}")
    return result


# Where the affine map of the codes runs, and what the decoder folded at load then yields.
_RESULTS = {"load": "weight", "MatMul": "float codes", "Gather": "codes"}


def decode_on_consumers(index: GraphIndex, tensor: str, qw: QuantizedWeight, in_subgraphs: set[str]) -> str:
    """"MatMul", "Gather" or "load": where the per-channel map of `tensor`'s codes can run.

    ONNX Runtime keeps every tensor that constant folding makes until folding ends, so a Cast-Mul-Add chain
    holds three float copies of the weight at load. "MatMul" (every consumer reads it as B, scale and offset
    per column): x @ (u * a + b) = (x @ u) * a + sum(x) * b, so one Cast is folded and two Mul, one ReduceSum and
    one Add run on the output. "Gather" (every consumer gathers rows, scale and offset per row): the table stays
    integer and only the gathered rows are cast and mapped, exactly like the folded decoder would. Conv weights
    stay "load": ONNX Runtime optimizes Conv layouts around constant weights, and their offset has no cheap
    form on the output.
    """
    consumers = index.consumers.get(tensor, [])
    if not consumers or tensor in index.graph_output_names or tensor in in_subgraphs:
        return "load"
    rank = qw.codes.ndim
    ops = {node.op_type for node, _ in consumers}
    params = (np.shape(qw.scale), np.shape(qw.offset))
    if (ops == {"MatMul"} and rank >= 2 and all(slot == 1 and node.input[0] != tensor for node, slot in consumers)
            and all(all(d == 1 for d in shape[:-1]) for shape in params)):
        return "MatMul"
    if (ops == {"Gather"} and all(all(d == 1 for d in shape[1:]) for shape in params)
            and all(slot == 0 and attribute(node, "axis", 0) % rank == 0 and node.input[1] != tensor
                    for node, slot in consumers)):
        return "Gather"
    return "load"


def _decode_after(index: GraphIndex, shared: SharedConstants, tensor: str, decoder: Decoder, where: str,
                  after: dict[str, list[onnx.NodeProto]]) -> list[onnx.TensorProto]:
    """Point every consumer of `tensor` at the decoder's codes and map its output back (see decode_on_consumers).

    The nodes that follow a consumer go into `after`, keyed by the consumer's new output name; returns the
    constants they read.
    """
    scale, offset = decoder.scale, decoder.offset
    if where == "MatMul" and len(decoder.scale.shape) == 2:  # per column: a vector broadcasts for any x rank
        scale, offset = scale.reshape(-1), offset.reshape(-1)
    # A per-tensor map is a scalar (broadcasts with any output rank).
    scale, offset = (v.reshape(()) if v.size == 1 else v for v in (scale, offset))
    inits = [numpy_helper.from_array(v, index.unique_name("ptq_w")) for v in (scale, offset)]
    a, b = inits[0].name, inits[1].name
    for node, _ in index.consumers[tensor]:
        out = node.output[0]
        raw = index.unique_name("ptq_m")
        node.output[0] = raw
        new: list[onnx.NodeProto] = []
        add = _NodeAdder(index, new)
        if where == "MatMul":
            node.input[1] = decoder.output
            x = node.input[0]
            total = add("ReduceSum", [x, shared.get(np.array([-1], np.int64))], keepdims=1)
            add("Add", [add("Mul", [raw, a]), add("Mul", [total, b])], output=out)
        else:  # Gather: rows of integer codes, cast and mapped with their row's scale and offset
            node.input[0] = decoder.output
            ids, axis = node.input[1], attribute(node, "axis", 0)
            row_a = a if scale.size == 1 else add("Gather", [a, ids], axis=axis)
            row_b = b if offset.size == 1 else add("Gather", [b, ids], axis=axis)
            as_float = add("Cast", [raw], to=TensorProto.FLOAT)
            add("Add", [add("Mul", [as_float, row_a]), row_b], output=out)
        after[raw] = new
    return inits


class _NodeAdder:
    """Appends the nodes that map one consumer's output; returns each node's output name. Like decoder nodes
    they carry no names and short value names: they are many (a few per weight), and names cost file bytes."""

    def __init__(self, index: GraphIndex, nodes: list[onnx.NodeProto]):
        self.index, self.nodes = index, nodes

    def __call__(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        name = output or self.index.unique_name("ptq_m")
        self.nodes.append(helper.make_node(op, inputs, [name], **attrs))
        return name


def _raise_opset_for_storage(model: onnx.ModelProto, bits: int, block: int, result: ConversionResult) -> None:
    """DequantizeLinear needs opset 13 for int8 per-axis and opset 21 for int16, int4 and block-wise weights."""
    if bits > 8 or block:
        try:
            ensure_opset(model, 21)
        except ConversionError as exc:
            need = "block_size" if block else f"bit_num={bits} (int16 weights)"
            raise ConversionError(f"{need} with ON_THE_FLY needs opset 21 (DequantizeLinear with block_size and "
                                  f"int4/int16 inputs); {exc}") from None
        return
    if bits <= 4:
        try:
            ensure_opset(model, 21)
            return
        except ConversionError as exc:
            note = f"4-bit weights are stored as int8: int4 needs opset 21 and {exc}"
            log.warning("%s", note)
            result.notes.append(note)
    ensure_opset(model, 13)


BLOCK_OPS = ("MatMul", "Gemm", "Gather")


def block_axis(spec: WeightSpec) -> int | None:
    """The axis blocks run along: the input (K) axis of a MatMul or Gemm weight, the row of a Gather table (the
    other of the weight's last two axes from its output-channel axis). None keeps the weight per channel: other
    ops (Conv, LSTM ...), a shared weight with one scale for the tensor, a channel axis not among the last two."""
    rank = len(spec.shape)
    if spec.op_type not in BLOCK_OPS or spec.axis is None or rank < 2:
        return None
    axis = spec.axis % rank
    if axis not in (rank - 1, rank - 2) or (spec.op_type == "Gather" and rank != 2):
        return None
    return rank - 2 if axis == rank - 1 else rank - 1


def _scheme(spec: WeightSpec) -> str:
    return "asymmetric " + (f"per-channel axis {spec.axis}" if spec.axis is not None else "per-tensor")


def _record(spec: WeightSpec, qw: QuantizedWeight, storage: str, w: np.ndarray, w_hat_rows, stored: int
            ) -> QuantizedTensor:
    """`w_hat_rows(start, stop)`: rows [start, stop) of the dequantized weight (no whole copy is made)."""
    return QuantizedTensor(
        spec.tensor, spec.op_type, spec.nodes, spec.shape, spec.bits, _scheme(spec), storage,
        bytes_before=w.nbytes, bytes_after=stored, relative_error=weight_error(w, w_hat_rows),
        scale=qw.q_scale.ravel(), zero_point=qw.q_zero_point.ravel(),
        correction_var=qw.var_corr.ravel(), correction_mean=qw.mean_corr.ravel(),
    )


def weight_error(w: np.ndarray, w_hat_rows) -> float:
    """relative_error(w, w_hat) from the rows of w_hat (`w_hat_rows(start, stop)`), a block of rows at a time:
    the same value bit for bit (qmath.relative_error_by_ranges)."""
    if w.ndim == 0:
        return relative_error(w, w_hat_rows(0, 1))
    row = max(1, w[0].size)

    def flat(start: int, stop: int) -> np.ndarray:
        first, last = start // row, -(-stop // row)
        return w_hat_rows(first, last).reshape(-1)[start - first * row:stop - first * row]

    return relative_error_by_ranges(w, flat, leaf=max(BLOCK_VALUES, row),
                                    release=lambda start, stop: release_pages(w, start, stop))


def _nbytes(tensor: onnx.TensorProto) -> int:
    """The bytes of a tensor this pass made: raw data from its shape and type (each read of a bytes field copies
    it: a large weight's codes once more per read), int4 two values a byte; already in the output's data file, the
    length written there."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return int(next(entry.value for entry in tensor.external_data if entry.key == "length"))
    if tensor.HasField("raw_data"):
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
            return (count + 1) // 2
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return numpy_helper.to_array(tensor).nbytes


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
    qmin = qrange(bits)[0]
    scale = np.broadcast_to(qw.q_scale * qw.var_corr, np.broadcast_shapes(qw.q_scale.shape, qw.var_corr.shape))
    zero = qw.q_zero_point - np.rint(qw.mean_corr / scale)
    zero = np.clip(np.broadcast_to(zero, scale.shape), lo, hi).astype(np_type)
    axis = None if scale.size == 1 else int(np.argmax(scale.shape))
    scale_vec = scale.reshape(-1).astype(np.float32) if axis is not None else scale.reshape(()).astype(np.float32)
    zero_vec = zero.reshape(-1) if axis is not None else zero.reshape(())
    q = _signed_codes(qw.codes, qmin, np_type)
    prefix = spec.tensor.replace("::", "_").strip("/")
    q_name, s_name, z_name = (index.unique_name(f"{prefix}_{s}") for s in ("quantized", "scale", "zero_point"))
    if dtype == TensorProto.INT4:
        q_tensor = int4_tensor(q_name, q)
        z_tensor = int4_tensor(z_name, zero_vec)
    else:
        q_tensor = numpy_helper.from_array(q, q_name)
        z_tensor = numpy_helper.from_array(zero_vec, z_name)
    del q
    s_tensor = numpy_helper.from_array(scale_vec, s_name)
    attrs = {"axis": axis} if axis is not None else {}
    node = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [spec.tensor],
                            name=index.unique_name(f"{prefix}/DequantizeLinear"), **attrs)
    zero64 = zero.reshape(scale.shape).astype(np.float64)

    def dequantized(start: int, stop: int) -> np.ndarray:  # rows of what DequantizeLinear computes
        q = qw.codes[start:stop].astype(np.int64) + qmin
        return ((q - rows_of(zero64, start, stop)) * rows_of(scale, start, stop)).astype(np.float32)

    storage = f"DequantizeLinear {TensorProto.DataType.Name(dtype).lower()}"
    return [node], [q_tensor, s_tensor, z_tensor], storage, dequantized


def _signed_codes(codes: np.ndarray, qmin: int, np_type: type) -> np.ndarray:
    """codes + qmin (the asymmetric scheme's signed codes) as `np_type`, a block of rows at a time."""
    signed = np.empty(codes.shape, np_type)
    if codes.ndim == 0:
        signed[...] = codes.astype(np.int64) + qmin
        return signed
    step = _block_rows(codes, BLOCK_VALUES)
    for start in range(0, len(codes), step):
        signed[start:start + step] = codes[start:start + step].astype(np.int32) + qmin
    return signed


def int4_tensor(name: str, values: np.ndarray, direct: bool = False) -> onnx.TensorProto:
    """An int4 initializer as raw packed bytes (two values a byte), not one int32 per value. `direct`: while a
    streaming conversion runs, written to the output's data file now, from the packed array (stream.raw_tensor;
    the caller keeps the order spill would write its tensors in)."""
    packed = pack_int4_array(values)
    written = raw_tensor(name, TensorProto.INT4, np.shape(values), packed) if direct else None
    if written is not None:
        return written
    return helper.make_tensor(name, TensorProto.INT4, np.shape(values), packed.tobytes(), raw=True)


def _storage_type(bits: int) -> tuple[int, type]:
    if bits <= 4:
        return TensorProto.INT4, np.int8
    return (TensorProto.INT8, np.int8) if bits <= 8 else (TensorProto.INT16, np.int16)


def _blocked_dequantize_linear(index: GraphIndex, spec: WeightSpec, bq: BlockQuant):
    """ON_THE_FLY with block_size: integer weight + block-wise DequantizeLinear (opset 21) producing the weight's
    name. ONNX Runtime fuses it with a MatMul reading it as B into MatMulNBits (4 and 8 bits)."""
    dtype, np_type = _storage_type(bq.bits)
    prefix = spec.tensor.replace("::", "_").strip("/")
    q_name, s_name, z_name = (index.unique_name(f"{prefix}_{s}") for s in ("quantized", "scale", "zero_point"))
    if dtype == TensorProto.INT4:
        # streaming, the packed codes go to the data file as they are (no bytes copies), in the order spill writes
        # the three tensors: codes, scales, zero points
        q_tensor = int4_tensor(q_name, bq.codes, direct=True)
        s_tensor, cast = _scale_tensor(index, bq, s_name)
        if is_external(q_tensor):
            s_tensor = spill([s_tensor], trim=False)[0]
        z_tensor = int4_tensor(z_name, bq.zero_point, direct=True)
    else:
        q_tensor = numpy_helper.from_array(bq.codes.astype(np_type), q_name)
        z_tensor = numpy_helper.from_array(bq.zero_point.astype(np_type), z_name)
        s_tensor, cast = _scale_tensor(index, bq, s_name)
    node = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [spec.tensor],
                            name=index.unique_name(f"{prefix}/DequantizeLinear"), axis=bq.axis, block_size=bq.block)
    return [n for n in (cast, node) if n is not None], [q_tensor, s_tensor, z_tensor]


def gathers_rows(index: GraphIndex, tensor: str, in_subgraphs: set[str]) -> bool:
    """Whether every consumer of `tensor` gathers rows of it (Gather axis 0, the tensor as data, not indices)."""
    consumers = index.consumers.get(tensor, [])
    return bool(consumers) and tensor not in index.graph_output_names and tensor not in in_subgraphs and all(
        node.op_type == "Gather" and slot == 0 and attribute(node, "axis", 0) == 0 and node.input[1] != tensor
        for node, slot in consumers)


def _blocked_gathered_rows(index: GraphIndex, spec: WeightSpec, bq: BlockQuant,
                           after: dict[str, list[onnx.NodeProto]]):
    """An embedding table with block-wise scales along its rows: the table is gathered as integers and only the
    gathered rows are decoded ((codes - zero point) * scale with their gathered scales and zero points), so no
    float copy of the table is made per run, and the table itself is read in place (memory-mapped from external
    data: only the gathered rows' pages are resident).

    Below 8 bits the codes are stored packed in a uint8 table, unsigned, and each gathered row unpacked: int4
    codes two a byte (the low nibble first), split in float; other widths (and int4 rows of odd width) by whole
    groups of bytes (pack_code_groups: 4 codes of 6 bits in 3 bytes), unpacked with BitShift and BitwiseAnd
    (decode_code_groups), so the table takes `bits` bits a value in the file and in memory. (A Cast of an int4
    table to int8, folded at load, held an int8 copy of the whole table.)"""
    np_type = _storage_type(bq.bits)[1]
    prefix = spec.tensor.replace("::", "_").strip("/")
    q_name, s_name, z_name = (index.unique_name(f"{prefix}_{s}") for s in ("quantized", "scale", "zero_point"))
    width = int(bq.codes.shape[-1])
    blocks = int(bq.scale.shape[-1])
    codes = bq.codes
    if blocks * bq.block != width:
        # A partial last block: its codes are padded with the block's zero code so the gathered rows reshape to
        # [rows, blocks, block]; the decoded rows are cut back to the table's width.
        padding = np.repeat(bq.zero_point[:, -1:], blocks * bq.block - width, axis=1).astype(codes.dtype)
        codes = np.concatenate([codes, padding], axis=1)
    packing = packed_table(bq.bits, int(codes.shape[-1]))
    zero = bq.zero_point
    if packing:
        if packing == "nibbles" and codes.dtype == np.int8:
            unsigned = unsigned_block_codes(codes, bq.bits)
        else:
            unsigned = codes.astype(np.int16) - qrange(bq.bits)[0]
        if packing == "nibbles":
            unsigned = unsigned.astype(np.uint8, copy=False)
            stored = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
        else:
            stored = pack_code_groups(unsigned, bq.bits)
        del unsigned
        q_tensor = numpy_helper.from_array(stored, q_name)
        zero, np_type = zero - qrange(bq.bits)[0], np.uint8
    else:
        q_tensor = numpy_helper.from_array(codes.astype(np_type), q_name)
    z_tensor = numpy_helper.from_array(zero.astype(np_type), z_name)
    half = _on_float16_grid(bq.scale)
    s_tensor = numpy_helper.from_array(bq.scale.astype(np.float16 if half else np.float32), s_name)
    padded = int(codes.shape[-1]) != width
    nibbles = packing == "nibbles"
    consts = {kind: index.unique_name(f"{prefix}_{kind}")
              for kind in ("blocks", "scales", "row", "last", "16th", "16", "zero", "width", "flat")}
    const_tensors = [numpy_helper.from_array(np.array(v, dtype), consts[k]) for k, v, dtype in
                     (("blocks", [-1, blocks, bq.block], np.int64), ("scales", [-1, blocks, 1], np.int64),
                      ("row", [codes.shape[-1]], np.int64), ("last", [-1], np.int64), ("16th", 1 / 16, np.float32),
                      ("16", 16, np.float32), ("zero", [0], np.int64), ("width", [width], np.int64),
                      ("flat", [-1, codes.shape[-1]], np.int64))
                     if k in ("blocks", "scales") or (k == "row" and not padded)
                     or (nibbles and k in ("last", "16th", "16"))
                     or (padded and k in ("last", "zero", "width", "flat"))]
    groups = None
    if packing == "groups":
        groups = CodeGroups(index, prefix, bq.bits, int(codes.shape[-1]))
        const_tensors += groups.constants
    for node, _ in index.consumers[spec.tensor]:
        out, ids = node.output[0], node.input[1]
        node.input[0] = q_name
        node.output[0] = index.unique_name(f"{out}_codes")
        after[node.output[0]] = _decode_gathered_blocks(index, node.name, node.output[0], ids, out,
                                                        (s_name, z_name), consts, nibbles, half, padded, groups)
    return [], [q_tensor, s_tensor, z_tensor, *const_tensors]


def packed_table(bits: int, width: int) -> str:
    """How a gathered table of `bits`-bit codes with rows of `width` codes (padded to whole blocks) is stored:
    "nibbles" (int4, even width: two codes a byte), "groups" (other widths below 8 bits: pack_code_groups) or ""
    (int8 or int16 codes, gathered as they are)."""
    if bits == 4 and width % 2 == 0:
        return "nibbles"
    return "groups" if bits < 8 else ""


class CodeGroups:
    """The constants and nodes that unpack rows of pack_code_groups bytes into their codes with standard ops
    only (opset 18: BitShift, BitwiseOr, BitwiseAnd): a row's bytes viewed as [-1, bytes, groups] planes and cast
    to uint32 (the smallest type BitShift takes besides uint8); for each code of a group the plane its lowest bit
    is in and the next plane are gathered (whole planes: contiguous copies) and joined into 16-bit words, the
    code's bits masked and shifted down, giving [-1, codes, groups]: the row's codes in order. No result depends
    on how a runtime shifts: the left shift never overflows (a byte by 8) and the right shift drops only zero bits
    (masked first), so it is exact division by a power of two. (OpenVINO saturates uint8 left shifts and rounds
    uint8 right shifts: docs/architecture.md, "Portable arithmetic".)"""

    def __init__(self, index: GraphIndex, prefix: str, bits: int, width: int):
        count, size = code_groups(bits)
        self.groups = -(-width // count)
        self.cut = self.groups * count != width  # a row padded to whole groups: the padding codes are cut off
        lo, hi, shift = group_layout(bits)
        values = {"planes": np.array([-1, size, self.groups], np.int64), "lo": lo.astype(np.int64),
                  "hi": hi.astype(np.int64), "eight": np.array(8, np.uint32),
                  "fields": (((1 << bits) - 1) << shift).astype(np.uint32)[:, None],
                  "shift": shift.astype(np.uint32)[:, None],
                  "codes_2d": np.array([-1, self.groups * count], np.int64), "start": np.array([0], np.int64),
                  "stop": np.array([width], np.int64), "axis": np.array([-1], np.int64)}
        if not self.cut:
            del values["start"], values["stop"], values["axis"]
        self.names = {kind: index.unique_name(f"{prefix}_{kind}") for kind in values}
        self.constants = [numpy_helper.from_array(v, self.names[k]) for k, v in values.items()]

    def decode(self, add, rows: str) -> str:
        """The codes (uint32) of the gathered rows of bytes `rows`, as [-1, width]."""
        c = self.names
        planes = add("Cast", [add("Reshape", [rows, c["planes"]], "planes")], "planes_u32", to=TensorProto.UINT32)
        low = add("Gather", [planes, c["lo"]], "low_bytes", axis=1)
        high = add("BitShift", [add("Gather", [planes, c["hi"]], "high_bytes", axis=1), c["eight"]], "high_8",
                   direction="LEFT")
        fields = add("BitwiseAnd", [add("BitwiseOr", [low, high], "words"), c["fields"]], "fields")
        codes = add("BitShift", [fields, c["shift"]], "codes_planes", direction="RIGHT")
        codes = add("Reshape", [codes, c["codes_2d"]], "codes_2d")
        if self.cut:
            codes = add("Slice", [codes, c["start"], c["stop"], c["axis"]], "codes_cut")
        return codes


def _decode_gathered_blocks(index: GraphIndex, name: str, codes: str, ids: str, out: str,
                            tables: tuple[str, str], consts: dict[str, str], nibbles: bool,
                            half: bool, padded: bool = False, groups: CodeGroups | None = None
                            ) -> list[onnx.NodeProto]:
    """(codes - zero point) * scale per block of the gathered rows `codes`, as DequantizeLinear with block_size
    computes it, on rows reshaped to [rows, blocks, block]: OpenVINO 2026.4 reads a block-wise DequantizeLinear
    only on inputs of static shape, and gathered rows have the shape of the ids. nibbles: each gathered byte
    holds two codes, split as high = floor(byte / 16), low = byte - 16 high (exact in float32); groups: the rows
    are pack_code_groups bytes, unpacked by CodeGroups; half: the scale table is float16, its gathered rows cast
    to float32; padded: the table's rows carry a padded last block, cut off the decoded rows."""
    nodes: list[onnx.NodeProto] = []

    def add(op, inputs, kind, **attrs):
        nodes.append(helper.make_node(op, inputs, [index.unique_name(f"{out}_{kind}")],
                                      name=index.unique_name(f"{name}/{kind}"), **attrs))
        return nodes[-1].output[0]

    scale, zero = (add("Reshape", [add("Gather", [table, ids], kind, axis=0), consts["scales"]], f"{kind}_3d")
                   for table, kind in zip(tables, ("scale", "zero_point")))
    if half:
        scale = add("Cast", [scale], "scale_float", to=TensorProto.FLOAT)
    if nibbles:
        packed = add("Cast", [codes], "bytes_float", to=TensorProto.FLOAT)
        high = add("Floor", [add("Mul", [packed, consts["16th"]], "bytes_16th")], "high")
        low = add("Sub", [packed, add("Mul", [high, consts["16"]], "high_16")], "low")
        pairs = add("Concat", [add("Unsqueeze", [low, consts["last"]], "low_1"),
                               add("Unsqueeze", [high, consts["last"]], "high_1")], "pairs", axis=-1)
        as_float = add("Reshape", [pairs, consts["blocks"]], "codes_float")
    else:
        if groups is not None:
            codes = groups.decode(add, codes)
        as_float = add("Cast", [add("Reshape", [codes, consts["blocks"]], "codes_3d")], "codes_float",
                       to=TensorProto.FLOAT)
    centred = add("Sub", [as_float, add("Cast", [zero], "zero_float", to=TensorProto.FLOAT)], "centred")
    rows = add("Mul", [centred, scale], "rows")
    if padded:
        rows = add("Slice", [add("Reshape", [rows, consts["flat"]], "rows_flat"), consts["zero"], consts["width"],
                             consts["last"]], "rows_cut")
    row_shape = add("Concat", [add("Shape", [ids], "ids_shape"), consts["row"] if not padded else consts["width"]],
                    "rows_shape", axis=0)
    nodes.append(helper.make_node("Reshape", [rows, row_shape], [out], name=index.unique_name(f"{name}/rows")))
    return nodes


def gathered_table_scheme(spec: WeightSpec, block: int, min_bits: int) -> tuple[int, int]:
    """Bits and block length of a block-wise table that is only gathered: at least `min_bits`
    ([weight_quant_param] gather_min_bit_num, default 6), since a table is read row by row and not multiplied, its
    width costs file bytes but no time, and a 4-bit embedding table cost a synthetic decoder more logits cosine
    (0.931 against 0.949 with the table float) than all its 4-bit MatMuls. A table raised to 8 bits or more gets
    one scale per row (that loses nothing measurable against blocks of 32 at 8 bits: 0.9484 against 0.9486); one
    raised to fewer gets blocks of RAISED_BLOCK (block_size's when longer): at 6 bits a scale per row has three
    times the error of blocks (relative error 0.061 against 0.020 for blocks of 32 and 0.023 for 64 on the 3 GB
    decoder's table), and blocks of 64 take 6.4 bits a value against 6.75 for 32 (docs/results.md, "6-bit
    embedding tables")."""
    if spec.bits >= min_bits:
        return spec.bits, block
    row = int(spec.shape[-1])
    return min_bits, row if min_bits >= 8 else min(row, max(block, RAISED_BLOCK))


RAISED_BLOCK = 64


def _decode_gathered_rows(index: GraphIndex, tensor: str, codes: str, zero: str, scale: str, blocks: str, bits: int,
                          after: dict[str, list[onnx.NodeProto]]) -> None:
    """Point every Gather of `tensor` at the integer table `codes` and decode the rows it gathers, with the rows
    of the per-block `zero` codes and `scale`s (signed or unsigned codes alike: decode_blocks only needs their
    difference to fit centred_type(bits))."""
    for node, _ in index.consumers[tensor]:
        out, ids = node.output[0], node.input[1]
        raw = index.unique_name("ptq_m")
        node.input[0], node.output[0] = codes, raw
        new: list[onnx.NodeProto] = []
        add = _NodeAdder(index, new)
        zero_rows, scale_rows = (add("Gather", [table, ids], axis=0) for table in (zero, scale))
        decode_blocks(add, raw, zero_rows, scale_rows, blocks, -1, bits, output=out)
        after[raw] = new


def unsigned_block_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed block codes minus qmin, in [0, 2^bits): int8 codes as uint8, their bytes plus -qmin mod 256 (the
    same values, one array of a byte a code), wider ones as int32."""
    qmin = qrange(bits)[0]
    if codes.dtype == np.int8:
        return codes.view(np.uint8) + np.uint8(-qmin)
    return codes.astype(np.int32) - qmin


def _packed_block_bytes(bq: BlockQuant) -> int:
    """Bytes the default strategy stores for `bq`: codes and zero codes packed, float16 scales (float32 where
    they are off the float16 grid)."""
    scale_bytes = (2 if _on_float16_grid(bq.scale) else 4) * bq.scale.size
    return packed_bytes(bq.codes.size, bq.bits) + packed_bytes(bq.zero_point.size, bq.bits) + scale_bytes


def _packed_blocks(index: GraphIndex, shared: SharedConstants, spec: WeightSpec, bq: BlockQuant, rows: bool,
                   after: dict[str, list[onnx.NodeProto]]):
    """Default strategy with block_size: unsigned codes and zero codes packed at bit_num, float16 scales, decoded
    at load to the weight (folded; equal bit for bit to ON_THE_FLY's block-wise DequantizeLinear). A table that
    is only gathered stays integer, as the per-channel default does: the consumers gather integer rows and their
    blocks' zero codes and scales, and decode only those rows (the same bits as the decoded table's rows)."""
    codes, zero = unsigned_block_codes(bq.codes, bq.bits), bq.zero_point - qrange(bq.bits)[0]
    if not rows:
        decoder = build_block_decoder(index, shared, spec.tensor, codes, zero, bq.scale, bq.axis, bq.block, bq.bits)
        return decoder.nodes, decoder.initializers
    builder = Builder(index, shared, "packed")
    tables = build_block_tables(builder, codes, zero, bq.scale, bq.axis, bq.block, bq.bits)
    _decode_gathered_rows(index, spec.tensor, tables.codes, tables.zero, tables.scale, tables.index, bq.bits, after)
    return builder.decoder.nodes, builder.decoder.initializers


def _importance(model: onnx.ModelProto, config: QuantConfig, specs: list[WeightSpec], samples,
                input_format: str | None, result: ConversionResult) -> dict[str, np.ndarray]:
    """Weight name -> its input channels' activation mean squares, for the block search; {} without calibration
    data, with activation_weighted=false, or in a streaming conversion (which does not hold the float model to run
    it)."""
    from ..data import has_calibration_data

    if not config.weight.activation_weighted or (samples is None and not has_calibration_data(config)):
        return {}
    if streaming():
        note = "activation-weighted block search not used: a streaming conversion does not run the float model"
        log.info("%s", note)
        result.notes.append(note)
        return {}
    from ..activation_weights import measure_or_skip

    if samples is None:
        from ..data import calibration_set

        samples = calibration_set(config, model, input_format)
    weights = {s.tensor for s in specs if s.op_type in ("MatMul", "Gemm") and block_axis(s) is not None}
    squares, note = measure_or_skip(model, weights, samples)
    log.info("%s", note)
    result.notes.append(note)
    return squares


def _quantize_blocks(w: np.ndarray, bits: int, axis: int, block: int, half_scales: bool,
                     importance: np.ndarray | None = None) -> BlockQuant:
    """The block search, with scales on the float16 grid when `half_scales` (ON_THE_FLY stores them so: 16 bits
    per block instead of 32, 4.6 instead of 5.1 bits a weight at int4 block 32). A weight whose scales would pass
    float16's largest value keeps float32 scales. `importance` weights the search's error per input channel."""
    def release(a: int, b: int) -> None:
        release_pages(w, a, b)

    if half_scales:
        bq = quantize_blocks(w, bits, axis, block, release=release, scale_grid=float16_grid, importance=importance)
        if bq.scale.max(initial=0) < FLOAT16_MAX:
            return bq
    return quantize_blocks(w, bits, axis, block, release=release, importance=importance)


def _scale_tensor(index: GraphIndex, bq: BlockQuant, name: str) -> tuple[onnx.TensorProto, onnx.NodeProto | None]:
    """The block scales as `name` (float32): scales on the float16 grid are stored as float16 and cast by a Cast
    that ONNX Runtime folds at load (before it fuses DequantizeLinear + MatMul into MatMulNBits), else float32."""
    if not _on_float16_grid(bq.scale):
        return numpy_helper.from_array(bq.scale.astype(np.float32), name), None
    half = index.unique_name(f"{name}_float16")
    cast = helper.make_node("Cast", [half], [name], to=TensorProto.FLOAT, name=index.unique_name(f"{name}/Cast"))
    return numpy_helper.from_array(bq.scale.astype(np.float16), half), cast


def _on_float16_grid(scale: np.ndarray) -> bool:
    return bool(np.all(np.abs(scale) < FLOAT16_MAX)) and np.array_equal(
        scale.astype(np.float16).astype(np.float32), scale)


def _record_blocks(spec: WeightSpec, bq: BlockQuant, float_bytes: int, stored: int,
                   rows: bool = False, on_the_fly: bool = True) -> QuantizedTensor:
    if on_the_fly and rows and bq.bits < 8:  # stored packed (see _blocked_gathered_rows)
        storage = f"DequantizeLinear int{bq.bits} block {bq.block} of the gathered rows"
        blocks = int(bq.scale.shape[-1])
        if packed_table(bq.bits, blocks * bq.block) == "groups":
            storage += " ({} codes in {} bytes)".format(*code_groups(bq.bits))
    elif on_the_fly:
        dtype = TensorProto.DataType.Name(_storage_type(bq.bits)[0]).lower()
        storage = f"DequantizeLinear {dtype} block {bq.block}" + (" of the gathered rows" if rows else "")
    else:
        storage = f"packed block {bq.block}" + (", gathered rows decoded" if rows else "")
    # The per-block parameters (an eighth of the float weight's bytes at block 32) are kept for the debug
    # reports, which a streaming conversion does not write: there they would add up to a part of the model.
    keep = not streaming()
    return QuantizedTensor(
        spec.tensor, spec.op_type, spec.nodes, spec.shape, bq.bits,
        f"asymmetric block {bq.block} along axis {bq.axis}", storage,
        bytes_before=float_bytes, bytes_after=stored, relative_error=_relative(bq.squared_norm, bq.squared_error),
        scale=bq.scale.ravel() if keep else None, zero_point=bq.zero_point.ravel() if keep else None,
    )


def _relative(denom: float, squared_error: float) -> float:
    """||w - w'|| / ||w|| from the summed squares of w and of the error (as qmath.relative_error, without the
    dequantized copy)."""
    return float(np.sqrt(squared_error / denom)) if denom > 0 else float(squared_error > 0)


def replace_weights(model: onnx.ModelProto, removed: set[str], nodes: list[onnx.NodeProto],
             inits: list[onnx.TensorProto], after: dict[str, list[onnx.NodeProto]] | None = None) -> None:
    """Swap quantized initializers for their decoders; decoders go first since they read only constants.

    after: nodes to insert right after the node whose first output is the key. `inits` is emptied.
    """
    remove_initializers(model.graph, removed)
    # one at a time, each dropped from `inits` once the graph holds its copy (protobuf copies on append): a
    # caller that keeps no other reference never holds the decoders' data twice
    inits.reverse()
    while inits:
        model.graph.initializer.append(inits.pop())
    old_nodes = list(model.graph.node)
    after = after or {}
    del model.graph.node[:]
    model.graph.node.extend(nodes + [n for node in old_nodes for n in [node, *after.get(node.output[0], [])]])

"""FULL_QUANT: int8 weights and activations, as a QDQ graph that onnxruntime runs with integer kernels.

`run` is the whole flow, one step after the other; each step reads what the previous ones returned and nothing
else (docs/full_quant.md explains every choice):

1. prepare: fold constants and BatchNormalization, infer shapes.
2. equalise (per_channel=false: cross-layer equalisation, each ReLU6 kept one Clip from calibrated channel
   maxima) or smooth (per_channel=true: MatMul/Gemm inputs whose channels spread widely, from calibrated
   per-channel |x| maxima).
3. plan: which nodes run in int8 and which activations get a QDQ pair (graph_plan.py).
4. statistics: one streaming pass for the ranges of the planned activations and, for bias correction, the
   float output means of the layers to correct (statistics.py).
5. refine: a Softmax whose input carries an additive mask, and a Concat of inputs whose ranges differ by more
   than 16x, stay float; plan again.
6. parameters: scales, zero points and codes of activations, weights, biases, constants (params.py).
7. bias correction: corrected int32 biases, measured on the float graph before it is rewritten
   (bias_correction.py).
8. rewrite: one QDQ rewrite of the graph (rewrite.py); biases take the output's rank where onnxruntime would
   otherwise make a float Gemm.
9. embedding tables: int8 Gather tables on presets that run them (ptqlite.embedding).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto

from ... import latency as timer
from ...config import QuantConfig
from ...embedding import int8_gather_tables
from ...equalize import capped_tensors, equalize
from ...errors import PtqError
from ...model import ensure_opset
from ...plan import WeightPlan, int8_rules, plan_weights
from ...prepare import prepare, tensor_types
from ...result import ConversionResult, SkippedTensor
from ...smooth import MIN_SPREAD, smooth, smoothing_groups
from ...targets import WEIGHTED_OPS, target
from .bias_correction import correct_biases, mean_requests
from .graph_plan import (
    CONCAT_SPREAD,
    MASK_VALUE,
    GraphPlan,
    correctable_nodes,
    masked_softmax,
    plan_graph,
    wide_concats,
)
from .latency import smallest_first
from .params import QuantParams, activation_params, quant_params, weight_params
from .rewrite import keep_bias_adds_apart, rewrite
from .statistics import CHANNEL_MAX, RANGE, Statistics, StatRequest, collect

log = logging.getLogger(__name__)

__all__ = ["activation_params", "channel_max", "plan_graph", "run", "weight_params"]

# Smoothing needs each channel's maximum over at least this many values (rows of the MatMul input).
MIN_SMOOTHING_ROWS = 64


def run(model: onnx.ModelProto, config: QuantConfig, input_format: str | None = None, progress: bool | None = None,
        samples: Iterable[dict[str, np.ndarray]] | None = None, own_shapes: onnx.ModelProto | None = None,
        **_) -> ConversionResult:
    """Full quantization of `model`: in place, or, after latency-aware planning, the result's model is the
    candidate graph it timed (a compact message of its own, `model` then only read). `samples` (re-iterable, one dict of batch-1 inputs per sample)
    replaces the calibration files of [data_preprocess_param] when given. `own_shapes`: the model before
    --inputShape fixed its shapes (latency-aware planning times with its shapes where the fixed ones fail)."""
    options = config.full
    preset = target(options.target_device)
    method = options.activation_quant_method
    result = ConversionResult(model, config.quant_type)
    ensure_opset(model, 13)  # per-axis DequantizeLinear
    original_info = list(model.graph.value_info)
    ranks: dict[str, int] = {}  # of every tensor whose shape is known, refilled with types
    types = prepare(model, ranks)
    if samples is None:
        from ...data import calibration_set

        samples = calibration_set(config, model, input_format)
    skip = set(config.common.skip_quant_node)

    if not options.per_channel:
        result.notes += _equalize(model, samples, progress)
        types = tensor_types(model, ranks)  # equalisation adds tensors
    if config.common.debug_info_save_path:
        # The reports compare against the float graph as quantized (smoothing is undone through input_maps).
        result.float_model = onnx.ModelProto()
        result.float_model.CopyFrom(model)
    weight_plan = plan_weights(model, int8_rules(config, WEIGHTED_OPS, options.per_channel))
    if options.per_channel:
        smoothed = _smooth(model, weight_plan, skip, samples, progress, result)
        if smoothed:
            skip |= smoothed  # the dividing Muls read the activation at full precision
            types = tensor_types(model, ranks)
    result.skipped += [SkippedTensor(s.tensor, s.op_type, s.nodes, s.skip_reason) for s in weight_plan.skipped]

    plan = plan_graph(model, types, weight_plan.quantized, preset, skip)
    log.info("graph plan: %d of %d weights int8, %d activations to calibrate with %s", len(weight_plan.quantized),
             len(weight_plan.specs), len(plan.tensors), method)
    to_correct = correctable_nodes(model, plan) if options.bias_correction else []
    stats = collect(model, _range_requests(plan, method) + mean_requests(model, to_correct), samples, progress)
    result.notes += stats.notes
    log.info("calibration: %d samples measured", stats.samples)
    plan, ranges = _refine_plan(model, plan, stats, types, weight_plan, preset, skip, method,
                                              samples, progress, result)

    params = quant_params(model, plan, ranges, preset, zero_bias_positions=to_correct)
    params, corrected = correct_biases(model, params, stats, to_correct, preset, samples, progress)
    if corrected:
        result.notes.append(f"bias correction of {len(corrected)} layers over {stats.samples} samples")

    if options.latency_aware and preset.provider == "CPUExecutionProvider":
        plan, params, demoted, timed = _never_slower_than_float(model, types, weight_plan, preset, skip, plan,
                                                                params, ranges, to_correct, samples, progress,
                                                                result, config, original_info, ranks, own_shapes)
    else:
        demoted, timed = set(), None
    _record_corrections(model, params)
    if timed is None:
        summary, tables, kept = _write(model, plan, params, preset, config, original_info, ranks)
    else:  # the graph written for timing is the output: not written twice (nor copied back into `model`)
        result.model, (summary, tables, kept) = timed
    result.quantized += [weight.record for weight in (*params.weights.values(), *params.weight_only.values())]
    result.skipped += _unused_weights(weight_plan, params, plan, demoted)
    result.quantized += tables
    result.skipped += kept

    kind = TensorProto.DataType.Name(preset.activation_type).lower()
    scheme = "symmetric" if preset.activation_symmetric else "asymmetric"
    result.notes.append(f"target {preset.name}: {len(plan.tensors)} activations {kind} {scheme} "
                        f"({method}), {summary.dropped} Relu/Clip folded into the op before them")
    if summary.float_ops:
        result.notes.append("ops left in float: " + ", ".join(sorted(summary.float_ops)))
    return result


def _record_corrections(model: onnx.ModelProto, params: QuantParams) -> None:
    """quant_param.csv's CorrectionMean of a corrected layer's weight: the per-channel shift bias correction added
    to the layer's output (through its int32 bias); CorrectionVar 1, as only the mean is corrected."""
    for pos, bias in params.biases.items():
        weight = params.weights.get(model.graph.node[pos].input[1]) if bias.correction is not None else None
        if weight is not None:
            weight.record.correction_mean = np.asarray(bias.correction, np.float64).ravel()
            weight.record.correction_var = np.ones_like(weight.record.correction_mean)


def channel_max(model: onnx.ModelProto, names: list[str], samples, progress: bool | None, axis: int = 1,
                magnitude: bool = False) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per-channel maxima (of |x| with `magnitude`) of the named tensors over the samples, and how many values
    each maximum was taken over; no pass when there is nothing to measure."""
    if not names:
        return {}, {}
    requests = [StatRequest(n, CHANNEL_MAX, axis=axis, magnitude=magnitude) for n in names]
    stats = collect(model, requests, samples, progress, "channel ranges")
    return stats.channel_max, stats.channel_counts


def _equalize(model: onnx.ModelProto, samples, progress: bool | None) -> list[str]:
    """Cross-layer equalisation. The ReLU6 caps between equalised convs become one Clip each when calibration
    says which channels reach the cap (per-channel Min caps ran in float and made the int8 model slower)."""
    peaks, _ = channel_max(model, capped_tensors(model), samples, progress)
    return equalize(model, channel_max=peaks)


def _smooth(model: onnx.ModelProto, weight_plan: WeightPlan, skip: set[str], samples, progress: bool | None,
            result: ConversionResult) -> set[str]:
    """Activation smoothing; the names of the dividing Mul nodes it added. It moves activation spread into
    weight rows, which only per-channel weight scales absorb (MiniLM with per_channel=false: sentence cosine
    0.940 without smoothing, 0.855 with it)."""
    groups = smoothing_groups(model, {s.tensor for s in weight_plan.quantized}, skip)
    if not groups:
        return set()
    amax, counts = channel_max(model, [g.tensor for g in groups], samples, progress, axis=-1, magnitude=True)
    # A maximum over a few values cannot tell an outlier channel from noise (ResNet20's classifier input, one
    # row per image: spread above 4 with 4 images, 2.7 with 100).
    amax = {name: peak for name, peak in amax.items() if counts[name] >= MIN_SMOOTHING_ROWS}
    smoothed, rescale = smooth(model, groups, amax)
    result.input_maps.update({key: (factor, None) for key, factor in rescale.items()})
    if smoothed:
        result.notes.append(f"activation smoothing in front of {len(smoothed)} MatMul/Gemm input(s) whose "
                            f"channel ranges differ by {MIN_SPREAD:g}x or more")
    return set(smoothed)


def _write(model: onnx.ModelProto, plan: GraphPlan, params: QuantParams, preset, config: QuantConfig,
           original_info, ranks: dict[str, int]):
    """The QDQ graph, in place: the rewrite, the original value_info, biases of the output's rank, int8 Gather
    tables. Returns the rewrite's summary and the tables quantized and skipped."""
    summary = rewrite(model, plan, params, preset)
    del model.graph.value_info[:]
    model.graph.value_info.extend(original_info)
    if preset.bias_with_output_rank:
        keep_bias_adds_apart(model, ranks)
    tables, kept = int8_gather_tables(model, config) if preset.int8_gather_tables else ([], [])
    return summary, tables, kept


def _never_slower_than_float(model, types, weight_plan, preset, skip, plan, params, ranges, to_correct, samples,
                             progress, result, config, original_info, ranks, own_shapes=None):
    """The plan and parameters of the first candidate (all int8 first, then growing shares of the smallest layers
    in float) that runs no slower than the prepared float graph; the layers it put back to float; and that
    candidate's written graph with _write's results (None when nothing could be timed).

    `model` (the prepared float graph) is timed as it is, not copied: nothing writes to it while candidates are
    timed. Each candidate is written into a copy of it and then copied once more, so that the candidate holds only
    its own tensors (protobuf frees the float weights the rewrite replaced only with the whole message); only the
    fastest candidate so far is kept."""
    feeds: dict = {}
    # Nodes inside If/Loop/Scan bodies whose weights are int8 weight-only: the first to go back to float
    body_nodes = {n for name in params.weight_only for n in weight_plan_nodes(weight_plan, name)}

    def candidate(demoted: set[str], clear_of: tuple[float, float], cand_plan: GraphPlan | None = None):
        if cand_plan is None:
            cand_plan = plan if not demoted else plan_graph(model, types, weight_plan.quantized, preset,
                                                            skip | demoted)
        cand_ranges = ranges
        if not set(cand_plan.tensors.values()) <= set(ranges):  # not expected; measured rather than guessed
            cand_ranges = collect(model, _range_requests(cand_plan, config.full.activation_quant_method),
                                  samples, progress).ranges
        cand_params = params
        if demoted:
            cand_params = quant_params(model, cand_plan, cand_ranges, preset, zero_bias_positions=to_correct)
            # A layer's correction was measured on its own (float input), so it holds in any plan.
            cand_params = dataclasses.replace(cand_params, biases={
                pos: params.biases.get(pos, bias) for pos, bias in cand_params.biases.items()}, weight_only={
                name: w for name, w in cand_params.weight_only.items()
                if not set(weight_plan_nodes(weight_plan, name)) & demoted})
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        outcome = _write(rewritten, cand_plan, cand_params, preset, config, original_info, ranks)
        written = onnx.ModelProto()
        written.CopyFrom(rewritten)
        del rewritten
        return (cand_plan, cand_params, timer.measure(model, written, feeds, own_shapes, clear_of=clear_of),
                (written, outcome))

    try:
        feeds.update(next(iter(samples)))
        # every layer int8: kept at <= 1.0, measured again within the margin, layers demoted above it
        plan0, params0, timing0, written0 = candidate(set(), (1.0, timer.SLOWER))
        timing0 = timer.settled(timing0, lambda: timer.measure(model, written0[0], feeds, own_shapes))
    except (PtqError, StopIteration) as exc:
        # Timing is advice: a graph onnxruntime will not load or run as timed (control flow that does not survive
        # the fixed --inputShape shapes, say) keeps every planned layer int8 (the verification step judges it).
        reason = str(exc).splitlines()[0] if str(exc) else "no calibration sample to time on"
        result.notes.append(f"latency-aware planning skipped: {reason}")
        return plan, params, set(), None
    first = timing0
    # the fastest so far: (layers in float, (plan, params, timing, written)); ties go to the earlier candidate
    best = (set(), (plan0, params0, timing0, written0))
    weighted = smallest_first(model, plan)
    if first.ratio > timer.SLOWER:
        for demoted in timer.demotions(weighted, body_nodes):
            try:
                # the search stops at <= 1.0; a candidate slower than the fastest so far is not kept
                tried = (demoted, candidate(demoted, (1.0, best[1][2].ratio)))
            except PtqError:  # as above: this candidate cannot be timed, so it is not chosen
                break
            ratio = tried[1][2].ratio
            if ratio < best[1][2].ratio:
                best = tried
            del tried
            if ratio <= 1.0:
                break
    every = set(weighted) | body_nodes
    if every and best[0] >= every and best[1][0].tensors:
        # Every weighted layer went back to float: the int8 activations left (an Add of two activations, say)
        # only add quantize/dequantize pairs and save no bytes, so the output is the float graph
        try:
            float_plan = GraphPlan(("float",) * len(model.graph.node))
            best = (best[0], candidate(best[0], (1.0, timer.SLOWER), float_plan))
        except PtqError:
            pass
    demoted, (best_plan, best_params, timing, written) = best
    if demoted:
        result.notes.append(f"latency-aware planning: int8 ran {first.ratio:.2f}x float on this machine; "
                            f"{len(demoted)} of {len(weighted) + len(body_nodes)} "
                            "weighted layers kept float ("
                            + ("those inside If/Loop/Scan bodies first, then " if body_nodes else "")
                            + f"the smallest), now {timing.ratio:.2f}x float "
                            "([full_quant_param] latency_aware=false keeps every layer int8)")
    else:
        result.notes.append(f"latency-aware planning: int8 runs {first.ratio:.2f}x float on this machine "
                            "(1 thread, first calibration sample)")
    return best_plan, best_params, demoted, written


def weight_plan_nodes(weight_plan: WeightPlan, tensor: str) -> tuple[str, ...]:
    """The nodes that read planned weight `tensor` (none when it is not planned)."""
    return next((spec.nodes for spec in weight_plan.quantized if spec.tensor == tensor), ())


def _unused_weights(weight_plan: WeightPlan, params, plan: GraphPlan, demoted: set[str]) -> list[SkippedTensor]:
    """Planned weights that stay float because a node that reads them stays float."""
    done = set(params.weights) | set(params.weight_only)
    return [SkippedTensor(s.tensor, s.op_type, s.nodes,
                          timer.DEMOTED if set(s.nodes) & demoted else
                          "read by a node that stays float (skip_quant_node, a float input, or an op without an "
                          "int8 kernel on this preset)")
            for s in weight_plan.quantized if s.tensor not in done]


def _range_requests(plan: GraphPlan, method: str) -> list[StatRequest]:
    return [StatRequest(source, RANGE, method) for source in sorted(set(plan.tensors.values()))]


def _refine_plan(model, plan, stats: Statistics, types, weight_plan, preset, skip, method, samples, progress,
                 result) -> tuple[GraphPlan, dict[str, tuple[float, float]]]:
    """The plan without the int8 nodes that calibration shows must stay float, and the ranges it needs: Softmax
    nodes whose input carries an additive mask, Concat nodes joining inputs of very different ranges."""
    masked = masked_softmax(model, plan, stats.ranges)
    wide = wide_concats(model, plan, stats.ranges)
    if not masked and not wide:
        return plan, stats.ranges
    # Only quantized tensors drop out of the plan (those nodes, and what then has no int8 reader).
    plan = plan_graph(model, types, weight_plan.quantized, preset, skip | masked | wide)
    ranges = stats.ranges
    if not set(plan.tensors.values()) <= set(ranges):  # not expected; measured again rather than guessed
        ranges = collect(model, _range_requests(plan, method), samples, progress).ranges
    if masked:
        result.notes.append(f"{len(masked)} Softmax node(s) kept float: their input carries an additive mask "
                            f"(values <= {-MASK_VALUE:g}), which would take the whole int8 range")
    if wide:
        result.notes.append(f"{len(wide)} Concat node(s) kept float: their inputs' ranges differ by more than "
                            f"{CONCAT_SPREAD:g}x, which one int8 scale cannot hold ({', '.join(sorted(wide))})")
    return plan, ranges

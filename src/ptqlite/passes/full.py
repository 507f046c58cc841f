"""FULL_QUANT: int8 weights and activations, as a QDQ graph that onnxruntime runs with integer kernels.

Steps (docs/full_quant.md explains each choice):
1. prepare: fold constants and BatchNormalization; with per_channel=false, cross-layer equalisation (after a
   pass over the calibration samples for the per-channel maxima that turn each ReLU6 into one Clip); with
   per_channel=true, activation smoothing of MatMul/Gemm inputs whose channels spread widely (ptqlite.smooth,
   after a pass for their per-channel maxima).
2. plan: which nodes compute in int8 ("compute": own output parameters; "shared": output reuses the input's
   parameters, e.g. Reshape or MaxPool), which stay float (skip_quant_node, ops without int8 kernels, Softmax on
   most presets, ops that no int8 op reads), and which activation tensors get a QuantizeLinear/DequantizeLinear
   pair.
3. statistics: one streaming pass of the calibration samples through onnxruntime with the planned tensors exposed
   as outputs; one observer per tensor, updated per sample. A Softmax whose input reaches -1e4 (an attention
   mask) is then kept float and the plan redone.
4. rewrite: QDQ pairs on activations, int8 weights (symmetric, per output channel or per tensor; every preset
   keeps pairs of u8*s8 products inside int16) behind a DequantizeLinear, int32 biases with scale
   act_scale * weight_scale; a Relu/Clip right after an int8 op is dropped when the output quantizer clamps
   exactly as it would; a float-output int8 MatMul's 1-D bias gets the output's rank (onnxruntime would make a
   float Gemm of it on static shapes); Gather tables become int8 rows on the CPU preset.
5. bias_correction: a second streaming pass through the float model with, beside each weighted layer, a copy
   that reads its input through the quantizer and uses the quantized weight; the mean per-channel difference
   is added to each bias.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..config import QuantConfig
from ..equalize import capped_tensors, equalize
from ..errors import DataError
from ..model import GraphIndex, attribute, cpu_session, ensure_opset
from ..plan import WeightSpec, plan_weights
from ..prepare import drop_unused_initializers, is_float, prepare, tensor_types
from ..qmath import (
    QParams,
    asymmetric_params,
    dequantize,
    gemm_rows,
    int16_pair_limit,
    qrange,
    quantize,
    reduce_axes,
    round_half_away,
    symmetric_params,
)
from ..result import ConversionResult, QuantizedTensor, SkippedTensor
from ..smooth import MIN_SPREAD, smooth, smoothing_groups
from ..targets import FUSABLE_ACTIVATIONS, WEIGHTED_OPS, Target, target
from . import dynamic
from .weight import relative_error

log = logging.getLogger(__name__)

# Ops whose every float input is data to quantize; the others quantize input 0 only (Clip bounds, Resize scales,
# normalisation weights stay float).
_ALL_INPUTS = {"Add", "Mul", "Sub", "Div", "Concat", "PRelu"}
_INT32 = (-(2**31), 2**31 - 1)
# Ops that only reshape or rename a tensor: a chain of them may carry a weighted op's float output to the graph.
_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
# Weighted ops that onnxruntime runs as int8 kernels with float output. A Conv has no such kernel: left float
# it would dequantize its weight at every run (MobileNet V2's 1x1 logits conv: 1.10x instead of 1.0x the
# latency of quantize_static's model), so its output is quantized like any other.
_FLOAT_OUTPUT_OPS = {"MatMul", "Gemm"}
# Smoothing needs each channel's maximum over at least this many values (rows of the MatMul input).
MIN_SMOOTHING_ROWS = 64
# A Softmax input at or below -MASK_VALUE is an additive attention mask (exp(-1e4) is 0 in float32).
MASK_VALUE = 1e4
# Channel axis of the weighted-op outputs that bias correction averages per channel (NCHW, or [M, N] for Gemm).
_CHANNEL_AXIS = 1


@dataclass
class GraphPlan:
    """Decisions on the prepared float graph (node positions index graph.node)."""

    roles: list[str]  # per node: "compute", "shared" or "float"
    tensors: dict[str, str] = field(default_factory=dict)  # quantized activation -> tensor giving its range
    fused: dict[str, int] = field(default_factory=dict)  # activation output -> position of a fusable Relu/Clip
    weights: dict[str, WeightSpec] = field(default_factory=dict)


def run(model: onnx.ModelProto, config: QuantConfig, input_format: str | None = None, progress: bool | None = None,
        samples: Iterable[dict[str, np.ndarray]] | None = None, **_) -> ConversionResult:
    """Full quantization of `model` in place. `samples` (re-iterable, one dict of batch-1 inputs per sample)
    replaces the calibration files of [data_preprocess_param] when given."""
    options = config.full
    preset = target(options.target_device)
    result = ConversionResult(model, config.quant_type)
    ensure_opset(model, 13)  # per-axis DequantizeLinear
    original_info = [vi for vi in model.graph.value_info]
    ranks: dict[str, int] = {}  # of every tensor whose shape is known, refilled with types
    types = prepare(model, ranks)
    if samples is None:
        from ..data import calibration_set

        samples = calibration_set(config, model, input_format)
    if not options.per_channel:
        # The ReLU6 caps between equalised convs become one Clip each when calibration says which channels
        # reach the cap (per-channel Min caps ran in float and made the int8 model slower than float).
        result.notes += equalize(model, channel_max=_channel_max(model, capped_tensors(model), samples, progress))
        types = tensor_types(model, ranks)  # equalisation adds tensors
    weight_plan = plan_weights(model, config, apply_size_filters=False, per_channel=options.per_channel,
                               ops=tuple(sorted(WEIGHTED_OPS)))
    skip = set(config.common.skip_quant_node)
    # Smoothing moves activation spread into weight rows, which only per-channel weight scales absorb (MiniLM with
    # per_channel=false: sentence cosine 0.940 without smoothing, 0.855 with it).
    groups = smoothing_groups(model, {s.tensor for s in weight_plan.quantized}, skip) if options.per_channel else []
    if groups:
        counts: dict[str, int] = {}
        amax = _channel_max(model, [g.tensor for g in groups], samples, progress, axis=-1, magnitude=True,
                            counts=counts)
        # A maximum over a few values cannot tell an outlier channel from noise (ResNet20's classifier input, one
        # row per image: spread above 4 with 4 images, 2.7 with 100).
        amax = {name: peak for name, peak in amax.items() if counts[name] >= MIN_SMOOTHING_ROWS}
        smoothed, rescale = smooth(model, groups, amax)
        result.input_maps.update({key: (factor, None) for key, factor in rescale.items()})
        if smoothed:
            skip |= set(smoothed)  # the dividing Muls read the activation at full precision
            types = tensor_types(model, ranks)
            result.notes.append(f"activation smoothing in front of {len(smoothed)} MatMul/Gemm input(s) whose "
                                f"channel ranges differ by {MIN_SPREAD:g}x or more")
    result.skipped += [SkippedTensor(s.tensor, s.op_type, s.nodes, s.skip_reason) for s in weight_plan.skipped]
    plan = plan_graph(model, types, weight_plan.quantized, preset, skip)

    planned = _corrected_nodes(model, plan) if options.bias_correction else []
    float_outputs = [model.graph.node[pos].output[0] for pos in planned]
    ranges, float_sums, count = _collect(model, plan, samples, options.activation_quant_method, float_outputs,
                                          progress)
    masked = _masked_softmax(model, plan, ranges)
    if masked:
        # Only quantized tensors drop out of the plan (the Softmax nodes, and what then has no int8 reader).
        plan = plan_graph(model, types, weight_plan.quantized, preset, skip | masked)
        if not set(plan.tensors.values()) <= set(ranges):  # not expected; measured again rather than guessed
            ranges = _collect(model, plan, samples, options.activation_quant_method, [], progress)[0]
        result.notes.append(f"{len(masked)} Softmax node(s) kept float: their input carries an additive mask "
                            f"(values <= {-MASK_VALUE:g}), which would take the whole int8 range")
    act_params = {name: activation_params(*ranges[source], preset) for name, source in plan.tensors.items()}

    reference = onnx.ModelProto()
    if planned:
        reference.CopyFrom(model)
    rewriter = _Rewriter(model, plan, act_params, preset, planned)
    rewriter.run()
    corrected = [pos for pos in planned if pos in rewriter.biases]
    if corrected:
        float_means = dict(zip(planned, float_sums))
        names = _add_layer_copies(reference, corrected, act_params, rewriter, preset)
        quant_sums = _channel_means(reference, names, samples, progress, "bias correction")
        for pos, quant_sum in zip(corrected, quant_sums):
            rewriter.correct_bias(pos, (float_means[pos] - quant_sum) / count)
        result.notes.append(f"bias correction of {len(corrected)} layers over {count} samples")
    del model.graph.value_info[:]
    model.graph.value_info.extend(original_info)

    result.quantized += rewriter.records
    _keep_bias_adds_apart(model, ranks)
    # Embedding tables: int8 rows with one scale each, dequantized after the Gather, as DYNAMIC_QUANT stores them
    # (the table stays int8 in memory; only the gathered rows become float).
    if preset.int8_gather_tables:
        tables = dynamic.run(model, config, ops=("Gather",))
        result.quantized += tables.quantized
        result.skipped += tables.skipped
    kind = TensorProto.DataType.Name(preset.activation_type).lower()
    scheme = "symmetric" if preset.activation_symmetric else "asymmetric"
    result.notes.append(f"target {preset.name}: {len(plan.tensors)} activations {kind} {scheme} "
                        f"({options.activation_quant_method}), {len(rewriter.dropped)} Relu/Clip folded into "
                        "the op before them")
    if rewriter.float_ops:
        result.notes.append("ops left in float: " + ", ".join(sorted(rewriter.float_ops)))
    return result


def _masked_softmax(model: onnx.ModelProto, plan: GraphPlan, ranges: dict[str, tuple[float, float]]) -> set[str]:
    """int8 Softmax nodes (presets that quantize Softmax) whose calibrated input reaches -MASK_VALUE or below: in
    float32 exp(-1e4) is 0, so such values are an attention mask, not logits, and quantizing them would leave the
    real scores a handful of codes (MiniLM, DSP preset: sentence cosine 0.11)."""
    masked = set()
    for pos, node in enumerate(model.graph.node):
        if node.op_type == "Softmax" and plan.roles[pos] == "compute" and node.name:
            source = plan.tensors.get(node.input[0])
            if source in ranges and ranges[source][0] <= -MASK_VALUE:
                masked.add(node.name)
    return masked


def _keep_bias_adds_apart(model: onnx.ModelProto, ranks: dict[str, int]) -> None:
    """A MatMul with int8 inputs and float output, on a static 3-D (or higher) input, followed by an Add of a 1-D
    bias: onnxruntime's MatMulAddFusion (it runs before its QDQ fusions) turns that pair into Reshape -> float Gemm
    -> Reshape, which dequantizes the weight at every run (static-shape MiniLM FULL_QUANT: 1.63x float instead of
    0.74x). That fusion only takes a 1-D bias for inputs it must reshape, so the bias is given the output's rank
    ([1, .., 1, N], same broadcast, same values) and the int8 MatMul kernel with float output is kept.
    `ranks` come from the shape inference before the rewrite, which keeps such a MatMul's output name."""
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


# ---------------------------------------------------------------- plan


def plan_graph(model: onnx.ModelProto, types: dict[str, int], weights: list[WeightSpec], preset: Target,
               skip: set[str]) -> GraphPlan:
    """Which nodes run in int8 and which activation tensors get a QDQ pair."""
    graph = model.graph
    index = GraphIndex(graph)
    weight_specs = {s.tensor: s for s in weights}

    def is_activation(name: str) -> bool:
        return bool(name) and is_float(types, name) and name not in index.initializers

    roles: list[str] = []
    producer_role: dict[str, str] = {}
    for node in graph.node:
        role = "float"
        op = node.op_type
        if node.name and node.name in skip:
            role = "float"
        elif op in WEIGHTED_OPS:
            role = "compute" if _weighted_ok(node, index, weight_specs, is_activation) else "float"
        elif op in preset.compute_ops:
            data = _data_inputs(node)
            if data and any(is_activation(n) for n in data) and all(
                    is_activation(n) or (n in index.initializers and is_float(types, n)) for n in data):
                role = "compute"
            if op == "Clip" and not _constant_bounds(node, index):
                role = "float"
            # A Relu/Clip after a float op stays float too: quantizing its unbounded input would waste the codes
            # on values it then clips (measured on MobileNet V2 with the first conv skipped: cosine 0.981).
            if op in FUSABLE_ACTIVATIONS and producer_role.get(node.input[0], "float") == "float":
                role = "float"
        elif (op in preset.shared_ops and is_activation(node.input[0])
              and producer_role.get(node.input[0]) in ("compute", "shared")):
            role = "shared"
        if role != "float" and not all(is_float(types, o) for o in node.output):
            role = "float"
        roles.append(role)
        for out in node.output:
            producer_role[out] = role

    tails = _float_tails(graph, index, roles) if preset.float_weighted_outputs else []
    for pos in tails:
        roles[pos] = "float"
    positions = {id(n): i for i, n in enumerate(graph.node)}
    _demote_unread(graph, index, roles, positions)
    plan = GraphPlan(roles, weights=weight_specs)
    for pos, node in enumerate(graph.node):
        if roles[pos] == "compute" and node.op_type in FUSABLE_ACTIVATIONS:
            src = node.input[0]
            prod = index.producer.get(src)
            if (prod is not None and producer_role.get(src) == "compute" and prod.op_type not in FUSABLE_ACTIVATIONS
                    and len(index.consumers[src]) == 1 and src not in index.graph_output_names):
                plan.fused[node.output[0]] = pos

    pre_activation = {graph.node[pos].input[0] for pos in plan.fused.values()}
    wanted: list[str] = []
    for value in graph.input:
        if is_activation(value.name) and _read_as_data(value.name, index, roles, positions):
            wanted.append(value.name)
    for pos, node in enumerate(graph.node):
        for out in node.output:
            if not is_activation(out) or out in pre_activation:
                continue
            # A MatMul/Gemm that no int8 op reads keeps a float output (int8 kernel with float output).
            if roles[pos] == "compute" and node.op_type in _FLOAT_OUTPUT_OPS and preset.float_weighted_outputs \
                    and (_output_only(out, index, roles, positions)
                         or (out not in index.graph_output_names
                             and not _read_as_data(out, index, roles, positions))):
                continue
            if roles[pos] != "float" or _read_as_data(out, index, roles, positions):
                wanted.append(out)
    for name in wanted:
        prod = index.producer.get(name)
        if prod is not None and roles[positions[id(prod)]] == "shared" and prod.input[0] in plan.tensors:
            plan.tensors[name] = plan.tensors[prod.input[0]]
        else:
            plan.tensors[name] = name
    return plan


def _demote_unread(graph: onnx.GraphProto, index: GraphIndex, roles: list[str], positions: dict[int, int]) -> None:
    """An unweighted op computes in int8 only when an int8 op reads its output: otherwise its quantized output
    would be dequantized at once, losing precision for nothing. Consumers come later in graph.node, so one
    backward sweep settles chains (e.g. attention's scale Mul -> mask Add -> float Softmax: quantizing that Add's
    output would spend all 256 codes on the mask's -3.4e38)."""
    for pos in reversed(range(len(graph.node))):
        node = graph.node[pos]
        if roles[pos] == "float" or node.op_type in WEIGHTED_OPS:
            continue
        if any(o in index.graph_output_names or _read_as_data(o, index, roles, positions) for o in node.output):
            continue
        roles[pos] = "float"


def _output_only(name: str, index: GraphIndex, roles: list[str], positions: dict[int, int]) -> bool:
    """True when `name` only reaches graph outputs, through float nodes that merely move values."""
    if name in index.graph_output_names:
        return not index.consumers.get(name)
    users = index.consumers.get(name, [])
    return bool(users) and all(
        roles[positions[id(n)]] == "float" and n.op_type in _SHAPE_OPS and slot == 0
        and all(_output_only(o, index, roles, positions) for o in n.output) for n, slot in users)


def _float_tails(graph: onnx.GraphProto, index: GraphIndex, roles: list[str]) -> list[int]:
    """Shared nodes (Flatten, Reshape, Identity...) between a MatMul/Gemm and a graph output: they stay float so
    that its output is not quantized (logits keep full precision; onnxruntime runs it as an int8 kernel with
    float output)."""
    positions = {id(n): i for i, n in enumerate(graph.node)}
    tails: list[int] = []
    trial = list(roles)
    for pos in reversed(range(len(graph.node))):
        node = graph.node[pos]
        if roles[pos] == "shared" and node.op_type in _SHAPE_OPS:
            trial[pos] = "float"
            if all(_output_only(o, index, trial, positions) for o in node.output):
                tails.append(pos)
                continue
            trial[pos] = roles[pos]
    # Keep only chains that start at a weighted op: elsewhere the integer tensor may as well stay integer.
    keep = []
    for pos in tails:
        src = graph.node[pos].input[0]
        while (prod := index.producer.get(src)) is not None and positions[id(prod)] in tails:
            src = prod.input[0]
        if prod is not None and prod.op_type in _FLOAT_OUTPUT_OPS and roles[positions[id(prod)]] == "compute":
            keep.append(pos)
    return keep


def _weighted_ok(node: onnx.NodeProto, index: GraphIndex, specs: dict[str, WeightSpec], is_activation) -> bool:
    if len(node.input) < 2 or not is_activation(node.input[0]):
        return False
    weight = node.input[1]
    if node.op_type == "MatMul":
        return weight in specs or is_activation(weight)
    if weight not in specs:
        return False
    if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                                   or attribute(node, "beta", 1.0) != 1.0):
        return False
    # The bias becomes int32 with a scale of its own node: it must be a 1-D constant used by this node alone.
    bias = node.input[2] if len(node.input) > 2 else ""
    return not bias or (bias in index.initializers and len(index.initializers[bias].dims) == 1
                        and len(index.consumers[bias]) == 1)


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    if node.op_type in _ALL_INPUTS:
        return [n for n in node.input if n]
    return [node.input[0]] if node.input and node.input[0] else []


def _data_slots(node: onnx.NodeProto) -> list[int]:
    if node.op_type in WEIGHTED_OPS:
        return [0, 1] if node.op_type == "MatMul" else [0]
    if node.op_type in _ALL_INPUTS:
        return [i for i, n in enumerate(node.input) if n]
    return [0]


def _read_as_data(name: str, index: GraphIndex, roles: list[str], positions: dict[int, int]) -> bool:
    """True when an int8 node reads `name` as one of its quantized inputs."""
    for node, slot in index.consumers.get(name, []):
        if roles[positions[id(node)]] != "float" and slot in _data_slots(node):
            return True
    return False


def _constant_bounds(node: onnx.NodeProto, index: GraphIndex) -> bool:
    return all(not n or n in index.initializers for n in node.input[1:3])


def _clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, np.inf
    lo, hi = attribute(node, "min", -np.inf), attribute(node, "max", np.inf)
    if len(node.input) > 1 and node.input[1]:
        lo = float(index.array(node.input[1]))
    if len(node.input) > 2 and node.input[2]:
        hi = float(index.array(node.input[2]))
    return lo, hi


# ---------------------------------------------------------------- parameters


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
    `rows` is the weight as [output channel, K] in the order the int8 GEMM sums over K (see qmath.gemm_rows); with
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


# ---------------------------------------------------------------- statistics


def _session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs if n not in declared)
    # Between runs the observers work in Python: spinning worker threads would only steal their CPU time.
    return cpu_session(probe, "for calibration", spinning=False)


def _run(session: ort.InferenceSession, names: list[str], sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, sample)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises several unrelated types
        raise DataError(f"a calibration sample does not fit the model ({exc})") from None


def _samples(samples, progress: bool | None, desc: str):
    from ..data import progress as bar

    return bar(samples, total=len(samples) if hasattr(samples, "__len__") else None, desc=desc, enabled=progress)


def _collect(model: onnx.ModelProto, plan: GraphPlan, samples, method: str, float_outputs: list[str],
             progress: bool | None) -> tuple[dict[str, tuple[float, float]], list[np.ndarray], int]:
    """One pass: observers for every range source, and per-channel sums of the float outputs to correct."""
    from ..observers import make_observer

    sources = sorted(set(plan.tensors.values()))
    inputs = {i.name for i in model.graph.input}
    run_names = [n for n in sources if n not in inputs]
    extra = [n for n in float_outputs if n not in run_names]
    names = run_names + extra
    observers = {n: make_observer(method) for n in sources}
    sums: list[np.ndarray | float] = [0.0] * len(float_outputs)
    count = 0
    session = _session(model, names) if names else None
    for sample in _samples(samples, progress, "calibration"):
        values = dict(zip(names, _run(session, names, sample))) if session else {}
        for name in sources:
            observers[name].update(sample[name] if name in inputs else values[name])
        for i, name in enumerate(float_outputs):
            sums[i] = sums[i] + _per_channel_mean(values[name])
        count += 1
    if count == 0:
        raise DataError("no calibration samples: FULL_QUANT needs at least one")
    return {n: observers[n].range() for n in sources}, sums, count


def _channel_max(model: onnx.ModelProto, names: list[str], samples, progress: bool | None, axis: int = 1,
                 magnitude: bool = False, counts: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Per-channel maximum (of |x| with `magnitude`) along `axis` of the named float tensors over the samples;
    `counts`, when given, receives how many values each channel's maximum was taken over."""
    if not names:
        return {}
    session = _session(model, names)
    peaks: dict[str, np.ndarray] = {}
    for sample in _samples(samples, progress, "channel ranges"):
        for name, value in zip(names, _run(session, names, sample)):
            value = np.abs(value) if magnitude else value
            peak = value.max(axis=reduce_axes(value.ndim, axis % value.ndim))
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
            if counts is not None:
                counts[name] = counts.get(name, 0) + value.size // max(1, value.shape[axis % value.ndim])
    return peaks


def _per_channel_mean(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64).mean(axis=reduce_axes(x.ndim, _CHANNEL_AXIS))


def _channel_means(model: onnx.ModelProto, names: list[str], samples, progress: bool | None,
                   desc: str) -> list[np.ndarray]:
    session = _session(model, names)
    sums: list[np.ndarray | float] = [0.0] * len(names)
    for sample in _samples(samples, progress, desc):
        for i, value in enumerate(_run(session, names, sample)):
            sums[i] = sums[i] + _per_channel_mean(value)
    return sums


def _add_layer_copies(reference: onnx.ModelProto, positions: list[int], act_params: dict[str, QParams],
                      rewriter: _Rewriter, preset: Target) -> list[str]:
    """Beside each corrected layer of the float graph, a copy that reads the same float input through its
    quantizer and uses the quantized weight and bias: its output differs from the layer's only by this layer's
    quantization, so every correction is measured on its own, in one pass, without counting upstream errors
    twice."""
    graph = reference.graph
    index = GraphIndex(graph)
    names = []
    dtype = helper.tensor_dtype_to_np_dtype(preset.activation_type)
    for pos in positions:
        node = graph.node[pos]
        params = act_params[node.input[0]]
        tag = index.unique_name(f"{node.output[0]}_layer_quantized")
        constants = {
            "scale": params.scale.reshape(()).astype(np.float32),
            "zero": params.zero_point.reshape(()).astype(dtype),
            "weight": rewriter.dequantized[node.input[1]],
            "bias": rewriter.bias_values[pos],
        }
        for key, value in constants.items():
            graph.initializer.append(numpy_helper.from_array(value, f"{tag}_{key}"))
        graph.node.append(helper.make_node("QuantizeLinear", [node.input[0], f"{tag}_scale", f"{tag}_zero"],
                                           [f"{tag}_q"]))
        graph.node.append(helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zero"],
                                           [f"{tag}_x"]))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = tag
        del copy.input[:]
        copy.input.extend([f"{tag}_x", f"{tag}_weight", f"{tag}_bias"])
        del copy.output[:]
        copy.output.append(tag)
        graph.node.append(copy)
        names.append(tag)
    return names


def _corrected_nodes(model: onnx.ModelProto, plan: GraphPlan) -> list[int]:
    """Weighted int8 nodes whose bias can absorb a per-channel correction."""
    return [pos for pos, node in enumerate(model.graph.node)
            if plan.roles[pos] == "compute" and node.op_type in ("Conv", "ConvTranspose", "Gemm")]


# ---------------------------------------------------------------- rewrite


class _Rewriter:
    """Turns the planned float graph into the QDQ graph, in place. Node positions stay those of the plan."""

    def __init__(self, model: onnx.ModelProto, plan: GraphPlan, act_params: dict[str, QParams], preset: Target,
                 corrected: list[int]):
        self.graph = model.graph
        self.plan = plan
        self.params = act_params
        self.preset = preset
        self.corrected = set(corrected)
        self.index = GraphIndex(model.graph)
        self.positions = {id(n): i for i, n in enumerate(self.graph.node)}
        self.records: list[QuantizedTensor] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.biases: dict[int, tuple[str, np.ndarray]] = {}  # position -> (int32 bias initializer, its scale)
        self.weight_scales: dict[str, np.ndarray] = {}
        self.dequantized: dict[str, np.ndarray] = {}  # weight -> its dequantized float value
        self.bias_values: dict[int, np.ndarray] = {}  # position -> dequantized float bias
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

        def add_qdq(tensor: str, into: list[onnx.NodeProto]) -> None:
            scale, zero = self._qdq_constants(tensor, self.params[tensor], self.preset.activation_type)
            q = self._name(f"{tensor}_quantized")
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
        weight_reads = self._quantize_weights(head)
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
                body += self._quantize_bias(pos, node, original)
            else:
                body += self._quantize_constants(node)
            body.append(node)
            for out in list(node.output):
                if out in plan.tensors:
                    add_qdq(out, body)
        del graph.node[:]
        graph.node.extend(head + body)
        graph.initializer.extend(self.new_inits)
        drop_unused_initializers(self.graph)

    def _fold_activations(self) -> None:
        """Drop a Relu/Clip after an int8 op when its output quantizer clamps identically (zero point at the
        bottom code for ReLU, the cap at or beyond the top code for Clip); the producer then writes its output."""
        for out, pos in self.plan.fused.items():
            node = self.graph.node[pos]
            params = self.params.get(out)
            if params is None:
                continue
            lo, hi = _clip_bounds(node, self.index)
            scale, zero = float(params.scale.ravel()[0]), int(params.zero_point.ravel()[0])
            low_ok = lo == -np.inf or round_half_away(np.array(lo / scale)) + zero <= params.qmin
            high_ok = hi == np.inf or round_half_away(np.array(hi / scale)) + zero >= params.qmax
            if low_ok and high_ok:
                producer = self.index.producer[node.input[0]]
                producer.output[0] = out
                self.index.producer[out] = producer
                self.dropped.add(pos)

    def _quantize_weights(self, head: list[onnx.NodeProto]) -> dict[str, str]:
        reads = {}
        for name, spec in self.plan.weights.items():
            users = self.index.consumers.get(name, [])
            if not users or any(self.plan.roles[self.positions[id(n)]] != "compute" for n, _ in users):
                continue
            w = self.index.array(name)
            depthwise = all(n.op_type == "Conv" and attribute(n, "group", 1) > 1 and spec.shape[1] == 1
                            for n, _ in users)
            first = users[0][0]
            rows = gemm_rows(w, first.op_type, bool(attribute(first, "transB", 0)))
            params = weight_params(w, spec, self.preset, depthwise, rows)
            q = quantize(w, params)
            dtype = TensorProto.INT8 if params.qmin < 0 else TensorProto.UINT8
            q_name = self._init(q.astype(helper.tensor_dtype_to_np_dtype(dtype)), f"{name}_quantized")
            scale, zero = self._qdq_constants(name, params, dtype, spec.axis)
            dq = self._name(f"{name}_dequantized")
            head.append(self._dequantize_node(q_name, scale, zero, dq, spec.axis))
            reads[name] = dq
            self.weight_scales[name] = params.scale.reshape(-1)
            self.dequantized[name] = dequantize(q, params)
            err = relative_error(w, self.dequantized[name])
            scheme = "symmetric " if not params.zero_point.any() and params.qmin < 0 else "asymmetric "
            scheme += f"per-channel axis {spec.axis}" if spec.axis is not None else "per-tensor"
            storage = "DequantizeLinear " + TensorProto.DataType.Name(dtype).lower()
            self.records.append(QuantizedTensor(
                name, spec.op_type, spec.nodes, spec.shape, 8, scheme, storage, w.nbytes,
                q.size + 5 * params.scale.size, err, scale=params.scale.ravel(), zero_point=params.zero_point.ravel()))
        return reads

    def _quantize_bias(self, pos: int, node: onnx.NodeProto, original: list[str]) -> list[onnx.NodeProto]:
        """int32 bias with scale input_scale * weight_scale (created as zeros when bias correction needs one)."""
        weight = original[1]
        if weight not in self.weight_scales or original[0] not in self.params or node.op_type == "MatMul":
            self.corrected.discard(pos)
            return []
        has_bias = len(original) > 2 and bool(original[2])
        if not has_bias and pos not in self.corrected:
            return []
        channels = self._output_channels(node, weight)
        bias = self.index.array(original[2]).astype(np.float64) if has_bias else np.zeros(channels)
        in_scale = float(self.params[original[0]].scale.ravel()[0])
        scale = in_scale * np.broadcast_to(self.weight_scales[weight], (channels,)).astype(np.float64)
        base = original[2] if has_bias else f"{node.output[0]}_bias"
        codes = _bias_codes(bias, scale)
        self.bias_values[pos] = (codes * scale).astype(np.float32)
        q_name = self._init(codes, f"{base}_quantized")
        s_name = self._init(scale.astype(np.float32), f"{base}_scale")
        z_name = self._init(np.zeros(channels, np.int32), f"{base}_zero_point")
        dq = self._name(f"{base}_dequantized")
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = dq
        self.biases[pos] = (q_name, scale)
        return [self._dequantize_node(q_name, s_name, z_name, dq, 0)]

    def _output_channels(self, node: onnx.NodeProto, weight: str) -> int:
        shape = self.plan.weights[weight].shape
        if node.op_type == "Conv":
            return shape[0]
        if node.op_type == "ConvTranspose":
            return shape[1] * attribute(node, "group", 1)
        return shape[0] if attribute(node, "transB", 0) else shape[1]

    def _quantize_constants(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """Float constants read as data by an int8 op (an Add's constant operand, say) get activation-style
        parameters from their own values."""
        nodes = []
        for slot in _data_slots(node):
            name = node.input[slot] if slot < len(node.input) else ""
            if name not in self.index.initializers or self.index.initializers[name].data_type != TensorProto.FLOAT:
                continue
            value = self.index.array(name)
            params = activation_params(float(value.min()), float(value.max()), self.preset)
            dtype = self.preset.activation_type
            q_name = self._init(quantize(value, params).astype(helper.tensor_dtype_to_np_dtype(dtype)),
                                f"{name}_quantized")
            scale, zero = self._qdq_constants(name, params, dtype)
            dq = self._name(f"{name}_dequantized")
            nodes.append(self._dequantize_node(q_name, scale, zero, dq, None))
            node.input[slot] = dq
        return nodes

    def correct_bias(self, pos: int, diff: np.ndarray) -> None:
        """Add `diff` (float, per output channel) to the int32 bias of the node at `pos`."""
        q_name, scale = self.biases[pos]
        tensor = next(t for t in self.graph.initializer if t.name == q_name)
        corrected = numpy_helper.to_array(tensor).astype(np.float64) * scale + diff
        tensor.CopyFrom(numpy_helper.from_array(_bias_codes(corrected, scale), q_name))


def _bias_codes(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(scale > 0, bias / scale, 0.0)
    return np.clip(round_half_away(codes), *_INT32).astype(np.int32)

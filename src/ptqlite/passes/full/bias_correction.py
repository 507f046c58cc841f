"""FULL_QUANT bias correction, measured on the float reference before the graph is rewritten.

Beside each corrected layer of the float graph goes a copy that reads the same float input through its quantizer
and uses the quantized weight and bias: its output differs from the layer's only by this layer's quantization, so
every correction is measured on its own, in one pass, without counting upstream errors twice. The mean
per-channel difference between the layer and its copy is added to the int32 bias.

A pointwise Conv (1x1 kernel, stride 1, no padding: every output position reads one input position) is not
copied: its per-channel output mean is its weight times the per-channel mean of its quantized input, plus its
bias, so only the input's QuantizeLinear and the mean of its integer codes go into the graph, and the rest is
float64 arithmetic on [C] vectors (the same correction as the copy's float32 conv gives, up to that conv's
rounding). Pointwise convs hold most of a MobileNet's multiply-adds, which the copies ran a second time.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...model import GraphIndex, ProbeAdditions
from ...targets import Target
from .params import BiasParams, QuantParams, bias_codes
from .statistics import CHANNEL_MEAN, Statistics, StatRequest, collect, kept, model_digest


def mean_requests(model: onnx.ModelProto, positions: list[int]) -> list[StatRequest]:
    """What the calibration pass measures for bias correction: the float output means of the nodes to correct."""
    return [StatRequest(model.graph.node[pos].output[0], CHANNEL_MEAN) for pos in positions]


def correct_biases(model: onnx.ModelProto, params: QuantParams, float_stats: Statistics, positions: list[int],
                   preset: Target, samples, progress: bool | None) -> tuple[QuantParams, list[int]]:
    """Parameters with the biases at `positions` (those that have int32 biases) corrected, and those positions.
    `model` is the float graph the plan was made on; it is not changed. `float_stats` holds the channel mean sums
    of mean_requests(model, positions)."""
    corrected = [pos for pos in positions if pos in params.biases]
    if not corrected:
        return params, []
    # Inside statistics.reuse() a layer's correction is measured once: it depends only on the float graph and
    # the layer's own input quantizer, weight and bias.
    store = kept()
    keys = _layer_keys(model, corrected, params) if store is not None else {}
    diffs = {pos: store[keys[pos]] for pos in corrected if store is not None and keys[pos] in store}
    todo = [pos for pos in corrected if pos not in diffs]
    if todo:
        # The layer copies go into `model` itself for the pass and are removed after it: a copy of the model
        # would cost its size once more, at the peak of the conversion's memory.
        probe = ProbeAdditions(model)
        try:
            names = _add_layer_copies(model, todo, params, preset)
            quantized = collect(model, [StatRequest(n, CHANNEL_MEAN) for n in dict.fromkeys(names.values())],
                                samples, progress, "bias correction")
        finally:
            probe.remove()
        for pos in todo:
            node = model.graph.node[pos]
            float_sum = float_stats.channel_mean_sums[node.output[0]]
            measured = quantized.channel_mean_sums[names[pos]]
            if pointwise(node, params):
                measured = pointwise_mean_sum(node, params, pos, measured, quantized.samples)
            diffs[pos] = (float_sum - measured) / float_stats.samples
            if store is not None:
                store[keys[pos]] = diffs[pos]
    biases = dict(params.biases)
    for pos in corrected:
        diff = diffs[pos]
        bias = biases[pos]
        biases[pos] = BiasParams(bias_codes(bias.codes.astype(np.float64) * bias.scale + diff, bias.scale),
                                 bias.scale, diff)
    return dataclasses.replace(params, biases=biases), corrected


def _layer_keys(model: onnx.ModelProto, positions: list[int], params: QuantParams) -> dict[int, tuple]:
    digest = model_digest(model)

    def content(*arrays: np.ndarray) -> str:
        h = hashlib.sha1()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    keys = {}
    for pos in positions:
        node = model.graph.node[pos]
        act = params.activations[node.input[0]]
        keys[pos] = ("bias correction", digest, pos, content(act.scale, act.zero_point,
                                                              params.weights[node.input[1]].dequantized,
                                                              params.biases[pos].dequantized))
    return keys


def pointwise(node: onnx.NodeProto, params: QuantParams) -> bool:
    """A Conv whose output positions each read one input position: 1x1 kernel, strides 1, no padding (any
    group or dilation). Its per-channel output mean is linear in its input's per-channel mean."""
    if node.op_type != "Conv":
        return False
    if any(d != 1 for d in params.weights[node.input[1]].codes.shape[2:]):
        return False
    attrs = {a.name: list(a.ints) for a in node.attribute if a.name in ("strides", "pads")}
    # auto_pad pads nothing at a 1x1 kernel and stride 1
    return all(v == 1 for v in attrs.get("strides", [])) and not any(attrs.get("pads", []))


def pointwise_mean_sum(node: onnx.NodeProto, params: QuantParams, pos: int, code_sum: np.ndarray,
                       samples: int) -> np.ndarray:
    """The sum over `samples` of a pointwise Conv's per-channel output mean with its quantized weight and bias,
    from the sum of the per-channel means of its input's integer codes (`code_sum`, [C]), in float64."""
    act = params.activations[node.input[0]]
    scale = float(act.scale.reshape(()).astype(np.float32))  # the scale QuantizeLinear is given
    input_sum = (code_sum - samples * float(act.zero_point.reshape(()))) * scale
    weight = params.weights[node.input[1]].dequantized.astype(np.float64)
    out_channels, per_group = weight.shape[0], weight.shape[1]
    groups = input_sum.size // per_group
    weight = weight.reshape(groups, out_channels // groups, per_group)
    means = np.einsum("gop,gp->go", weight, input_sum.reshape(groups, per_group)).reshape(out_channels)
    return means + samples * params.biases[pos].dequantized.astype(np.float64)


def _add_layer_copies(reference: onnx.ModelProto, positions: list[int], params: QuantParams,
                      preset: Target) -> dict[int, str]:
    """Per position, the tensor whose channel means the pass measures: the layer copy's output, or for a
    pointwise Conv the integer codes of its input (one per input tensor, which has one quantizer)."""
    graph = reference.graph
    index = GraphIndex(graph)
    names: dict[int, str] = {}
    quantized_inputs: dict[str, str] = {}
    dtype = helper.tensor_dtype_to_np_dtype(preset.activation_type)
    for pos in positions:
        node = graph.node[pos]
        act = params.activations[node.input[0]]
        is_pointwise = pointwise(node, params)
        if is_pointwise and node.input[0] in quantized_inputs:
            names[pos] = quantized_inputs[node.input[0]]
            continue
        tag = index.unique_name(f"{node.output[0]}_layer_quantized")
        constants = {"scale": act.scale.reshape(()).astype(np.float32), "zero": act.zero_point.reshape(()).astype(dtype)}
        if not is_pointwise:
            constants["weight"] = params.weights[node.input[1]].dequantized
            constants["bias"] = params.biases[pos].dequantized
        for key, value in constants.items():
            graph.initializer.append(numpy_helper.from_array(value, f"{tag}_{key}"))
        graph.node.append(helper.make_node("QuantizeLinear", [node.input[0], f"{tag}_scale", f"{tag}_zero"],
                                           [f"{tag}_q"]))
        if is_pointwise:
            names[pos] = quantized_inputs[node.input[0]] = f"{tag}_q"
            continue
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
        names[pos] = tag
    return names

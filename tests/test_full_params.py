"""FULL_QUANT's parameter stage on its own: plan + hand-made ranges -> QuantParams, pure numpy (no session runs)."""

from __future__ import annotations

import numpy as np
from helpers import conv_model, full_config
from onnx import numpy_helper

from ptqlite.passes.full.graph_plan import correctable_nodes, plan_graph
from ptqlite.passes.full.params import activation_params, quant_params
from ptqlite.plan import int8_rules, plan_weights
from ptqlite.prepare import prepare
from ptqlite.targets import WEIGHTED_OPS, target


def _planned():
    model = conv_model()
    types = prepare(model)
    weights = plan_weights(model, int8_rules(full_config(), WEIGHTED_OPS)).quantized
    preset = target("CPU")
    plan = plan_graph(model, types, weights, preset, set())
    ranges = {source: (-1.0 - i, 2.0 + i) for i, source in enumerate(sorted(set(plan.tensors.values())))}
    return model, plan, ranges, preset


def test_parameters_follow_the_plan_and_the_ranges():
    model, plan, ranges, preset = _planned()
    positions = correctable_nodes(model, plan)
    params = quant_params(model, plan, ranges, preset, zero_bias_positions=positions)
    assert set(params.activations) == set(plan.tensors)
    for name, source in plan.tensors.items():
        expected = activation_params(*ranges[source], preset)
        assert np.array_equal(params.activations[name].scale, expected.scale)
    assert set(params.weights) == {"w1", "w2", "wf"} and not params.weight_only
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for pos in positions:
        node = model.graph.node[pos]
        bias, weight = params.biases[pos], params.weights[node.input[1]]
        in_scale = float(params.activations[node.input[0]].scale.ravel()[0])
        np.testing.assert_allclose(bias.scale, in_scale * weight.params.scale.reshape(-1))
        assert bias.codes.dtype == np.int32
        # the int32 codes are the float bias within half a step
        assert np.all(np.abs(bias.codes * bias.scale - inits[node.input[2]]) <= bias.scale / 2 + 1e-12)
        assert weight.codes.min() >= -127 and weight.codes.max() <= 127  # narrow symmetric int8
        assert np.abs(weight.dequantized - inits[node.input[1]]).max() <= weight.params.scale.max() / 2 + 1e-6


def test_wider_ranges_give_larger_scales_and_the_same_weights():
    model, plan, ranges, preset = _planned()
    narrow = quant_params(model, plan, ranges, preset, [])
    wide = quant_params(model, plan, {k: (2 * lo, 2 * hi) for k, (lo, hi) in ranges.items()}, preset, [])
    for name in plan.tensors:
        assert float(wide.activations[name].scale[0]) > float(narrow.activations[name].scale[0])
    for name in narrow.weights:
        assert np.array_equal(narrow.weights[name].codes, wide.weights[name].codes)

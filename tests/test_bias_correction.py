"""FULL_QUANT bias correction: a pointwise Conv's correction comes from its quantized input's channel means, with
no copy of the layer in the pass, and equals the correction its copy measures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import full_config, initializer, samples
from onnx import TensorProto, helper, numpy_helper

from ptqlite.convert import convert
from ptqlite.passes.full import bias_correction

RNG = np.random.default_rng(5)


def pointwise_model(group: int = 1) -> onnx.ModelProto:
    """x -> 3x3 Conv (padded) -> Relu -> 1x1 Conv (`group` groups) -> Relu -> 1x1 Conv: two pointwise layers
    after a non-pointwise one; weights at n + 0.45 steps so that each channel's rounding error is systematic."""
    w1 = (RNG.normal(size=(8, 4, 3, 3)) * 0.3).astype(np.float32)
    w2 = ((RNG.integers(-120, 120, (12, 8 // group, 1, 1)) + 0.45) * 0.01).astype(np.float32)
    w2[:, 0] = 1.27  # each channel's scale exactly 0.01
    w3 = ((RNG.integers(-120, 120, (6, 12, 1, 1)) + 0.45) * 0.01).astype(np.float32)
    w3[:, 0] = 1.27
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", group=group),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", strides=[1, 1], pads=[0, 0, 0, 0])]
    inits = [initializer("w1", w1), initializer("b1", RNG.normal(size=8).astype(np.float32) * 0.1),
             initializer("w2", w2), initializer("b2", RNG.normal(size=12).astype(np.float32) * 0.1),
             initializer("w3", w3)]
    graph = helper.make_graph(nodes, "pw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def corrected_biases(model: onnx.ModelProto, monkeypatch, copies: bool) -> dict[str, np.ndarray]:
    """The written int32 biases of the three convs, with pointwise convs reduced (copies=False) or copied."""
    with monkeypatch.context() as patch:
        if copies:
            patch.setattr(bias_correction, "pointwise", lambda node, params: False)
        out = convert(model, full_config(bias_correction=True), samples=samples((1, 4, 8, 8), 8), verify=False,
                      progress=False).model
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    biases = {}
    for node in out.graph.node:
        if node.op_type == "Conv":
            dq = next(n for n in out.graph.node if n.output[0] == node.input[2])
            biases[node.name] = inits[dq.input[0]].astype(np.int64)
    return biases


@pytest.mark.parametrize("group", [1, 2])
def test_pointwise_correction_equals_the_copy_s(monkeypatch, group):
    model = pointwise_model(group)
    reduced = corrected_biases(model, monkeypatch, copies=False)
    copied = corrected_biases(model, monkeypatch, copies=True)
    assert set(reduced) == set(copied) == {"conv1", "conv2", "conv3"}
    for name in reduced:
        # float64 sums instead of the copy's float32 conv: at most one int32 step apart
        assert np.abs(reduced[name] - copied[name]).max() <= 1, name
    assert np.abs(reduced["conv3"]).max() > 0  # conv3 had no bias: the one created holds the correction


def test_pointwise_convs_run_no_copy_in_the_pass(monkeypatch):
    """Only the 3x3 conv is copied into the bias-correction pass; the pointwise convs add QDQ and a mean."""
    seen = []
    real = bias_correction.collect

    def spy(m, requests, *args, **kwargs):
        seen.append(sum(n.op_type == "Conv" for n in m.graph.node))
        return real(m, requests, *args, **kwargs)

    monkeypatch.setattr(bias_correction, "collect", spy)
    convert(pointwise_model(), full_config(bias_correction=True), samples=samples((1, 4, 8, 8), 4), verify=False,
            progress=False)
    assert seen == [4]  # the model's 3 convs and the copy of conv1


@pytest.mark.parametrize("attrs, kernel, expected", [
    ({}, (1, 1), True),
    ({"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [2, 2]}, (1, 1), True),
    ({"strides": [2, 2]}, (1, 1), False),
    ({"pads": [1, 1, 1, 1]}, (1, 1), False),
    ({}, (3, 3), False),
    ({}, (1, 3), False),
])
def test_what_is_pointwise(attrs, kernel, expected):
    from ptqlite.passes.full.params import QParams, WeightParams

    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    weight = WeightParams(QParams(np.ones(1), np.zeros(1, np.int64), -127, 127), np.zeros((4, 2, *kernel), np.int8),
                          TensorProto.INT8, 0, None)
    params = type("P", (), {"weights": {"w": weight}})()
    assert bias_correction.pointwise(node, params) is expected

"""Convs that share one bias initializer (converters store identical constants once: tf2onnx makes every
all-zero bias of a TFLite model one tensor) are all quantized by FULL_QUANT, each with its own int32 bias."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import cosine, full_config, outputs, samples
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

from ptqlite.convert import convert
from ptqlite.prepare import unshare_biases


def shared_bias_model() -> onnx.ModelProto:
    r = np.random.default_rng(0)
    inits = [nh.from_array((r.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             nh.from_array((r.normal(size=(8, 8, 3, 3)) * 0.2).astype(np.float32), "w2"),
             nh.from_array((r.normal(size=(8, 8, 1, 1)) * 0.3).astype(np.float32), "w3"),
             nh.from_array(np.zeros(8, np.float32), "zero_bias")]
    nodes = [helper.make_node("Conv", ["x", "w1", "zero_bias"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ra"], name="relu1"),
             helper.make_node("Conv", ["ra", "w2", "zero_bias"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["rb"], name="relu2"),
             helper.make_node("Conv", ["rb", "w3", "zero_bias"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_each_conv_gets_its_own_bias():
    model = shared_bias_model()
    assert unshare_biases(model) == 2
    biases = [n.input[2] for n in model.graph.node if n.op_type == "Conv"]
    assert len(set(biases)) == 3 and "zero_bias" in biases
    inits = {t.name: nh.to_array(t) for t in model.graph.initializer}
    assert all(np.array_equal(inits[b], np.zeros(8, np.float32)) for b in biases)
    assert unshare_biases(model) == 0  # nothing left to share


def test_full_quant_quantizes_every_conv_of_a_shared_bias():
    model = shared_bias_model()
    feeds = samples((1, 3, 8, 8), count=8)
    result = convert(model, full_config(common="min_quant_weight_channel=0\n"), samples=feeds)
    assert sorted(q.tensor for q in result.quantized) == ["w1", "w2", "w3"], result.skipped
    assert sum(n.op_type == "QuantizeLinear" for n in result.model.graph.node) >= 3
    assert cosine(outputs(result.model, feeds), outputs(model, feeds)) > 0.99
    assert [i.name for i in model.graph.initializer].count("zero_bias") == 1  # the caller's model is untouched

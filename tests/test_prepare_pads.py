"""Explicit zero Pads in front of a Conv / AveragePool fold into the op's pads (TF- and Paddle-style "same" padding)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.prepare import fold_pads

PADS = [0, 0, 1, 1, 0, 0, 1, 1]  # begin N, C, H, W then end N, C, H, W: one row/column of zeros each side


def padded_model(follower: str = "Conv", pad_amounts=PADS, value: float | None = None, opset: int = 17,
                 **follower_attrs) -> onnx.ModelProto:
    r = np.random.default_rng(0)
    inits = [nh.from_array((r.normal(size=(8, 4, 3, 3)) * 0.3).astype(np.float32), "w")]
    if opset >= 11:
        inits.append(nh.from_array(np.array(pad_amounts, np.int64), "pads"))
        pad_inputs = ["x", "pads"]
        if value is not None:
            inits.append(nh.from_array(np.array(value, np.float32), "value"))
            pad_inputs.append("value")
        pad = helper.make_node("Pad", pad_inputs, ["p"], name="pad")
    else:
        pad = helper.make_node("Pad", ["x"], ["p"], name="pad", pads=pad_amounts, value=value or 0.0)
    if follower == "Conv":
        op = helper.make_node("Conv", ["p", "w"], ["y"], name="conv", kernel_shape=[3, 3], strides=[2, 2],
                              **follower_attrs)
        out_channels = 8
    else:
        op = helper.make_node(follower, ["p"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                              **follower_attrs)
        out_channels = 4
    graph = helper.make_graph([pad, op, helper.make_node("Relu", ["y"], ["z"], name="relu")], "pad",
                              [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 9, 9])],
                              [helper.make_tensor_value_info("z", T.FLOAT, [1, out_channels, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds():
    return {"x": np.random.default_rng(1).normal(size=(1, 4, 9, 9)).astype(np.float32)}


@pytest.mark.parametrize("follower, attrs, opset", [("Conv", {}, 17), ("Conv", {"pads": [0, 1, 0, 1]}, 17),
                                                    ("Conv", {}, 10),
                                                    ("AveragePool", {"count_include_pad": 1}, 17)])
def test_zero_pad_folds_into_the_op(follower, attrs, opset):
    model = padded_model(follower, opset=opset, **attrs)
    expected = run(model, _feeds())[0]
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_pads(folded) == 1
    assert [n.op_type for n in folded.graph.node] == [follower, "Relu"]
    assert "pads" not in {t.name for t in folded.graph.initializer}
    np.testing.assert_allclose(run(folded, _feeds())[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"value": 1.0},  # padding with ones is not the op's zero padding
    {"pad_amounts": [0, 1, 1, 1, 0, 0, 1, 1]},  # pads a channel
    {"pad_amounts": [0, 0, -1, 0, 0, 0, 1, 1]},  # crops
    {"follower": "AveragePool", "count_include_pad": 0},  # the pool would divide by fewer values
    {"follower": "MaxPool"},  # zeros are not MaxPool's padding
])
def test_other_pads_stay(kwargs):
    model = padded_model(**kwargs)
    assert fold_pads(model) == 0
    assert model.graph.node[0].op_type == "Pad"


def test_full_quant_has_no_pad_left():
    model = padded_model()
    r = np.random.default_rng(2)
    samples = [{"x": r.normal(size=(1, 4, 9, 9)).astype(np.float32)} for _ in range(8)]
    config = parse_config("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n[data_preprocess_param]\n"
                          "calibrate_path=x:/nonexistent\ncalibrate_size=8\ninput_type=BIN\n")
    result = convert(model, config, samples=samples, progress=False)
    assert "Pad" not in {n.op_type for n in result.model.graph.node}
    reference, quantized = run(model, samples[0])[0], run(result.model, samples[0])[0]
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.99


def torch_same_pad_model() -> onnx.ModelProto:
    """The EfficientNet-Lite export (PyTorch ZeroPad2d, TF "same" padding of a stride-2 conv): pads [0, 1, 0, 1]
    (left, right, top, bottom) turned into ONNX order by a constant subgraph (ConstantOfShape, Concat, Reshape,
    Slice with step -1, Transpose, Reshape, Cast), padding only after each spatial axis."""
    i64 = lambda name, values: nh.from_array(np.array(values, np.int64), name)
    r = np.random.default_rng(0)
    inits = [nh.from_array((r.normal(size=(8, 4, 3, 3)) * 0.3).astype(np.float32), "w"),
             i64("torch_pads", [0, 1, 0, 1]), i64("four", [4]), i64("pairs", [-1, 2]), i64("start", [-1]),
             i64("end", [-9223372036854775807]), i64("axis0", [0]), i64("step", [-1]), i64("flat", [-1])]
    nodes = [
        helper.make_node("ConstantOfShape", ["four"], ["zeros"], value=nh.from_array(np.array([0], np.int64))),
        helper.make_node("Concat", ["torch_pads", "zeros"], ["all"], axis=0),
        helper.make_node("Reshape", ["all", "pairs"], ["paired"]),
        helper.make_node("Slice", ["paired", "start", "end", "axis0", "step"], ["reversed"]),
        helper.make_node("Transpose", ["reversed"], ["onnx_order"], perm=[1, 0]),
        helper.make_node("Reshape", ["onnx_order", "flat"], ["pads_raw"]),
        helper.make_node("Cast", ["pads_raw"], ["pads"], to=T.INT64),
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="constant"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="conv", kernel_shape=[3, 3], strides=[2, 2]),
    ]
    graph = helper.make_graph(nodes, "torch_pad", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_torch_asymmetric_same_padding_folds_into_the_conv():
    from ptqlite.prepare import prepare

    model = torch_same_pad_model()
    feeds = {"x": np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32)}
    expected = run(model, feeds)[0]
    prepare(model)
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    conv = model.graph.node[0]
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [0, 0, 1, 1]  # nothing before, 1 after
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=1e-5, atol=1e-5)

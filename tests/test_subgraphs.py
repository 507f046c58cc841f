"""Models with If/Loop bodies: weights inside bodies, and outer-scope initializers read by them, in every mode.

Reproductions of real exports (PyTorch, spox): a branch's Gemm reading a main-graph initializer used to make
FULL_QUANT drop that initializer (the output did not load), and weights inside bodies were never visited.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import cosine, session
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.model import IMPLICIT_INPUT, GraphIndex, lift_subgraph_constants, outer_reads
from ptqlite.prepare import drop_unused_initializers

CALIBRATION = "[data_preprocess_param]\ncalibrate_path=x:/nonexistent\ncalibrate_size=8\ninput_type=BIN\n"
ALL_SIZES = "min_quant_weight_size=0\nmin_quant_weight_channel=0\n"
MODES = {
    "weight_8bit": f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n{ALL_SIZES}",
    "weight_4bit": f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=4\n{ALL_SIZES}",
    "on_the_fly": f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n{ALL_SIZES}"
                  "[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n",
    "mixed_bit": f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=0\n{ALL_SIZES}",
    "full": "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n" + CALIBRATION,
    "dynamic": "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n",
}


def init(name, a):
    return nh.from_array(np.asarray(a), name)


def if_model(seed=0):
    """x -> MatMul(W0) -> h; If(sum(h) > 0): then Gemm(h, W_then [outer]) else Gemm(h, W_else [branch's own])."""
    r = np.random.default_rng(seed)
    W0 = r.normal(size=(16, 32)).astype(np.float32) * 0.3
    Wt = r.normal(size=(32, 24)).astype(np.float32) * 0.3
    We = r.normal(size=(32, 24)).astype(np.float32) * 0.3
    bt = r.normal(size=(24,)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("Gemm", ["h", "W_then", "b_then"], ["y_then"], name="gemm_then")],
                               "then", [], [helper.make_tensor_value_info("y_then", T.FLOAT, [1, 24])])
    else_g = helper.make_graph([helper.make_node("Gemm", ["h", "W_else"], ["y_else"], name="gemm_else")],
                               "else", [], [helper.make_tensor_value_info("y_else", T.FLOAT, [1, 24])],
                               [init("W_else", We)])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="mm0"),
             helper.make_node("Relu", ["h0"], ["h"], name="relu"),
             helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "thr"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", T.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 24])],
                          [init("W0", W0), init("W_then", Wt), init("b_then", bt), init("thr", np.float32(20.0))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

def loop_model(seed=0, hidden=16, size=12, steps=5):
    """Loop (2 iterations) whose body runs an LSTM over the outer input x with outer weights W, R, B, starting
    from the carried state."""
    r = np.random.default_rng(seed)
    W = (r.normal(size=(1, 4 * hidden, size)) * 0.3).astype(np.float32)
    R = (r.normal(size=(1, 4 * hidden, hidden)) * 0.3).astype(np.float32)
    B = (r.normal(size=(1, 8 * hidden)) * 0.1).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", ["h_in", "ax0"], ["h3"], name="unsq"),
         helper.make_node("LSTM", ["x", "W", "R", "B", "", "h3"], ["", "h_out3"], name="lstm", hidden_size=hidden),
         helper.make_node("Squeeze", ["h_out3", "ax0"], ["h_out"], name="sq"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="id")],
        "body", [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("cond_in", T.BOOL, []),
                 helper.make_tensor_value_info("h_in", T.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("cond_out", T.BOOL, []), helper.make_tensor_value_info("h_out", T.FLOAT, [1, hidden])])
    nodes = [helper.make_node("Loop", ["trip", "", "h0"], ["h_final"], name="loop", body=body),
             helper.make_node("MatMul", ["h_final", "Wout"], ["y"], name="head")]
    g = helper.make_graph(nodes, "loop_model", [helper.make_tensor_value_info("x", T.FLOAT, [steps, 1, size])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 10])],
                          [init("W", W), init("R", R), init("B", B), init("ax0", np.array([0], np.int64)),
                           init("trip", np.array(2, np.int64)), init("h0", np.zeros((1, hidden), np.float32)),
                           init("Wout", (r.normal(size=(hidden, 10)) * 0.3).astype(np.float32))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _branch(model, name):
    return next(a.g for a in model.graph.node[-1].attribute if a.name == name)


def _samples(shape, count=8):
    r = np.random.default_rng(3)
    # Scaled differently so that both branches of if_model run.
    return [{"x": (r.normal(size=shape) * (0.2 + i)).astype(np.float32)} for i in range(count)]


def _outputs(model, samples):
    s = session(model)
    return np.concatenate([s.run(None, f)[0].ravel() for f in samples])


def test_if_model_takes_both_branches():
    model, samples = if_model(), _samples((1, 16))
    branches = set()
    for feeds in samples:
        h = np.maximum(feeds["x"] @ nh.to_array(model.graph.initializer[0]), 0)
        branches.add(bool(h.sum() > 20))
    assert branches == {True, False}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("build, shape, inside", [(if_model, (1, 16), {"W_then", "W_else"}),
                                                  (loop_model, (5, 1, 12), {"W", "R"})])
def test_every_mode_quantizes_or_names_the_weights_inside_bodies(mode, build, shape, inside):
    model, samples = build(), _samples(shape)
    result = convert(model, parse_config(MODES[mode]), samples=samples, progress=False)
    onnx.checker.check_model(result.model, full_check=True)  # valid, topologically sorted, every name bound
    assert cosine(_outputs(model, samples), _outputs(result.model, samples)) > 0.99
    quantized = {t.tensor for t in result.quantized}
    skipped = {t.tensor: t.reason for t in result.skipped}
    assert inside <= quantized | set(skipped)  # every weight is accounted for
    lstm_in_mode = mode.startswith(("weight", "on_the", "mixed"))
    if build is if_model or lstm_in_mode:
        assert inside <= quantized, skipped
    else:  # LSTM weights in FULL_QUANT / DYNAMIC_QUANT: said why
        assert all("does not quantize LSTM" in skipped[name] for name in inside)


def test_lift_moves_body_initializers_and_constants_to_the_main_graph():
    model = if_model()
    else_branch = _branch(model, "else_branch")
    else_branch.node.insert(0, helper.make_node("Constant", [], ["k"], value=init("k", np.ones((2, 2), np.float32))))
    assert lift_subgraph_constants(model) == 2
    assert {"W_else", "k"} <= {t.name for t in model.graph.initializer}
    assert not else_branch.initializer and [n.op_type for n in else_branch.node] == ["Gemm"]
    onnx.checker.check_model(model, full_check=True)


def test_lift_keeps_a_name_defined_twice():
    model = if_model()
    then_branch = _branch(model, "then_branch")
    then_branch.initializer.append(init("W_else", np.zeros((32, 24), np.float32)))  # same name in both branches
    assert lift_subgraph_constants(model) == 0


def test_outer_initializers_read_only_by_bodies_are_kept():
    model = if_model()
    assert {"h", "W_then", "b_then"} <= outer_reads(_branch(model, "then_branch"))
    drop_unused_initializers(model.graph)
    assert {"W_then", "b_then"} <= {t.name for t in model.graph.initializer}
    index = GraphIndex(model.graph)
    assert (model.graph.node[-1], IMPLICIT_INPUT) in index.consumers["W_then"]

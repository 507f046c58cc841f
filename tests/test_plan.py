"""plan.py: the weight layout table and the rules plan_weights applies."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqlite.config import parse_config
from ptqlite.plan import WEIGHT_SLOTS, WeightRules, gemm_rows, plan_weights, weight_layout, weight_quant_rules

N = helper.make_node


@pytest.mark.parametrize("node, slot, shape, expected", [
    (N("Conv", ["x", "w"], ["y"]), 1, (8, 4, 3, 3), (0, 1, 8, (2, 3))),
    (N("ConvTranspose", ["x", "w"], ["y"], group=2), 1, (4, 3, 3, 3), (1, 0, 6, (2, 3))),
    (N("MatMul", ["x", "w"], ["y"]), 1, (2, 16, 8), (2, 1, 8, ())),
    (N("MatMul", ["w", "x"], ["y"]), 0, (6, 16), (0, 1, 6, ())),
    (N("Gemm", ["x", "w"], ["y"]), 1, (16, 8), (1, 0, 8, ())),
    (N("Gemm", ["x", "w"], ["y"], transB=1), 1, (8, 16), (0, 1, 8, ())),
    (N("Gemm", ["w", "x"], ["y"], transA=1), 0, (16, 6), (1, 0, 6, ())),
    (N("Gather", ["w", "i"], ["y"], axis=1), 0, (10, 4), (1, None, 4, ())),
    (N("LSTM", ["x", "w", "r"], ["y"]), 2, (1, 32, 8), (1, 2, 32, ())),
])
def test_weight_layout(node, slot, shape, expected):
    layout = weight_layout(node, slot, shape)
    assert (layout.output_axis, layout.input_axis, layout.channels, layout.kernel_axes) == expected


def test_weight_slots_come_from_the_layout_table():
    assert WEIGHT_SLOTS == {"Conv": (1,), "ConvTranspose": (1,), "MatMul": (0, 1), "Gemm": (0, 1), "Gather": (0,),
                            "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


def test_gemm_rows_follow_the_kernels_summation_order():
    rng = np.random.default_rng(0)
    conv = rng.normal(size=(8, 4, 3, 3))
    # onnxruntime runs convolutions NHWC: K ordered kernel row, kernel column, input channel
    assert np.array_equal(gemm_rows(conv, "Conv", False), conv.transpose(0, 2, 3, 1).reshape(8, -1))
    matmul = rng.normal(size=(2, 16, 8))
    assert np.array_equal(gemm_rows(matmul, "MatMul", False), matmul.transpose(0, 2, 1).reshape(16, 16))
    gemm = rng.normal(size=(16, 8))
    assert np.array_equal(gemm_rows(gemm, "Gemm", False), gemm.T)
    assert np.array_equal(gemm_rows(gemm.T, "Gemm", True), gemm.T)
    assert gemm_rows(conv, "ConvTranspose", False) is None and gemm_rows(gemm[0], "MatMul", False) is None


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("small", (4, 4)), ("big", (4, 64)), ("conv", (2, 4, 3, 3)))]
    nodes = [N("MatMul", ["x", "small"], ["a"], name="mm_small"), N("MatMul", ["a", "big"], ["b"], name="mm_big"),
             N("Conv", ["img", "conv"], ["c"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                           helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 64]),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rules_decide_the_plan():
    model = _model()
    plain = plan_weights(model, WeightRules(bits=8))
    assert [(s.tensor, s.axis, s.skip_reason) for s in plain.specs] == [("small", 1, ""), ("big", 1, ""),
                                                                        ("conv", 0, "")]
    ruled = plan_weights(model, WeightRules(bits=4, per_channel=False, ops=frozenset({"MatMul"}),
                                            skip_nodes=frozenset({"mm_big"}), min_size=16))
    assert [(s.tensor, s.bits, s.axis, s.skip_reason) for s in ruled.specs] == [
        ("small", 4, None, "16 elements <= min_quant_weight_size=16"), ("big", 4, None, "skip_quant_node lists 'mm_big'")]
    config = parse_config("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
                          "min_quant_weight_channel=2\n")
    assert plan_weights(model, weight_quant_rules(config, True)).specs[2].skip_reason == (
        "2 output channels <= min_quant_weight_channel=2")

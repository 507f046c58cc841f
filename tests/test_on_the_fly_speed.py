"""ON_THE_FLY on CNNs: BatchNormalization folded into the Conv before quantization, and the warning when the output
still runs slower than float."""

import numpy as np
import onnx
from helpers import cosine, run
from onnx import TensorProto, helper, numpy_helper

from ptqlite import convert, parse_config
from ptqlite.latency import SLOWER, Timing
from ptqlite.passes import on_the_fly_speed

RNG = np.random.default_rng(3)


def conv_bn_model() -> onnx.ModelProto:
    """Conv (no bias) -> BatchNormalization -> Relu -> Conv (bias) -> BatchNormalization, inference form."""
    def t(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    inits = [t("w1", RNG.standard_normal((8, 3, 3, 3)) * 0.3), t("w2", RNG.standard_normal((6, 8, 3, 3)) * 0.2),
             t("b2", RNG.standard_normal(6) * 0.1)]
    for name, c in (("bn1", 8), ("bn2", 6)):
        inits += [t(f"{name}_s", RNG.uniform(0.5, 2.0, c)), t(f"{name}_b", RNG.standard_normal(c) * 0.2),
                  t(f"{name}_m", RNG.standard_normal(c) * 0.3), t(f"{name}_v", RNG.uniform(0.2, 3.0, c))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["n1"], name="bn1",
                         epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["y"], name="bn2"),
    ]
    graph = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def otf_config(bits: int = 8):
    return parse_config("[common_quant_param]\nquant_type=WEIGHT_QUANT\n"
                        f"bit_num={bits}\nmin_quant_weight_channel=0\nmin_quant_weight_size=0\n"
                        "[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n", "otf.cfg")


def test_on_the_fly_folds_batch_norm_and_matches_float():
    model = conv_bn_model()
    result = convert(model, otf_config())
    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("DequantizeLinear") == 2 and ops.count("Conv") == 2
    assert any("2 BatchNormalization folded" in n for n in result.notes)
    assert {q.tensor for q in result.quantized} == {"w1", "w2"}
    # the input model keeps its BatchNormalization
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 2
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    want, got = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert cosine(want, got) > 0.9999
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
    # and the speed was measured (a note on a model this small, or the warning)
    assert any("float's time" in w for w in result.warnings) or any("x float on this machine" in n
                                                                     for n in result.notes)


def test_default_strategy_keeps_batch_norm():
    # ONNX Runtime folds the default strategy's decoded weight at load, and BatchNormalization with it
    result = convert(conv_bn_model(), parse_config("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n"
                                                   "min_quant_weight_channel=0\nmin_quant_weight_size=0\n", "w.cfg"))
    assert [n.op_type for n in result.model.graph.node].count("BatchNormalization") == 2


def test_warning_names_ratio_reason_and_the_default_strategy():
    slow = Timing(float_ms=6.4, quantized_ms=17.2)
    warning = on_the_fly_speed.slower_warning(slow, ["Conv", "Gemm"], "x 1x3x224x224")
    assert "2.69x float's time" in warning and "17.20 vs 6.40 ms" in warning and "x 1x3x224x224" in warning
    assert "Conv weights are dequantized on every run" in warning
    assert "Leaving dequant_strategy out (the default strategy)" in warning and "float in memory" in warning
    matmul = on_the_fly_speed.slower_warning(Timing(1.0, 1.5), ["MatMul"], "x 1x8")
    assert "MatMul weights are dequantized on every run" in matmul and "pre-pack" not in matmul


def test_no_warning_within_the_noise_margin():
    assert on_the_fly_speed.slower_warning(Timing(10.0, 10.0 * SLOWER), ["Conv"], "x") == ""
    assert on_the_fly_speed.slower_warning(Timing(10.0, 8.0), ["Conv"], "x") == ""
    assert on_the_fly_speed.slower_warning(Timing(10.0, 10.6), ["Conv"], "x") != ""


def test_slow_timing_becomes_a_warning_of_the_conversion(monkeypatch):
    monkeypatch.setattr(on_the_fly_speed.timer, "measure", lambda *a, **k: Timing(5.0, 12.5))
    result = convert(conv_bn_model(), otf_config())
    assert len(result.warnings) == 1 and "2.50x float's time" in result.warnings[0]
    monkeypatch.setattr(on_the_fly_speed.timer, "measure", lambda *a, **k: Timing(5.0, 4.0))
    result = convert(conv_bn_model(), otf_config())
    assert not result.warnings and any("runs 0.80x float on this machine" in n for n in result.notes)


def test_untimed_model_says_why(monkeypatch):
    monkeypatch.setattr(on_the_fly_speed.timer, "WHOLE_LOAD_BYTES", 100)  # the 1 GiB rule, scaled down
    result = convert(conv_bn_model(), otf_config())
    assert not result.warnings
    assert any(n.startswith("ON_THE_FLY speed not measured: the model holds") for n in result.notes)


def test_analyze_variants_are_not_timed(monkeypatch):
    """analyze converts dozens of variants and measures each itself: ON_THE_FLY's timing is not run for them."""
    def fail(*_args, **_kwargs):
        raise AssertionError("timed")

    from ptqlite.convert import convert as convert_as_analyze_does

    monkeypatch.setattr(on_the_fly_speed.timer, "measure", fail)
    result = convert_as_analyze_does(conv_bn_model(), otf_config(), verify=False, speed_check=False)
    assert not result.warnings
    assert not any("ON_THE_FLY speed" in n or "float on this machine" in n for n in result.notes)
    assert any("BatchNormalization folded" in n for n in result.notes)  # the fold itself still happens

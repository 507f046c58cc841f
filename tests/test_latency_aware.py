"""FULL_QUANT latency-aware planning: where the int8 graph times slower than float, the smallest layers go back to
float until it does not (the timings are patched here; bench/latency_aware.py measures real ones)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import cosine, run
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

from ptqlite import latency
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.errors import ConfigError
from ptqlite.passes.full.latency import smallest_first

REAL_MEASURE = latency.measure  # taken at import, before conftest's fixed timing replaces it for each test
CONFIG = ("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n[data_preprocess_param]\ncalibrate_path=x:/n\n"
          "calibrate_size=8\ninput_type=BIN\n")


def conv_chain(channels=(4, 8, 16, 32)) -> onnx.ModelProto:
    """Convs of growing width, PRelu between them (float on the CPU preset: a QDQ pair at every conv)."""
    r = np.random.default_rng(0)
    nodes, inits, prev, cin = [], [], "x", 3
    for i, co in enumerate(channels):
        inits += [nh.from_array((r.normal(size=(co, cin, 3, 3)) * 0.3).astype(np.float32), f"w{i}"),
                  nh.from_array(np.full((co, 1, 1), 0.25, np.float32), f"s{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("PRelu", [f"c{i}", f"s{i}"], [f"p{i}"], name=f"prelu{i}")]
        prev, cin = f"p{i}", co
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(prev, T.FLOAT, [1, cin, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _samples():
    r = np.random.default_rng(1)
    return [{"x": r.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]


def _timings(monkeypatch, ratios):
    calls = []

    def measure(float_model, quantized, feeds, own_shapes=None, clear_of=None):
        calls.append(quantized)
        return latency.Timing(1.0, ratios[min(len(calls), len(ratios)) - 1])

    monkeypatch.setattr(latency, "measure", measure)
    return calls


def test_smallest_layers_go_back_to_float_until_no_slower(monkeypatch):
    calls = _timings(monkeypatch, [1.3, 1.1, 0.9])  # all int8, 1 layer float, 2 layers float
    model, samples = conv_chain(), _samples()
    result = convert(model, parse_config(CONFIG), samples=samples, progress=False)
    assert len(calls) == 3
    reasons = {t.tensor: t.reason for t in result.skipped}
    assert set(reasons) == {"w0", "w1"} and all("latency-aware" in r for r in reasons.values())
    assert {t.tensor for t in result.quantized} == {"w2", "w3"}
    assert any("2 of 4 weighted layers kept float" in note and "0.90x" in note for note in result.notes)
    int8_convs = {n.input[1] for n in result.model.graph.node if n.op_type == "Conv"}
    assert int8_convs == {"w0", "w1", "w2_dequantized", "w3_dequantized"}
    assert cosine(run(model, samples[0])[0], run(result.model, samples[0])[0]) > 0.99


def test_the_fastest_candidate_wins_when_none_is_as_fast_as_float(monkeypatch):
    _timings(monkeypatch, [1.3, 1.2, 1.05, 1.1, 1.2])
    result = convert(conv_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert {t.tensor for t in result.quantized} == {"w2", "w3"}  # the 1.05x candidate: two layers float


def test_int8_that_is_faster_is_kept_and_said(monkeypatch):
    calls = _timings(monkeypatch, [0.6])
    result = convert(conv_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert len(calls) == 1 and len(result.quantized) == 4
    assert any("int8 runs 0.60x float" in note for note in result.notes)


def test_off_means_never_timed(monkeypatch):
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("timed although latency_aware=false"))
    config = parse_config(CONFIG + "[full_quant_param]\nlatency_aware=false\n")
    result = convert(conv_chain(), config, samples=_samples(), progress=False)
    assert len(result.quantized) == 4 and not any("latency" in note for note in result.notes)


def test_other_presets_are_not_timed_on_this_cpu(monkeypatch):
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("NVGPU graphs are not timed on the CPU"))
    convert(conv_chain(), parse_config(CONFIG + "[full_quant_param]\ntarget_device=NVGPU\n"), samples=_samples(),
            progress=False)


def test_smallest_first_orders_by_multiply_adds():
    from ptqlite.passes.full.graph_plan import plan_graph
    from ptqlite.plan import WeightSpec
    from ptqlite.prepare import prepare
    from ptqlite.targets import target

    model = conv_chain(channels=(32, 4, 16))
    types = prepare(model)
    specs = [WeightSpec(t.name, "Conv", (f"conv{t.name[1]}",), tuple(t.dims), 8, 0) for t in model.graph.initializer
             if t.name.startswith("w")]
    plan = plan_graph(model, types, specs, target("CPU"), set())
    # weights 32*3*9 = 864, 4*32*9 = 1152, 16*4*9 = 576 multiply-adds per position, at the same 16x16 positions
    assert smallest_first(model, plan) == ["conv2", "conv0", "conv1"]


def test_demotion_shares():
    assert latency.demotions(["a", "b", "c", "d"]) == [{"a"}, {"a", "b"}, {"a", "b", "c"}, {"a", "b", "c", "d"}]
    assert latency.demotions(["a"]) == [{"a"}]


def test_latency_aware_is_a_boolean():
    with pytest.raises(ConfigError, match="latency_aware"):
        parse_config(CONFIG + "[full_quant_param]\nlatency_aware=sometimes\n")


def test_a_graph_that_cannot_be_timed_keeps_the_plan(monkeypatch):
    """silero-vad with --inputShape: its If/LSTM does not load at the fixed shapes; timing is advice, not a gate."""
    from ptqlite.errors import ConversionError

    def refuse(*args, **kwargs):
        raise ConversionError("onnxruntime cannot load the model to time it (rank 3 expected)")

    monkeypatch.setattr(latency, "measure", refuse)
    result = convert(conv_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert len(result.quantized) == 4
    assert any(note.startswith("latency-aware planning skipped: onnxruntime cannot load") for note in result.notes)


def test_all_layers_float_is_said_as_such(monkeypatch):
    _timings(monkeypatch, [1.6, 1.5, 1.4, 1.3, 1.0])  # only the all-float candidate is as fast as float
    result = convert(conv_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert not result.quantized
    assert any(w.startswith("FULL_QUANT kept all 4 weighted layers float: their int8 form ran slower")
               for w in result.warnings)


def residual_chain() -> onnx.ModelProto:
    """conv_chain of equal widths with an Add of two activations at the end: int8 on the CPU preset whatever its
    producers run in, so it keeps a QDQ pair when every conv is back in float."""
    model = conv_chain((8, 8, 8, 8))
    graph = model.graph
    graph.node.append(helper.make_node("Add", ["p1", "p3"], ["sum"], name="residual"))
    graph.output[0].name = "sum"
    return model


def test_every_weighted_layer_float_gives_the_float_graph(monkeypatch):
    """PP-OCRv4's text detector on a quiet machine: every conv went back to float and int8 still timed slower,
    but the Adds between them kept their quantize/dequantize pairs, so the output ran 1.12x float, quantized
    nothing and warned of nothing. The float graph is the output then, and the warning says why."""
    _timings(monkeypatch, [1.6, 1.5, 1.4, 1.3, 1.2, 1.0])  # every conv float still 1.2x; the float graph 1.0x
    result = convert(residual_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    ops = {node.op_type for node in result.model.graph.node}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops, ops
    assert not result.quantized
    assert any(w.startswith("FULL_QUANT kept all 4 weighted layers float: their int8 form ran slower")
               for w in result.warnings), result.warnings
    x = _samples()[0]
    np.testing.assert_allclose(run(result.model, x)[0], run(residual_chain(), x)[0], rtol=1e-5, atol=1e-5)


def test_some_layers_int8_keep_their_activations(monkeypatch):
    """Only where every weighted layer is float does the plan drop its int8 activations."""
    _timings(monkeypatch, [1.6, 1.5, 0.9])  # two convs float: 0.9x
    result = convert(residual_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert len(result.quantized) == 2
    assert "QuantizeLinear" in {node.op_type for node in result.model.graph.node}


def test_within_the_noise_margin_int8_is_kept(monkeypatch):
    calls = _timings(monkeypatch, [1.04])  # measured twice (within the margin), 1.04x both times
    result = convert(conv_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert len(calls) == 2 and len(result.quantized) == 4


def test_a_ratio_within_the_margin_is_measured_again(monkeypatch):
    calls = _timings(monkeypatch, [1.04, 1.10, 0.9])  # the two pooled: 1.07x, slower; one layer float: 0.9x
    result = convert(conv_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert len(calls) == 3 and {t.tensor for t in result.quantized} == {"w1", "w2", "w3"}
    assert any("int8 ran 1.07x float" in note for note in result.notes)


def _if_reads_outer_gemm() -> onnx.ModelProto:
    """x -> Conv -> Flatten -> h; If(sum(h) > 0): then Gemm(h, W_then), else Gemm(h, W_else), both weights outer
    initializers read inside the branches (stored int8 weight-only by FULL_QUANT)."""
    r = np.random.default_rng(2)
    branches = []
    for side in ("then", "else"):
        branches.append(helper.make_graph(
            [helper.make_node("Gemm", ["h", f"W_{side}"], [f"y_{side}"], name=f"gemm_{side}")], side, [],
            [helper.make_tensor_value_info(f"y_{side}", T.FLOAT, [1, 24])]))
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["h"], name="flatten"),
             helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branches[0],
                              else_branch=branches[1])]
    inits = [nh.from_array((r.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), "wc"),
             nh.from_array((r.normal(size=(8 * 16 * 16, 24)) * 0.05).astype(np.float32), "W_then"),
             nh.from_array((r.normal(size=(8 * 16 * 16, 24)) * 0.05).astype(np.float32), "W_else"),
             nh.from_array(np.float32(0.0), "zero")]
    graph = helper.make_graph(nodes, "if_gemm", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 24])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_inside_bodies_go_back_to_float_first(monkeypatch):
    """silero-vad: its weights are all inside If branches, stored int8 behind a DequantizeLinear that runs on every
    call, so FULL_QUANT ran 1.3-1.5x float and demoting main-graph layers could not help. Those weights are now the
    first candidate to go back to float."""
    calls = _timings(monkeypatch, [1.3, 0.98])
    model, samples = _if_reads_outer_gemm(), _samples()
    result = convert(model, parse_config(CONFIG), samples=samples, progress=False)
    assert len(calls) == 2
    reasons = {t.tensor: t.reason for t in result.skipped}
    assert {"W_then", "W_else"} <= set(reasons) and "latency-aware" in reasons["W_then"]
    assert {t.tensor for t in result.quantized} == {"wc"}  # the main-graph Conv stays int8
    assert any("2 of 3 weighted layers kept float (those inside If/Loop/Scan bodies first" in note
               for note in result.notes)
    initializers = {t.name: t for t in result.model.graph.initializer}
    assert initializers["W_then"].data_type == T.FLOAT
    assert cosine(run(model, samples[0])[0], run(result.model, samples[0])[0]) > 0.99


def _lstm_if(shape: list | None = None) -> onnx.ModelProto:
    """An If whose branch that never runs at batch 1 feeds an LSTM a Squeeze() of rank 2 once the dims are fixed:
    ONNX Runtime loads the model with symbolic dims and refuses it with [1, 8, 5] (silero-vad's If over its 8k and
    16k branches, "First input tensor must have rank 3")."""
    r = np.random.default_rng(0)
    hidden, features = 4, 8
    then_g = helper.make_graph([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
                                helper.make_node("LSTM", ["t", "W", "R"], ["y1"], hidden_size=hidden)], "then", [],
                               [helper.make_tensor_value_info("y1", T.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Squeeze", ["x"], ["s"]),
                                helper.make_node("LSTM", ["s", "W", "R"], ["y2"], hidden_size=hidden)], "else", [],
                               [helper.make_tensor_value_info("y2", T.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["xin", "Wc"], ["xc"]), helper.make_node("Relu", ["xc"], ["xr"]),
             helper.make_node("Transpose", ["xr"], ["x"], perm=[0, 2, 1]),
             helper.make_node("Shape", ["x"], ["sh"]), helper.make_node("Gather", ["sh", "zero"], ["b"], axis=0),
             helper.make_node("Equal", ["b", "one"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array(1, np.int64), "one"),
             nh.from_array(r.normal(0, .3, (1, 4 * hidden, features)).astype(np.float32), "W"),
             nh.from_array(r.normal(0, .3, (1, 4 * hidden, hidden)).astype(np.float32), "R"),
             nh.from_array(r.normal(0, .3, (features, features, 1)).astype(np.float32), "Wc")]
    graph = helper.make_graph(nodes, "rnn_if",
                              [helper.make_tensor_value_info("xin", T.FLOAT, shape or ["B", features, "T"])],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_graph_refused_at_the_fixed_shapes_is_timed_at_its_own(monkeypatch):
    """Timing used to fail on such graphs ("latency-aware planning skipped"), so the planning could not act."""
    from ptqlite.errors import ConversionError

    monkeypatch.setattr(latency, "measure", REAL_MEASURE)
    own, fixed = _lstm_if(), _lstm_if([1, 8, 5])
    feeds = {"xin": np.random.default_rng(3).normal(size=(1, 8, 5)).astype(np.float32)}
    with pytest.raises(ConversionError, match="to time it"):
        latency.measure(fixed, fixed, feeds)
    timing = latency.measure(fixed, fixed, feeds, own_shapes=own)
    assert timing.float_ms > 0 and timing.quantized_ms > 0

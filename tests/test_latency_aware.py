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

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.errors import ConfigError
from ptqlite.passes.full import latency

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

    def measure(float_model, quantized, feeds):
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
    monkeypatch.setattr(latency, "measure", lambda *a: pytest.fail("timed although latency_aware=false"))
    config = parse_config(CONFIG + "[full_quant_param]\nlatency_aware=false\n")
    result = convert(conv_chain(), config, samples=_samples(), progress=False)
    assert len(result.quantized) == 4 and not any("latency" in note for note in result.notes)


def test_other_presets_are_not_timed_on_this_cpu(monkeypatch):
    monkeypatch.setattr(latency, "measure", lambda *a: pytest.fail("NVGPU graphs are not timed on the CPU"))
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
    assert latency.smallest_first(model, plan) == ["conv2", "conv0", "conv1"]


def test_demotion_shares():
    assert latency.demotions(["a", "b", "c", "d"]) == [{"a"}, {"a", "b"}, {"a", "b", "c"}, {"a", "b", "c", "d"}]
    assert latency.demotions(["a"]) == [{"a"}]


def test_latency_aware_is_a_boolean():
    with pytest.raises(ConfigError, match="latency_aware"):
        parse_config(CONFIG + "[full_quant_param]\nlatency_aware=sometimes\n")


def test_a_graph_that_cannot_be_timed_keeps_the_plan(monkeypatch):
    """silero-vad with --inputShape: its If/LSTM does not load at the fixed shapes; timing is advice, not a gate."""
    from ptqlite.errors import ConversionError

    def refuse(*args):
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


def test_within_the_noise_margin_int8_is_kept(monkeypatch):
    calls = _timings(monkeypatch, [1.04])
    result = convert(conv_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert len(calls) == 1 and len(result.quantized) == 4

"""Activation smoothing in front of FULL_QUANT MatMul/Gemm inputs with outlier channels."""

from __future__ import annotations

import csv

import numpy as np
import onnx
import pytest
from helpers import cosine, full_config, session
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ptqlite.smooth as smoothing
from ptqlite.convert import convert
from ptqlite.smooth import smooth, smoothing_factors, smoothing_groups

K, N = 32, 24
CONFIG = full_config()


def _model(gamma: np.ndarray, seed: int = 0, gemm_trans_b: bool = False) -> onnx.ModelProto:
    """LayerNorm (gamma with outlier channels) -> MatMul (or Gemm) -> Relu -> MatMul; the LayerNorm output also
    feeds a residual Add, as in a transformer."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1 / np.sqrt(K), (K, K)).astype(np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(K), (K, N)).astype(np.float32)
    if gemm_trans_b:
        first = helper.make_node("Gemm", ["h", "w1t", "b1"], ["m"], name="fc1", transB=1)
        inits = [numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1t")]
        x_shape = [4, K]
    else:
        first = helper.make_node("MatMul", ["h", "w1"], ["m0"], name="fc1")
        inits = [numpy_helper.from_array(w1, "w1")]
        x_shape = [1, 4, K]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1), first]
    if not gemm_trans_b:
        nodes.append(helper.make_node("Add", ["m0", "b1"], ["m"], name="bias1"))
    nodes += [helper.make_node("Add", ["m", "h"], ["r"], name="residual"),
              helper.make_node("Relu", ["r"], ["a"], name="relu"),
              helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    inits += [numpy_helper.from_array(gamma.astype(np.float32), "gamma"),
              numpy_helper.from_array(np.zeros(K, np.float32), "beta"),
              numpy_helper.from_array(rng.normal(0, 0.1, K).astype(np.float32), "b1"),
              numpy_helper.from_array(w2, "w2")]
    graph = helper.make_graph(nodes, "ln_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _outlier_gamma() -> np.ndarray:
    gamma = np.ones(K)
    gamma[[3, 17]] = 40.0  # two channels 40x wider than the rest, as LayerNorm outputs of BERT-like models have
    return gamma


def _samples(count: int, shape, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(count)]


def test_factors_leave_alike_channels_alone_and_have_unit_geometric_mean():
    w = [np.ones((K, N))]
    assert smoothing_factors(np.full(K, 2.0), w) is None
    assert smoothing_factors(np.linspace(1, 3.9, K), w) is None  # spread below MIN_SPREAD
    amax = np.ones(K)
    amax[0] = 100.0
    s = smoothing_factors(amax, w, alpha=0.5)
    assert s is not None
    np.testing.assert_allclose(np.exp(np.log(s).mean()), 1.0, rtol=1e-12)
    np.testing.assert_allclose(s[0] / s[1], 10.0, rtol=1e-12)  # sqrt(100 / 1) with equal weight rows


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), trans_b=st.booleans(), spike=st.floats(10.0, 500.0))
def test_smoothing_keeps_the_float_function(seed, trans_b, spike):
    gamma = np.ones(K)
    gamma[seed % K] = spike
    model = _model(gamma, seed, trans_b)
    shape = [4, K] if trans_b else [1, 4, K]
    groups = smoothing_groups(model, {"w1t" if trans_b else "w1", "w2"}, set())
    assert [g.tensor for g in groups] == ["h", "a"]
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    amax = {"h": np.abs(gamma) * 3.0, "a": np.ones(K)}  # "a" is uniform: left alone
    names, rescale = smooth(smoothed, smoothing_groups(smoothed, {"w1t" if trans_b else "w1", "w2"}, set()), amax)
    assert len(names) == 1 and set(rescale) == {("fc1", 0), ("fc1", 1)}
    feed = _samples(1, shape, seed)[0]
    expected = session(model).run(None, feed)[0]
    np.testing.assert_allclose(session(smoothed).run(None, feed)[0], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_full_quant_smooths_outlier_channels_and_gains_accuracy(monkeypatch):
    model = _model(_outlier_gamma())
    calib, evaluation = _samples(16, [1, 4, K]), _samples(8, [1, 4, K], seed=2)
    smoothed = convert(model, CONFIG, samples=calib, progress=False)
    # "a" = Relu(residual + ...) inherits the outlier channels of "h"
    assert any("activation smoothing in front of 2 " in note for note in smoothed.notes)
    muls = [n for n in smoothed.model.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth")]
    assert sorted(m.input[0] for m in muls) == ["a", "h"]
    # the Muls read their input at full precision; what they output is what the int8 MatMuls read
    quantized_inputs = {n.input[0] for n in smoothed.model.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized_inputs == {m.output[0] for m in muls}
    monkeypatch.setattr(smoothing, "MIN_SPREAD", np.inf)
    plain = convert(model, CONFIG, samples=calib, progress=False)
    assert not any("smoothing" in note for note in plain.notes)
    reference = session(model)

    def error(quantized: onnx.ModelProto) -> float:
        run = session(quantized)
        return float(np.mean([1 - cosine(run.run(None, f)[0], reference.run(None, f)[0]) for f in evaluation]))

    # measured: 7e-5 smoothed, 5e-4 plain
    assert error(smoothed.model) < 0.4 * error(plain.model)


@pytest.mark.parametrize("skip", ["fc1", ""])
def test_skipped_nodes_are_not_smoothed(skip):
    model = _model(_outlier_gamma())
    assert [g.tensor for g in smoothing_groups(model, {"w1", "w2"}, {skip})] == (["a"] if skip else ["h", "a"])


def test_shared_weights_are_not_smoothed():
    """Scaling the rows of a weight another node also reads would change that node."""
    model = _model(_outlier_gamma())
    model.graph.node.append(helper.make_node("MatMul", ["a", "w1"], ["z"], name="other"))
    groups = smoothing_groups(model, {"w1", "w2"}, set())
    assert [(g.tensor, [n.name for n in g.nodes]) for g in groups] == [("a", ["fc2"])]


def test_debug_report_compares_smoothed_tensors_in_float_units(tmp_path):
    """The report maps what a smoothed MatMul reads (x / s, rows * s) back with the recorded factors, so the
    LayerNorm output and the weight are not reported as broken."""
    config = full_config(common=f"debug_info_save_path={tmp_path}\n")
    result = convert(_model(_outlier_gamma()), config, samples=_samples(16, [1, 4, K]), progress=False)
    assert result.input_maps  # smoothing happened
    rows = list(csv.DictReader((tmp_path / "round_0.csv").read_text().splitlines()))
    cosines = {(r["TensorName"], r["InOutFlag"]): float(r["CosineSimilarity"])
               for r in rows if r["DataTypeFlag"] == "Dequant"}
    assert cosines[("h", "Output")] > 0.999  # 0.65 when compared with x / s unscaled
    assert cosines[("w1", "Input")] > 0.999


def test_per_tensor_weights_are_not_smoothed():
    config = full_config(per_channel=False)
    result = convert(_model(_outlier_gamma()), config, samples=_samples(16, [1, 4, K]), progress=False)
    assert not any("smoothing" in note for note in result.notes)
    assert not [n for n in result.model.graph.node if n.name.endswith("_smooth")]


def test_smoothed_conversion_is_deterministic():
    calib = _samples(16, [1, 4, K])
    first = convert(_model(_outlier_gamma()), CONFIG, samples=calib, progress=False).model
    second = convert(_model(_outlier_gamma()), CONFIG, samples=calib, progress=False).model
    assert any(n.name.endswith("_smooth") for n in first.graph.node)
    assert first.SerializeToString() == second.SerializeToString()


def test_too_few_rows_to_judge_spread_are_not_smoothed():
    """8 samples of 4 rows: each channel's maximum over 32 values is noise, not an outlier channel."""
    result = convert(_model(_outlier_gamma()), CONFIG, samples=_samples(8, [1, 4, K]), progress=False)
    assert not any("smoothing" in note for note in result.notes)

"""FULL_QUANT calibration statistics: MAX_MIN ranges and channel means reduced inside the probed graph give the
values the whole tensors gave, NaN/Inf included, and the whole tensors are not fetched."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from helpers import run
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

from ptqlite.passes.full import statistics
from ptqlite.passes.full.statistics import CHANNEL_MAX, CHANNEL_MEAN, RANGE, StatRequest, collect


def conv_model(opset: int = 17) -> onnx.ModelProto:
    """x -> Conv -> c -> Log -> l (NaN where c < 0, -inf where c == 0) -> Relu -> r; outputs r."""
    r = np.random.default_rng(0)
    w = nh.from_array((r.normal(size=(6, 3, 3, 3)) * 0.4).astype(np.float32), "w")
    b = nh.from_array(r.normal(size=6).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Log", ["c"], ["l"], name="log"),
             helper.make_node("Relu", ["l"], ["r"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("r", T.FLOAT, [1, 6, 8, 8])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def samples(count: int = 4) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(1)
    return [{"x": r.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def whole(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return dict(zip([o.name for o in probe.graph.output], run(probe, feeds)))


def finite_range(arrays: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([a.ravel() for a in arrays])
    values = values[np.isfinite(values)]
    return float(values.min()), float(values.max())


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_reduced_ranges_and_means_equal_the_whole_tensors(opset):
    model, data = conv_model(opset), samples()
    stats = collect(model, [StatRequest("c", RANGE), StatRequest("r", RANGE), StatRequest("c", CHANNEL_MEAN)],
                    data, progress=False)
    values = [whole(model, ["c", "r"], s) for s in data]
    assert stats.samples == 4
    assert stats.ranges["c"] == finite_range([v["c"] for v in values])
    assert stats.ranges["r"] == finite_range([v["r"] for v in values])
    expected = sum(v["c"].astype(np.float64).mean(axis=(0, 2, 3)) for v in values)
    np.testing.assert_allclose(stats.channel_mean_sums["c"], expected, rtol=1e-13)
    assert stats.channel_mean_sums["c"].dtype == np.float64 and stats.channel_mean_sums["c"].shape == (6,)


def test_nan_and_inf_in_a_tensor_leave_its_range_finite():
    """Log of the conv output holds NaN (negative inputs) on every sample: the range is that of its finite values,
    whatever order the reduction met them in, as the observer computes it on the whole tensor."""
    model, data = conv_model(), samples()
    data.append({"x": np.zeros((1, 3, 8, 8), np.float32)})  # c = bias only; with a zero channel bias, log -> -inf
    stats = collect(model, [StatRequest("l", RANGE)], data, progress=False)
    values = [whole(model, ["l"], s)["l"] for s in data]
    assert any(np.isnan(v).any() for v in values)
    lo, hi = stats.ranges["l"]
    assert (lo, hi) == finite_range(values) and math.isfinite(lo) and math.isfinite(hi)


def test_reduced_tensors_are_not_fetched_whole(monkeypatch):
    seen = []
    real = statistics.cpu_session

    def spy(model, *args, **kwargs):
        seen.append([o.name for o in model.graph.output])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(statistics, "cpu_session", spy)
    model = conv_model()
    stats = collect(model, [StatRequest("c", RANGE), StatRequest("c", CHANNEL_MEAN), StatRequest("r", RANGE, "KL"),
                            StatRequest("l", CHANNEL_MAX)], samples(2), progress=False)
    assert len(seen) == 1
    outputs = set(seen[0])
    assert "c" not in outputs  # reduced in the graph: a few numbers per sample
    assert {"r", "l"} <= outputs  # a KL histogram and a channel maximum need the whole tensor
    assert stats.channel_max["l"].shape == (6,)
    assert stats.ranges["r"][1] > 0


def test_a_type_the_reductions_lack_falls_back_to_whole_tensors():
    """ReduceSum has no uint8 kernel in onnxruntime: the range of a uint8 tensor is measured on the tensor."""
    nodes = [helper.make_node("Cast", ["x"], ["u"], name="cast", to=T.UINT8),
             helper.make_node("Cast", ["u"], ["y"], name="back", to=T.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": np.array([3, 7, 1, 250], np.float32)}, {"x": np.array([2, 9, 4, 5], np.float32)}]
    stats = collect(model, [StatRequest("u", RANGE)], data, progress=False)
    assert stats.ranges["u"] == (1.0, 250.0)


def test_collect_leaves_the_model_as_it_was():
    """The probe outputs and reductions are added to the model itself while its session loads (no copy of the
    model), then removed: the model's bytes are the same after a pass, also when the session fails to load."""
    model = conv_model()
    before = model.SerializeToString()
    collect(model, [StatRequest("c", RANGE), StatRequest("c", CHANNEL_MEAN), StatRequest("r", RANGE, "KL")],
            samples(1), progress=False)
    assert model.SerializeToString() == before
    nodes = [helper.make_node("Cast", ["x"], ["u"], name="cast", to=T.UINT8),
             helper.make_node("Cast", ["u"], ["y"], name="back", to=T.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2])])
    cast = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = cast.SerializeToString()
    collect(cast, [StatRequest("u", RANGE)], [{"x": np.array([1, 2], np.float32)}], progress=False)
    assert cast.SerializeToString() == before


def test_bias_correction_leaves_the_float_model_as_it_was(monkeypatch):
    """The layer copies of bias correction go into the float graph for its pass and are removed after it."""
    from ptqlite.config import parse_config
    from ptqlite.passes.full import bias_correction
    from ptqlite.passes.full import run as full_quant

    graphs = []
    real = bias_correction.collect

    def spy(m, requests, *args, **kwargs):
        graphs.append((len(m.graph.node), len(m.graph.initializer)))
        return real(m, requests, *args, **kwargs)

    seen = {}
    real_correct = bias_correction.correct_biases

    def correct(model, *args, **kwargs):
        before = model.SerializeToString()
        out = real_correct(model, *args, **kwargs)
        seen["same"] = model.SerializeToString() == before
        return out

    from ptqlite.passes import full

    monkeypatch.setattr(bias_correction, "collect", spy)
    monkeypatch.setattr(full, "correct_biases", correct)
    config = parse_config("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n"
                          "[full_quant_param]\nbias_correction=true\nper_channel=true\n", "t.cfg", samples_given=True)
    result = full_quant(conv_model(), config, samples=samples(2), progress=False)
    assert graphs and graphs[0][0] > 3  # the conv's quantized copy was in the graph during the pass
    assert seen["same"]
    assert any("bias correction of 1 layers" in note for note in result.notes)

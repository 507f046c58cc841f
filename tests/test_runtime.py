"""runtime.py: sessions, probes, the synthetic-input rule, interleaved timing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqlite.errors import ConversionError, DataError, ModelError
from ptqlite.runtime import (
    BENCHMARK_VALUES,
    REFERENCE_VALUES,
    InputSpec,
    Probe,
    cpu_session,
    file_session,
    model_input_specs,
    session_feeds,
    synthetic_inputs,
    time_interleaved,
    with_outputs,
)


def _model() -> onnx.ModelProto:
    """y = relu(x @ w) and ids_out = ids; inputs x [batch, 3] float and ids [2] int64."""
    w = numpy_helper.from_array(np.array([[1, -1], [2, 0], [0, 1]], np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"]),
             helper.make_node("Identity", ["ids"], ["ids_out"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("ids_out", TensorProto.INT64, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_model_input_specs_take_unknown_dimensions_as_one():
    assert model_input_specs(_model()) == [InputSpec("x", (1, 3), np.dtype(np.float32)),
                                           InputSpec("ids", (2,), np.dtype(np.int64))]


def test_reference_values_are_the_references_seeded_uniform_draws():
    # The debug reports, analyze and auto_tune always drew these: one generator, seed 0, uniform [0.1, 1) for
    # floats in input order and sample after sample, integers 1 without a draw.
    specs = [InputSpec("a", (2, 3), np.dtype(np.float32)), InputSpec("n", (4,), np.dtype(np.int64)),
             InputSpec("b", (5,), np.dtype(np.float16))]
    samples = synthetic_inputs(specs, REFERENCE_VALUES, count=3)
    rng = np.random.default_rng(0)
    for sample in samples:
        assert np.array_equal(sample["a"], rng.uniform(0.1, 1.0, size=(2, 3)).astype(np.float32))
        assert np.array_equal(sample["n"], np.ones(4, np.int64))
        assert np.array_equal(sample["b"], rng.uniform(0.1, 1.0, size=(5,)).astype(np.float16))
    assert synthetic_inputs(specs)[0].keys() == samples[0].keys()
    assert all(np.array_equal(synthetic_inputs(specs)[0][k], samples[0][k]) for k in samples[0])


def test_benchmark_values_are_the_benchmarks_draws():
    specs = [InputSpec("input_ids", (2, 4), np.dtype(np.int64)), InputSpec("attention_mask", (2, 4), np.dtype(np.float32)),
             InputSpec("segment_ids", (2, 4), np.dtype(np.int32)), InputSpec("x", (3,), np.dtype(np.float32)),
             InputSpec("flag", (1,), np.dtype(np.bool_))]
    (feeds,) = synthetic_inputs(specs, BENCHMARK_VALUES)
    rng = np.random.default_rng(20240601)
    assert np.array_equal(feeds["input_ids"], rng.integers(1, 1000, size=(2, 4)).astype(np.int64))
    assert np.array_equal(feeds["attention_mask"], np.ones((2, 4), np.float32))  # by name, whatever its type
    assert np.array_equal(feeds["segment_ids"], np.zeros((2, 4), np.int32))
    assert np.array_equal(feeds["x"], rng.standard_normal(3).astype(np.float32))
    assert feeds["flag"].dtype == np.bool_ and feeds["flag"].all()


def test_probe_returns_intermediate_values_inputs_and_constants():
    model = _model()
    probe = Probe(model, ["h", "x", "w"], "for a test")
    x = np.array([[1, 2, 3]], np.float32)
    values = probe.run({"x": x, "ids": np.array([1, 2], np.int64), "unused": x})
    assert np.array_equal(values["h"], [[5.0, 2.0]]) and np.array_equal(values["y"], [[5.0, 2.0]])
    assert values["x"] is x
    assert np.array_equal(probe.constant("w"), numpy_helper.to_array(model.graph.initializer[0]))
    assert probe.constant("h") is None
    assert [o.name for o in with_outputs(model, ["h", "y", "h"]).graph.output] == ["y", "ids_out", "h"]
    assert len(model.graph.output) == 2  # the model itself is not changed


def test_session_feeds_keep_only_the_sessions_inputs():
    session = cpu_session(_model(), "for a test")
    feeds = {"x": np.zeros((1, 3), np.float32), "ids": np.zeros(2, np.int64), "other": np.zeros(1)}
    assert sorted(session_feeds(session, feeds)) == ["ids", "x"]


def test_sessions_that_cannot_load_name_the_purpose_or_the_file(tmp_path):
    broken = _model()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ConversionError, match="cannot load the model for a test"):
        cpu_session(broken, "for a test")
    path = tmp_path / "broken.onnx"
    onnx.save(broken, path)
    with pytest.raises(ModelError, match=f"{path}: onnxruntime cannot load the model"):
        file_session(path, threads=1)


def test_time_interleaved_times_each_session_per_loop(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    sessions = [file_session(path, 1), file_session(path, 1)]
    feeds = {"x": np.ones((1, 3), np.float32), "ids": np.ones(2, np.int64)}
    outputs, latencies = time_interleaved(sessions, feeds, loops=3, warmup=1)
    assert [len(t) for t in latencies] == [3, 3] and all(t > 0 for run in latencies for t in run)
    assert np.array_equal(outputs[0][0], [[3.0, 0.0]]) and np.array_equal(outputs[1][0], outputs[0][0])
    with pytest.raises(DataError, match="cannot run on the given inputs"):
        time_interleaved(sessions, {"x": np.ones((1, 4), np.float32), "ids": feeds["ids"]}, loops=1, warmup=0)

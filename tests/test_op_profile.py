"""`ptqlite benchmark --profile`: op-type and node times from onnxruntime's profiler, on the executed graph."""

from __future__ import annotations

import json
import tempfile
from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import RESNET20, run_benchmark_cli, session
from onnx import TensorProto, helper, numpy_helper

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.errors import ModelError
from ptqlite.model import save_model
from ptqlite.op_profile import ProfileComparison, profile_models, summarize

FAST = ["--loopCount=3", "--warmUpLoopCount=1"]
# Ops that onnxruntime may run as a zero-copy view, whose kernel time can round to 0 us.
_VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def executed_op_types(path, tmp_path) -> Counter:
    """Op types of the graph onnxruntime runs, read from the optimized model it saves."""
    optimized = tmp_path / "optimized.onnx"
    session(path, optimized_path=optimized)
    return Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


@pytest.fixture(scope="module")
def float_and_dynamic(tmp_path_factory):
    """A MatMul -> Relu -> Softmax graph and its DYNAMIC_QUANT conversion (MatMulInteger in the file)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Softmax", ["r"], ["y"], name="softmax", axis=-1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 256])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path_factory.mktemp("profile")
    cfg = parse_config(
        "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nmin_quant_weight_size=0\nmin_quant_weight_channel=0\n",
        "t.cfg",
    )
    quantized = convert(model, cfg).model
    return (
        save_model(model, folder / "float.onnx"),
        save_model(quantized, folder / "dynamic.onnx"),
        {"x": rng.standard_normal((16, 256)).astype(np.float32)},
    )


def check_profile(profile, expected: Counter) -> None:
    assert Counter({o.op_type: o.nodes for o in profile.op_types}) == expected
    assert len(profile.nodes) == sum(expected.values())
    assert sum(o.share for o in profile.op_types) == pytest.approx(1.0, abs=1e-9)
    assert sum(n.share for n in profile.nodes) == pytest.approx(1.0, abs=1e-9)
    assert profile.kernel_ms == pytest.approx(sum(o.ms_per_run for o in profile.op_types))
    assert profile.kernel_ms == pytest.approx(sum(n.ms_per_run for n in profile.nodes))
    assert all(o.ms_per_run > 0 for o in profile.op_types if o.op_type not in _VIEW_OPS)
    assert profile.run_ms > 0 and profile.kernel_ms > 0
    times = [o.ms_per_run for o in profile.op_types]
    assert times == sorted(times, reverse=True)


def test_resnet20_op_types_are_those_of_the_executed_graph(tmp_path):
    inputs = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    (profile,) = profile_models([RESNET20], inputs, runs=3, warmup=1)
    expected = executed_op_types(RESNET20, tmp_path)
    check_profile(profile, expected)
    assert profile.op_types[0].op_type == "Conv"  # convs are most of ResNet20's time
    assert "ReorderInput" in expected  # the NCHWc layout change: not an op of the file
    assert all(n.shapes.startswith("float[1,") for n in profile.nodes if n.op_type == "Conv")
    assert profile.runs == 3 and profile.warmup == 1


def test_fused_dynamic_quant_matmul(float_and_dynamic, tmp_path):
    float_path, dynamic_path, inputs = float_and_dynamic
    quantized, baseline = profile_models([dynamic_path, float_path], inputs, runs=3, warmup=1)
    expected = executed_op_types(dynamic_path, tmp_path)
    check_profile(quantized, expected)
    check_profile(baseline, executed_op_types(float_path, tmp_path))
    file_types = {n.op_type for n in onnx.load(str(dynamic_path)).graph.node}
    assert "MatMulInteger" in file_types and "MatMulInteger" not in expected
    assert {o.op_type for o in quantized.op_types} == set(expected)
    rows = {r["op_type"]: r for r in ProfileComparison(quantized, baseline).rows()}
    assert rows["Relu"]["ratio"] == pytest.approx(
        rows["Relu"]["model"]["ms_per_run"] / rows["Relu"]["baseline"]["ms_per_run"]
    )
    assert rows["MatMul"]["model"] is None and rows["MatMul"]["ratio"] is None  # fused away in the model


def test_trace_files_are_removed(float_and_dynamic, tmp_path, monkeypatch):
    float_path, _, inputs = float_and_dynamic
    traces = tmp_path / "tmp"
    traces.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(traces))
    profile_models([float_path], inputs, runs=2, warmup=0)
    assert list(traces.iterdir()) == []


def _event(cat: str, name: str, ts: int, dur: int, **args) -> dict:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "ph": "X", "args": args}


def test_warm_up_runs_are_left_out_and_each_node_takes_its_median():
    events = [_event("Session", "session_initialization", 0, 50)]
    # one warm-up run (900 us conv) then three kept runs, one of them slowed down by another program
    for ts, conv_us in [(100, 900), (2000, 300), (3000, 100), (4000, 5000)]:
        events.append(_event("Session", "model_run", ts, conv_us + 60))
        events.append(_event("Node", "c_kernel_time", ts + 5, conv_us, op_name="Conv", node_index="0",
                             input_type_shape=[{"float": [1, 3, 8, 8]}, {"float": [4, 3, 3, 3]}],
                             output_type_shape=[{"float": [1, 4, 8, 8]}]))
        events.append(_event("Node", "c_fence_before", ts + 5, 1, op_name="Conv", node_index="0"))
        events.append(_event("Node", "_kernel_time", ts + 5 + conv_us, 50, op_name="Relu", node_index="7"))
    profile = summarize(events, "m.onnx", runs=3, warmup=1)
    assert profile.kernel_ms == pytest.approx((300 + 50) / 1000)
    assert profile.run_ms == pytest.approx(360 / 1000)
    conv, relu = profile.op_types
    assert (conv.op_type, conv.ms_per_run, conv.nodes) == ("Conv", pytest.approx(0.3), 1)
    assert conv.share == pytest.approx(300 / 350) and relu.share == pytest.approx(50 / 350)
    assert [n.name for n in profile.nodes] == ["c", "(unnamed node 7)"]
    assert [n.shapes for n in profile.nodes] == ["float[1,3,8,8] -> float[1,4,8,8]", "? -> ?"]
    with pytest.raises(ModelError, match="holds 4 model run"):
        summarize(events, "m.onnx", runs=5)


def test_cli_table_with_baseline(float_and_dynamic, capsys):
    float_path, dynamic_path, _ = float_and_dynamic
    code, out, _ = run_benchmark_cli(
        capsys, f"--modelFile={dynamic_path}", f"--baselineFile={float_path}", "--profile", "--profileTop=2", *FAST
    )
    assert code == 0
    assert "median latency" in out  # the normal report comes first
    profile = out[out.index("op profile:"):]
    assert "after its fusions" in profile
    header = next(line for line in profile.splitlines() if line.startswith("op type"))
    assert header.split() == ["op", "type", "model", "ms", "share", "nodes", "baseline", "ms", "share", "nodes",
                              "ratio"]
    assert any(line.startswith("DynamicQuantizeMatMul") for line in profile.splitlines())
    assert any(line.startswith("MatMul ") for line in profile.splitlines())
    assert "slowest 2 nodes of the model:" in profile
    listed = profile[profile.index("slowest 2 nodes"):].splitlines()[2:]
    assert len(listed) == 2 and all("float[16,256] -> " in line for line in listed)


def test_cli_json_and_output_unchanged_without_profile(capsys):
    code, out, _ = run_benchmark_cli(capsys, f"--modelFile={RESNET20}", "--json", "--profile", *FAST)
    assert code == 0
    profile = json.loads(out)["profile"]
    assert profile["runs"] == 3 and profile["warmup"] == 1 and profile["baseline"] is None
    assert len(profile["slowest_nodes"]) == 10
    assert profile["op_types"][0]["op_type"] == "Conv"
    assert sum(r["model"]["share"] for r in profile["op_types"]) == pytest.approx(1.0)
    assert profile["model"]["nodes"] == sum(r["model"]["nodes"] for r in profile["op_types"])
    code, out, _ = run_benchmark_cli(capsys, f"--modelFile={RESNET20}", "--json", *FAST)
    assert "profile" not in json.loads(out)
    code, out, _ = run_benchmark_cli(capsys, f"--modelFile={RESNET20}", *FAST)
    assert "op profile" not in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--profile", "--profileTop=-1"], "--profileTop=-1: expected an integer >= 0"),
        (["--profile", "--profileTop=many"], "--profileTop=many: expected an integer >= 0"),
        (["--profileTop=5"], "--profileTop=5 needs --profile"),
    ],
)
def test_bad_profile_top(capsys, args, message):
    code, out, err = run_benchmark_cli(capsys, f"--modelFile={RESNET20}", *args, *FAST)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1

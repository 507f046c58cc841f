"""`ptqlite benchmark`: fields, cosine, JSON output and one-sentence errors, on the bundled ResNet20."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_benchmark_cli
from onnx import TensorProto, helper, numpy_helper

from ptqlite.bench import benchmark, cosine
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.model import save_model
from ptqlite.runtime import BENCHMARK_VALUES, InputSpec, synthetic_inputs

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "models" / "resnet20_cifar10.onnx"
FAST = ["--loopCount=3", "--warmUpLoopCount=1"]


def test_json_with_itself_as_baseline(capsys):
    code, out, _ = run_benchmark_cli(capsys, f"--modelFile={RESNET}", f"--baselineFile={RESNET}", "--json", *FAST)
    assert code == 0
    report = json.loads(out)
    for side in ("model", "baseline"):
        m = report[side]
        assert m["file_bytes"] == RESNET.stat().st_size
        assert m["peak_rss_bytes"] > 10e6  # a process with onnxruntime loaded holds tens of MB at least
        assert m["latency_ms"] > 0
    assert report["cosine"] == {"logits": pytest.approx(1.0, abs=1e-12)}
    assert report["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    ratios = report["ratios"]
    assert ratios["compression"] == ratios["size_vs_baseline"] == 1.0
    assert 0.5 < ratios["ram_vs_baseline"] < 2.0
    assert set(ratios) == {"compression", "size_vs_baseline", "ram_vs_baseline", "latency_vs_baseline"}
    assert report["inputs"] == {"input": [1, 3, 32, 32]}
    assert report["threads"] == 1 and report["loops"] == 3


def test_table_without_baseline(capsys):
    code, out, _ = run_benchmark_cli(capsys, f"--modelFile={RESNET}", *FAST, "--inputShape=input:2,3,32,32")
    assert code == 0
    for field in ("size", "peak RAM", "median latency", "input [2, 3, 32, 32]"):
        assert field in out
    assert "cosine" not in out


def test_quantized_against_float(tmp_path, capsys):
    cfg = parse_config("[common_quant_param]\nquant_type=DYNAMIC_QUANT\n", "t.cfg")
    quantized = save_model(convert(onnx.load(str(RESNET)), cfg).model, tmp_path / "q.onnx")
    code, out, _ = run_benchmark_cli(capsys, f"--modelFile={quantized}", f"--baselineFile={RESNET}", "--json", *FAST)
    report = json.loads(out)
    assert code == 0
    assert 0.99 < report["cosine"]["logits"] < 1.0


def test_data_files(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    data = tmp_path / "x.bin"
    x.tofile(data)
    code, out, _ = run_benchmark_cli(capsys, f"--modelFile={RESNET}", f"--inDataFile={data}", "--json", *FAST)
    assert code == 0
    assert json.loads(out)["input_source"] == f"files {data}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--modelFile=missing.onnx"], "model file not found"),
        ([f"--modelFile={RESNET}", "--inDataFile=a.bin,b.bin"], "got 2 file(s) for 1 model input(s)"),
        ([f"--modelFile={RESNET}", "--inputShape=image:1,3,32,32"], "has no input 'image'"),
        ([f"--modelFile={RESNET}", "--inputShape=input:1,3,30,32"], "got [1, 3, 30, 32]"),
        ([f"--modelFile={RESNET}", "--loopCount=0"], "--loopCount=0: expected an integer >= 1"),
    ],
)
def test_errors_are_one_sentence(capsys, args, message):
    code, _, err = run_benchmark_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_data_file_of_wrong_size(tmp_path, capsys):
    data = tmp_path / "short.bin"
    data.write_bytes(b"\0" * 100)
    code, _, err = run_benchmark_cli(capsys, f"--modelFile={RESNET}", f"--inDataFile={data}")
    assert code == 2 and "has 100 bytes" in err and "needs 12288" in err


def token_model(tmp_path: Path) -> Path:
    """A text-like model: int64 ids and mask with dynamic batch and sequence."""
    table = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((1000, 4)).astype(np.float32), "table"
    )
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["y"]),
    ]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table, axes],
    )
    path = tmp_path / "tokens.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_dynamic_sequence_needs_input_shape(tmp_path, capsys):
    path = token_model(tmp_path)
    code, _, err = run_benchmark_cli(capsys, f"--modelFile={path}")
    assert code == 2 and "--inputShape" in err and "input_ids" in err
    code, out, _ = run_benchmark_cli(
        capsys, f"--modelFile={path}", "--inputShape=input_ids:2,16;attention_mask:2,16", "--json", *FAST
    )
    assert code == 0 and json.loads(out)["inputs"]["attention_mask"] == [2, 16]


def test_random_token_inputs():
    specs = [
        InputSpec("input_ids", (2, 8), np.dtype(np.int64)),
        InputSpec("attention_mask", (2, 8), np.dtype(np.int64)),
        InputSpec("token_type_ids", (2, 8), np.dtype(np.int64)),
        InputSpec("pixels", (2, 3), np.dtype(np.float32)),
    ]
    (inputs,) = synthetic_inputs(specs, BENCHMARK_VALUES)
    assert np.all(inputs["attention_mask"] == 1) and np.all(inputs["token_type_ids"] == 0)
    assert inputs["input_ids"].min() >= 1 and inputs["input_ids"].max() < 1000
    assert inputs["pixels"].dtype == np.float32
    (again,) = synthetic_inputs(specs, BENCHMARK_VALUES)
    assert all(np.array_equal(inputs[k], again[k]) for k in inputs)


def test_api_with_given_arrays(tmp_path):
    path = token_model(tmp_path)
    ids = np.array([[5, 6, 7]], np.int64)
    report = benchmark(
        path,
        path,
        inputs={"input_ids": ids, "attention_mask": np.ones_like(ids)},
        loops=2,
        warmup=0,
        measure_memory=False,
    )
    assert report.cosine == {"y": 1.0} and report.input_source == "given arrays"


def test_cosine_edge_cases():
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine(np.zeros(3), np.ones(3)) == 0.0
    assert cosine(np.array([1.0, np.nan]), np.ones(2)) == 0.0
    assert cosine(np.array([1.0, 2.0]), np.array([-1.0, -2.0])) == pytest.approx(-1.0)

"""Debug reports measure the right tensors: on models whose nodes have no names, with Relu/Clip folded into the
Conv before them (FULL_QUANT), every Dequant row is checked against a direct measurement of that tensor."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import conv_model, depthwise_model, full_config, samples, session

from ptqlite import report
from ptqlite.convert import convert
from ptqlite.runtime import cosine_similarity, with_outputs


def _unnamed(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        node.name = ""
    return model


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _values(model: onnx.ModelProto, names: list[str], feeds: dict, fused: bool = True) -> dict[str, np.ndarray]:
    options = {} if fused else {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    s = session(with_outputs(model, names), **options)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds), strict=True))


@pytest.fixture(autouse=True)
def no_histograms(monkeypatch):
    monkeypatch.setattr(report, "HISTOGRAM_LAYERS", 0)


def _convert(model: onnx.ModelProto, folder, feeds, bias_correction: bool = True):
    config = full_config(bias_correction=bias_correction, common=f"debug_info_save_path={folder}")
    config = dataclasses.replace(config, full=dataclasses.replace(config.full, latency_aware=False))
    return convert(model, config, samples=feeds)


@pytest.mark.parametrize("build", [lambda: depthwise_model(relu6=True), lambda: depthwise_model(relu6=False),
                                   conv_model], ids=["clip", "relu", "residual"])
def test_unnamed_full_quant_rows_match_direct_measurement(tmp_path, build):
    feeds = samples((1, 4, 8, 8) if build is not conv_model else (1, 3, 16, 16), count=3)
    model = _unnamed(build())
    result = _convert(model, tmp_path, feeds)
    quant = result.model
    drops = [n for n in result.notes if "Relu/Clip folded" in n]
    if build is not conv_model:
        assert drops and not drops[0].split("), ")[1].startswith("0 ")  # the test needs a folded Relu/Clip
    produced = {o for n in quant.graph.node for o in n.output}
    rows = _rows(tmp_path / "round_1.csv")
    assert rows and all(r["NodeName"] for r in rows)
    weights = {r["TensorName"] for r in rows if r["TensorTypeFlag"] == "Weight"}
    assert weights == {q.tensor for q in result.quantized}
    activations = [r for r in rows if r["TensorTypeFlag"] == "Activation" and r["DataTypeFlag"] == "Dequant"
                   and r["InOutFlag"] == "Output"]
    assert activations
    # Direct: the float value against the output of the tensor's own DequantizeLinear (the rewrite's naming),
    # with QuantizeLinear/DequantizeLinear computed exactly as written.
    names = [r["TensorName"] for r in activations]
    twins = [f"{n}_dequantized" if f"{n}_dequantized" in produced else n for n in names]
    floats = _values(model, names, feeds[1])
    quants = _values(quant, twins, feeds[1], fused=False)
    for row, name, twin in zip(activations, names, twins, strict=True):
        direct = cosine_similarity(floats[name], quants[twin])
        assert abs(float(row["CosineSimilarity"]) - direct) < 1e-4, (name, row["CosineSimilarity"], direct)
        assert direct > 0.95, name  # 8-bit on these small models: no tensor is far off


def test_folded_clip_is_compared_after_its_quantizer(tmp_path):
    """The Clip's output is read through its DequantizeLinear, which clamps to [0, 6]: the row's range must too
    (compared with the Conv output before the Clip, it showed negative values and a cosine far below 1)."""
    feeds = samples((1, 4, 8, 8), count=2)
    _convert(_unnamed(depthwise_model(relu6=True)), tmp_path, feeds)
    rows = {(r["TensorName"], r["DataTypeFlag"]): r for r in _rows(tmp_path / "round_0.csv")}
    for clip in ("r1", "r2"):
        dequant = rows[clip, "Dequant"]
        assert dequant["NodeName"] == clip and dequant["NodeType"] == "Clip"
        assert float(dequant["Min"]) >= 0 and float(dequant["Max"]) <= 6.0 + 1e-6
        assert float(dequant["CosineSimilarity"]) > 0.99


@pytest.mark.parametrize("bias_correction", [True, False])
def test_full_quant_bias_correction_fills_correction_columns(tmp_path, bias_correction):
    """CorrectionMean is the per-channel shift bias correction added to the layer's output: the int32 bias of the
    quantized model minus the float bias, up to the bias's own rounding; CorrectionVar 1. Empty without it."""
    model = conv_model()
    result = _convert(model, tmp_path, samples((1, 3, 16, 16), count=4), bias_correction=bias_correction)
    rows = [r for r in _rows(tmp_path / "quant_param.csv") if r["TensorName"] == "w1"]
    assert len(rows) == 16  # one per output channel
    if not bias_correction:
        assert all(r["CorrectionMean"] == "" and r["CorrectionVar"] == "" for r in rows)
        return
    quant = result.model
    producer = {o: n for n in quant.graph.node for o in n.output}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quant.graph.initializer}
    conv = next(n for n in quant.graph.node if n.name == "conv1")
    dq = producer[conv.input[2]]
    bias = inits[dq.input[0]].astype(np.float64) * inits[dq.input[1]]
    float_bias = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b1"))
    correction = np.array([float(r["CorrectionMean"]) for r in rows])
    assert [r["CorrectionVar"] for r in rows] == ["1"] * 16
    assert np.abs(correction).max() > 0
    assert np.allclose(bias - float_bias, correction, atol=float(inits[dq.input[1]].max()))

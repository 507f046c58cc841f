"""The benchmark kit: ImageNet/CIFAR loaders, measurement helpers and the FULL_QUANT table's configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "bench"
sys.path.insert(0, str(ROOT / "bench"))

import datasets
import full_quant
import imagenet
import measure

from ptqlite.config import load_config
from ptqlite.data import calibration_set

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"benchmark data not found at {SHARED}")


def test_preprocess_matches_hand_computed_crop_and_scale(tmp_path: Path) -> None:
    # 5 rows x 6 columns, crop 2: offsets top=(5-2)//2=1, left=(6-2)//2=2 as ptqlite's center crop.
    rgb = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3) * 2
    path = tmp_path / "0007_n0.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    x = imagenet.preprocess(path, crop=2)
    expected = (rgb[1:3, 2:4].astype(np.float64) - 127.5) / 127.5
    assert x.shape == (3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), rtol=0, atol=1e-7)
    assert imagenet.label(path) == 7


def test_preprocess_rejects_undecodable_file(tmp_path: Path) -> None:
    path = tmp_path / "0001_n1.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode"):
        imagenet.preprocess(path)


@needs_shared
def test_imagenet_split_and_labels() -> None:
    names = imagenet.files()
    assert len(names) == 500 and names == sorted(names, key=lambda p: p.name)
    calibration = imagenet.calibration_files()
    assert len(calibration) == 100 and calibration == names[:100]
    x, y = imagenet.evaluation(3)
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert list(y) == [imagenet.label(p) for p in names[100:103]]
    assert all(0 <= label < 1000 for label in y)


@needs_shared
def test_cifar_calibration_pngs_hold_the_last_test_images() -> None:
    directory = full_quant.cifar_calibration_dir()
    pngs = sorted(directory.glob("*.png"))
    assert len(pngs) == 100
    data = np.load(SHARED / "cifar10" / "test2000_uint8_nhwc.npz")
    first = cv2.cvtColor(cv2.imread(str(pngs[0])), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(first, data["x"][1900])
    assert pngs[0].name == f"1900_{data['y'][1900]}.png"


@needs_shared
def test_cifar_config_normalisation_matches_the_evaluation_arrays() -> None:
    # ptqlite computes (pixel - mean) / std on 0..255; the evaluation arrays use [0, 1] with the same constants.
    config = {k: v for k, v in (line.split("=") for line in full_quant.CIFAR_CONFIG_LINES)}
    mean = np.array(json.loads(config["normalize_mean"]), np.float32)
    std = np.array(json.loads(config["normalize_std"]), np.float32)
    x, _ = datasets.cifar(2)
    raw = np.load(SHARED / "cifar10" / "test2000_uint8_nhwc.npz")["x"][:2].astype(np.float32)
    np.testing.assert_allclose(((raw - mean) / std).transpose(0, 3, 1, 2), x, atol=2e-5)


@pytest.mark.parametrize("bench", ["mobilenet_v2", "resnet20"])
def test_rendered_configs_parse(tmp_path: Path, bench: str) -> None:
    b = full_quant.BENCHES[bench]
    model = tmp_path / "m.onnx"
    onnx.save(_matmul_model(4, 1), model)
    for row in full_quant.rows():
        if row.kind != "ptqlite":
            continue
        if b.dataset == "cifar" and not SHARED.is_dir():
            pytest.skip("CIFAR calibration images come from ../shared/bench")
        config = load_config(full_quant.write_config(b, row, tmp_path, model, 100))
        if config.quant_type == "FULL_QUANT":
            assert config.data.calibrate_path[0][0] == "x" and config.data.calibrate_size == 100
            assert config.data.input_type == "IMAGE" and config.data.image_to_format == "RGB"
            if b.dataset == "imagenet":
                assert config.data.normalize_mean == (127.5,) * 3 and config.data.center_crop_width == 224
            assert config.full.per_channel == ("per_tensor" not in row.arg)
            assert config.full.activation_quant_method == ("KL" if "_kl_" in row.arg else "MAX_MIN")
            preset = next((t for t in ("NVGPU", "DSP", "ASCEND") if t.lower() in row.arg), "CPU")
            assert config.full.target_device == preset
        else:
            assert config.quant_type == "WEIGHT_QUANT"
            assert config.common.bit_num == (0 if "mixed" in row.arg else 8)


def test_run_child_reports_exit_code_and_own_peak_memory() -> None:
    big = measure.run_child([sys.executable, "-c", "import numpy as np; a = np.ones(25_000_000); print(a.sum())"])
    small = measure.run_child([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert big.returncode == 0 and big.stdout.strip() == "25000000.0"
    assert small.returncode == 3
    assert big.peak_mb >= 200 > small.peak_mb  # 25M float64 = 200 MB lives only in the first child
    assert big.seconds > 0


def test_run_child_reports_own_cpu_time() -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    busy = measure.run_child([sys.executable, "-c", spin])
    idle = measure.run_child([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert busy.cpu_seconds >= 0.5  # the spin loop alone burns 0.5 s of CPU
    assert idle.cpu_seconds < 0.4 < idle.seconds  # sleeping costs wall time, not CPU time


def _matmul_model(size: int, repeats: int) -> onnx.ModelProto:
    """x -> MatMul(w) repeated `repeats` times: more repeats, proportionally more work."""
    w = numpy_helper.from_array(np.full((size, size), 1.0 / size, np.float32), "w")
    nodes, name = [], "x"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [name, "w"], [f"y{i}"]))
        name = f"y{i}"
    nodes.append(helper.make_node("Identity", [name], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_latency_ratios_rank_more_work_as_slower(tmp_path: Path) -> None:
    light, heavy = tmp_path / "light.onnx", tmp_path / "heavy.onnx"
    onnx.save(_matmul_model(256, 1), light)
    onnx.save(_matmul_model(256, 24), heavy)
    feed = np.ones((1, 256), np.float32)
    ratios = measure.latency_ratios({"light": light, "heavy": heavy}, "light", feed, threads=1, rounds=7, runs=3)
    assert ratios["light"] == 1.0
    assert ratios["heavy"] > 2.0
    assert measure.file_mb(heavy) == pytest.approx(heavy.stat().st_size / 1e6)


def test_table_marks_missing_rows_and_compares_with_quantize_static(tmp_path: Path) -> None:
    model = tmp_path / "float.onnx"
    model.write_bytes(b"x" * 4_000_000)
    small = tmp_path / "q.onnx"
    small.write_bytes(b"x" * 1_000_000)
    rows = {r.key: r for r in full_quant.rows()}
    rows["float"].path, rows["float"].top1, rows["float"].latency = model, 80.0, {1: 1.0, 2: 1.0}
    rows["kl_pc"].status = "n/a (failed: out of memory)"
    for key, top1, seconds, peak in (("maxmin_pc", 79.75, 10.0, 100.0), ("ort_entropy", 79.0, 40.0, 800.0),
                                     ("ort_minmax", 78.0, 8.0, 200.0)):
        r = rows[key]
        r.path, r.top1, r.latency, r.seconds, r.peak_mb = small, top1, {1: 0.4, 2: 0.5}, seconds, peak
        r.cpu_seconds = seconds / 2
    rows["maxmin_pc"].ops = {"QLinearConv": 3, "QuantizeLinear": 1}
    text = full_quant.table(full_quant.BENCHES["mobilenet_v2"], list(rows.values()), 400, 100)
    assert "| ptqlite FULL_QUANT KL per-channel | n/a (failed: out of memory) |" in text
    assert ("| ptqlite FULL_QUANT MAX_MIN per-channel | 79.75 | +0.25 | - | 1.00 | 0.250 | 0.400 | 0.500 | 10.0 "
            "| 5.0 | 100 |") in text
    assert "- ptqlite FULL_QUANT MAX_MIN per-channel: 3 QLinearConv, 1 QuantizeLinear" in text
    assert ("- ptqlite FULL_QUANT MAX_MIN per-channel: drop +0.25, top-1 vs best quantize_static +0.75, "
            "1T latency vs quantize_static 1.00x, CPU time 1.25x and peak memory 0.50x of quantize_static MinMax, "
            "time 0.25x and peak memory 0.12x of quantize_static Entropy") in text


def test_a_bench_model_that_is_not_built_is_skipped_with_how_to_build_it(tmp_path: Path, monkeypatch) -> None:
    bench = full_quant.Bench("built", str(tmp_path / "absent.onnx"), "imagenet_tf", "python bench/build.py")
    monkeypatch.setitem(full_quant.BENCHES, "built", bench)
    monkeypatch.setattr(full_quant, "MODELS", tmp_path)
    out = tmp_path / "table.md"
    assert full_quant.main(["--model", "built", "--out", str(out)]) == 0
    assert f"built: skipped ({tmp_path / 'absent.onnx'} not found; build it with `python bench/build.py`)" in \
        out.read_text()
    assert bench.label_offset == 0 and "normalize_mean=[127,127,127]" in bench.config_lines()


def _input_model(name: str, shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", [name], ["y"])], "g",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@needs_shared
@pytest.mark.parametrize("bench", ["mobilenet_v2", "resnet20"])
def test_ptqlite_calibration_sees_exactly_the_bench_arrays(tmp_path: Path, bench: str) -> None:
    # The benchmark evaluates on what ptqlite calibrates on: the config's IMAGE preprocessing must reproduce
    # bench/imagenet.py bit for bit (and bench/datasets.py's CIFAR normalisation to float rounding).
    b = full_quant.BENCHES[bench]
    size = 32 if b.dataset == "cifar" else 224
    model = tmp_path / "m.onnx"
    onnx.save(_input_model("input", [1, 3, size, size]), model)
    row = next(r for r in full_quant.rows() if r.key == "maxmin_pc")
    config = load_config(full_quant.write_config(b, row, tmp_path, model, 100))
    samples = calibration_set(config, onnx.load(model))
    expected = b.calibration(3)
    for i in range(3):
        got = samples.sample(i)["input"]
        if b.dataset == "imagenet":
            np.testing.assert_array_equal(got, expected[i:i + 1])
        else:
            np.testing.assert_allclose(got, expected[i:i + 1], atol=2e-5)


def test_the_streaming_decoder_build_equals_the_in_memory_one(tmp_path: Path) -> None:
    """bench/llm_int4.py --stream-build writes each weight to the data file as it is made: same tensors, same
    outputs in ONNX Runtime, no temp files left."""
    import llm_int4
    import onnxruntime as ort

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    onnx.save_model(llm_int4.decoder(64, 2, 300, 128, 4), tmp_path / "a" / "float.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="float.onnx.data", size_threshold=1024)
    llm_int4.save_streamed(tmp_path / "b" / "float.onnx", 64, 2, 300, 128, 4)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["float.onnx", "float.onnx.data"]
    whole, streamed = (onnx.load(str(tmp_path / d / "float.onnx")) for d in "ab")
    assert [t.name for t in whole.graph.initializer] == [t.name for t in streamed.graph.initializer]
    for a, b in zip(whole.graph.initializer, streamed.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    onnx.checker.check_model(str(tmp_path / "b" / "float.onnx"), full_check=True)
    feed = {"input_ids": np.arange(5, dtype=np.int64)[None]}
    outputs = [ort.InferenceSession(str(tmp_path / d / "float.onnx"), providers=["CPUExecutionProvider"]).run(
        None, feed)[0] for d in "ab"]
    np.testing.assert_array_equal(outputs[0], outputs[1])

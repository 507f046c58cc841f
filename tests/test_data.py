"""Calibration data: validation errors, BIN files, and each image preprocessing step against hand-computed
values."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from helpers import EXAMPLES, RESNET20
from onnx import TensorProto, helper

from ptqlite.config import parse_config
from ptqlite.data import calibration_set, has_calibration_data
from ptqlite.errors import ConfigError, DataError


def make_model(*inputs: tuple[str, list, int]) -> onnx.ModelProto:
    """Identity per input: name, shape (ints or symbolic names), element type."""
    values = [helper.make_tensor_value_info(name, dtype, shape) for name, shape, dtype in inputs]
    outputs = [helper.make_tensor_value_info(f"{name}_out", dtype, None) for name, _, dtype in inputs]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    graph = helper.make_graph(nodes, "g", values, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def make_config(path: str, size: int = 1, input_type: str = "IMAGE", **keys: object) -> object:
    lines = ["[common_quant_param]", "quant_type=FULL_QUANT", "[data_preprocess_param]",
             f"calibrate_path={path}", f"calibrate_size={size}", f"input_type={input_type}"]
    lines += [f"{key}={value}" for key, value in keys.items()]
    return parse_config("\n".join(lines), source="test.cfg")


def write_png(path: Path, bgr: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), bgr)
    return path


def one_image(tmp_path: Path, bgr: np.ndarray, shape: list, dtype: int = TensorProto.FLOAT,
              input_format: str | None = None, **keys: object) -> np.ndarray:
    """Preprocess a single image for an input of `shape` and return the sample."""
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    write_png(folder / "0.png", bgr)
    config = make_config(f"x:{folder}", **keys)
    samples = list(calibration_set(config, make_model(("x", shape, dtype)), input_format))
    assert len(samples) == 1 and list(samples[0]) == ["x"]
    return samples[0]["x"]


# 2x3 BGR image with distinct channels
BGR = np.array([[[10, 20, 30], [40, 50, 60], [70, 80, 90]],
                [[0, 0, 255], [0, 255, 0], [255, 0, 0]]], np.uint8)


# ---------------------------------------------------------------- IMAGE preprocessing


def test_default_keeps_bgr_in_nhwc(tmp_path):
    x = one_image(tmp_path, BGR, [1, 2, 3, 3])
    assert x.dtype == np.float32 and x.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(x[0], BGR.astype(np.float32))


def test_rgb_conversion_and_nchw_layout(tmp_path):
    x = one_image(tmp_path, BGR, ["N", 3, 2, 3], image_to_format="RGB")
    assert x.shape == (1, 3, 2, 3)
    # channel 0 of NCHW is red: the third BGR component
    np.testing.assert_array_equal(x[0, 0], [[30, 60, 90], [255, 0, 0]])
    np.testing.assert_array_equal(x[0, 2], [[10, 40, 70], [0, 0, 255]])


def test_gray_conversion(tmp_path):
    x = one_image(tmp_path, BGR, [1, 1, 2, 3], image_to_format="GRAY")
    # Y = 0.299 R + 0.587 G + 0.114 B, rounded: pure red 76, green 150, blue 29
    np.testing.assert_array_equal(x[0, 0, 1], [76, 150, 29])
    assert x[0, 0, 0, 0] == round(0.299 * 30 + 0.587 * 20 + 0.114 * 10)


def test_normalisation(tmp_path):
    x = one_image(tmp_path, BGR, [1, 3, 2, 3], image_to_format="RGB",
                  normalize_mean="[10, 20, 30]", normalize_std="[2, 4, 5]")
    np.testing.assert_allclose(x[0, :, 0, 0], [(30 - 10) / 2, (20 - 20) / 4, (10 - 30) / 5])
    np.testing.assert_allclose(x[0, :, 1, 2], [(0 - 10) / 2, (0 - 20) / 4, (255 - 30) / 5])


def test_resize_linear_by_hand(tmp_path):
    row = np.zeros((1, 2, 3), np.uint8)
    row[0, 1] = 100
    x = one_image(tmp_path, row, [1, 1, 4, 3], resize_width=4, resize_height=1, resize_method="LINEAR")
    # pixel centres map to source x = -0.25, 0.25, 0.75, 1.25 (clamped at the borders)
    np.testing.assert_allclose(x[0, 0, :, 0], [0, 25, 75, 100])


def test_resize_nearest_by_hand(tmp_path):
    x = one_image(tmp_path, BGR, [1, 4, 6, 3], resize_width=6, resize_height=4, resize_method="NEAREST")
    np.testing.assert_array_equal(x[0], np.repeat(np.repeat(BGR, 2, axis=0), 2, axis=1))


@pytest.mark.parametrize("method, flag", [("LINEAR", cv2.INTER_LINEAR), ("NEAREST", cv2.INTER_NEAREST),
                                          ("CUBIC", cv2.INTER_CUBIC)])
def test_resize_matches_cv2_on_normalised_floats(tmp_path, method, flag):
    image = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    x = one_image(tmp_path, image, [1, 9, 4, 3], normalize_mean="[1, 2, 3]", normalize_std="[3, 2, 1]",
                  resize_width=4, resize_height=9, resize_method=method)
    normalised = (image.astype(np.float32) - np.float32([1, 2, 3])) / np.float32([3, 2, 1])
    np.testing.assert_array_equal(x[0], cv2.resize(normalised, (4, 9), interpolation=flag))


def test_gray_resize_keeps_a_channel_axis(tmp_path):
    x = one_image(tmp_path, BGR, [1, 4, 6, 1], image_to_format="GRAY", resize_width=6, resize_height=4,
                  resize_method="NEAREST")
    assert x.shape == (1, 4, 6, 1)


def test_center_crop_offsets(tmp_path):
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    x = one_image(tmp_path, image, [1, 2, 3, 3], center_crop_width=3, center_crop_height=2)
    # left = (7 - 3) // 2 = 2, top = (5 - 2) // 2 = 1
    np.testing.assert_array_equal(x[0], image[1:3, 2:5])


def test_center_crop_after_resize(tmp_path):
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    x = one_image(tmp_path, image, [1, 3, 3, 3], input_format="NHWC", resize_width=8, resize_height=8,
                  resize_method="NEAREST", center_crop_width=3, center_crop_height=3)
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(x[0], big[2:5, 2:5])


def test_center_crop_larger_than_image(tmp_path):
    with pytest.raises(DataError, match=r"0\.png: center crop 4x2 .* larger than the 3x2 image"):
        one_image(tmp_path, BGR, [1, 2, 4, 3], center_crop_width=4, center_crop_height=2)


def test_input_format_overrides_the_inferred_layout(tmp_path):
    # dim 1 is 3, which would read as NCHW; --inputDataFormat=NHWC says otherwise
    image = np.zeros((3, 3, 3), np.uint8)
    image[0, 1] = [1, 2, 3]
    x = one_image(tmp_path, image, [1, 3, 3, 3], input_format="NHWC")
    np.testing.assert_array_equal(x[0, 0, 1], [1, 2, 3])
    x = one_image(tmp_path, image, [1, 3, 3, 3])
    np.testing.assert_array_equal(x[0, :, 0, 1], [1, 2, 3])


def test_shape_mismatch_names_the_image_and_both_shapes(tmp_path):
    with pytest.raises(DataError, match=r"image 0\.png gives 1x3x2x3 .* input 'x' expects 1x3x32x32"):
        one_image(tmp_path, BGR, ["N", 3, 32, 32])


def test_symbolic_spatial_dims_take_the_image_size(tmp_path):
    x = one_image(tmp_path, BGR, ["N", 3, "H", "W"])
    assert x.shape == (1, 3, 2, 3)


def test_integer_input_gets_rounded_saturated_pixels(tmp_path):
    x = one_image(tmp_path, BGR, [1, 2, 3, 3], dtype=TensorProto.UINT8)
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], BGR)


def test_unreadable_image_is_named(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    write_png(folder / "a.png", BGR)
    (folder / "b.png").write_text("not an image")
    config = make_config(f"x:{folder}", size=2)
    samples = iter(calibration_set(config, make_model(("x", [1, 2, 3, 3], TensorProto.FLOAT))))
    next(samples)
    with pytest.raises(DataError, match=r"b\.png: not a readable image"):
        next(samples)


def test_bundled_resnet20_calibration_images():
    folder = EXAMPLES / "calib" / "input"
    config = make_config(f"input:{folder}", size=100, image_to_format="RGB",
                         normalize_mean="[123.675,116.28,103.53]", normalize_std="[58.395,57.12,57.375]")
    data = calibration_set(config, onnx.load(str(RESNET20)))
    assert len(data) == 100 and data.input_names == ("input",)
    first = next(iter(data))["input"]
    rgb = cv2.imread(str(folder / "1900_9.png"))[:, :, ::-1].astype(np.float32)
    expected = ((rgb - np.float32([123.675, 116.28, 103.53])) / np.float32([58.395, 57.12, 57.375]))
    expected = expected.transpose(2, 0, 1)[None]
    assert first.shape == (1, 3, 32, 32) and first.dtype == np.float32
    np.testing.assert_allclose(first, expected, rtol=1e-6)
    # iterating again gives the same data, in file-name order
    count = 0
    for again, sample in zip(data, data):
        np.testing.assert_array_equal(again["input"], sample["input"])
        count += 1
    assert count == 100
    assert data.files(99)["input"].name == "1999_9.png"


# ---------------------------------------------------------------- BIN files


def test_bin_round_trip_and_lazy_read(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    arrays = [np.arange(6, dtype=np.int64).reshape(1, 2, 3) * k for k in range(3)]
    for k, a in enumerate(arrays):
        a.astype("<i8").tofile(folder / f"{k}.bin")
    model = make_model(("ids", ["batch", 2, 3], TensorProto.INT64))
    data = calibration_set(make_config(f"ids:{folder}", size=3, input_type="BIN"), model)
    samples = [s["ids"] for s in data]
    for got, want in zip(samples, arrays):
        assert got.dtype == np.int64 and got.shape == (1, 2, 3)
        np.testing.assert_array_equal(got, want)
    # files are read while iterating, not when the set is made
    (arrays[0] + 7).astype("<i8").tofile(folder / "0.bin")
    np.testing.assert_array_equal(next(iter(data))["ids"], arrays[0] + 7)


def test_files_sorted_bytewise_and_hidden_files_ignored(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, value in (("b.bin", 1), ("B.bin", 2), ("a.bin", 3), (".hidden", 4)):
        np.full(4, value, np.float32).tofile(folder / name)
    (folder / "sub").mkdir()
    model = make_model(("x", [1, 4], TensorProto.FLOAT))
    data = calibration_set(make_config(f"x:{folder}", size=3, input_type="BIN"), model)
    assert [float(s["x"][0, 0]) for s in data] == [2, 3, 1]  # B < a < b byte-wise


def test_bin_size_error_names_file_and_sizes(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    np.zeros(12, np.float32).tofile(folder / "0.bin")
    np.zeros(11, np.float32).tofile(folder / "1.bin")
    model = make_model(("x", [1, 3, 2, 2], TensorProto.FLOAT))
    with pytest.raises(DataError, match=r"1\.bin: .*has 44 bytes, expected 48"):
        calibration_set(make_config(f"x:{folder}", size=2, input_type="BIN"), model)


def test_bin_symbolic_dim_asks_for_input_shape(tmp_path):
    (tmp_path / "0.bin").write_bytes(b"\0" * 8)
    model = make_model(("x", ["N", "L"], TensorProto.FLOAT))
    with pytest.raises(DataError, match="--inputShape"):
        calibration_set(make_config(f"x:{tmp_path}", input_type="BIN"), model)


def test_two_inputs_each_from_its_own_directory(tmp_path):
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        np.full((1, 2), value, np.float32).tofile(tmp_path / name / "0.bin")
    model = make_model(("a", [1, 2], TensorProto.FLOAT), ("b", [1, 2], TensorProto.FLOAT))
    config = make_config(f"b:{tmp_path / 'b'},a:{tmp_path / 'a'}", input_type="BIN")
    data = calibration_set(config, model)
    assert data.input_names == ("a", "b")
    sample = next(iter(data))
    assert sample["a"][0, 0] == 1.0 and sample["b"][0, 0] == 2.0


# ---------------------------------------------------------------- validation


def test_missing_directory(tmp_path):
    model = make_model(("x", [1, 4], TensorProto.FLOAT))
    with pytest.raises(DataError, match="directory '.*nowhere' for input 'x' does not exist"):
        calibration_set(make_config(f"x:{tmp_path / 'nowhere'}", input_type="BIN"), model)


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"")
    model = make_model(("x", [1, 4], TensorProto.FLOAT))
    with pytest.raises(DataError, match="'.*x.bin' for input 'x' is not a directory"):
        calibration_set(make_config(f"x:{tmp_path / 'x.bin'}", input_type="BIN"), model)


def test_relative_directory_resolves_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "rel").mkdir()
    np.zeros(4, np.float32).tofile(tmp_path / "rel" / "0.bin")
    monkeypatch.chdir(tmp_path)
    data = calibration_set(make_config("x:rel", input_type="BIN"), make_model(("x", [1, 4], TensorProto.FLOAT)))
    assert data.files(0)["x"] == tmp_path / "rel" / "0.bin"


def test_too_few_files(tmp_path):
    np.zeros(4, np.float32).tofile(tmp_path / "0.bin")
    model = make_model(("x", [1, 4], TensorProto.FLOAT))
    with pytest.raises(DataError, match=rf"calibrate_size=5 but only 1 file\(s\) were found in {tmp_path}"):
        calibration_set(make_config(f"x:{tmp_path}", size=5, input_type="BIN"), model)


def test_wrong_input_name_lists_the_real_ones(tmp_path):
    model = make_model(("input", [1, 4], TensorProto.FLOAT), ("mask", [1, 4], TensorProto.FLOAT))
    config = make_config(f"image:{tmp_path},input:{tmp_path}", input_type="BIN")
    with pytest.raises(ConfigError, match="names 'image' which the model does not have; its inputs are "
                                          "'input', 'mask'"):
        calibration_set(config, model)


def test_model_input_without_directory(tmp_path):
    model = make_model(("input", [1, 4], TensorProto.FLOAT), ("mask", [1, 4], TensorProto.FLOAT))
    with pytest.raises(ConfigError, match="no directory for model input\\(s\\) 'mask'"):
        calibration_set(make_config(f"input:{tmp_path}", input_type="BIN"), model)


def test_has_calibration_data(tmp_path):
    assert has_calibration_data(make_config(f"x:{tmp_path}"))
    assert not has_calibration_data(parse_config("[common_quant_param]\nquant_type=WEIGHT_QUANT\n"))

"""Debug report statistics of 8-bit dequantized tensors read from their codes (histogram, no sort): the same
Min/Q1/Median/Q3/Max elements, zero count, clip and histogram as the sorted tensor, Mean/Var/cosine to float64's
last bits; the levels equal onnxruntime's DequantizeLinear bit for bit; reports with and without codes agree."""

from __future__ import annotations

import csv

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ptqlite import report
from ptqlite.convert import convert
from ptqlite.report import CodeLevels, Scratch, code_histogram


def _codes(rng: np.random.Generator, size: int, kind: str, zero_point: int, dtype) -> np.ndarray:
    """Codes as a quantized tensor holds them: uniform, or ReLU-like (most at the zero point, a tail above it,
    some at the top code), or a few distinct codes only."""
    info = np.iinfo(dtype)
    if kind == "uniform":
        codes = rng.integers(info.min, info.max + 1, size)
    elif kind == "relu":
        codes = np.where(rng.random(size) < rng.uniform(0.2, 0.9), zero_point,
                         zero_point + np.abs(rng.normal(0, 30, size)).astype(np.int64))
        codes[rng.random(size) < 0.02] = info.max
    else:
        codes = rng.choice(rng.integers(info.min, info.max + 1, 3), size)
    return np.clip(codes, info.min, info.max).astype(dtype)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 5000), kind=st.sampled_from(["uniform", "relu", "few"]),
       signed=st.booleans())
def test_levels_give_the_statistics_of_the_sorted_tensor(seed, size, kind, signed):
    rng = np.random.default_rng(seed)
    dtype = np.int8 if signed else np.uint8
    zero_point = int(rng.integers(-128, 128) if signed else rng.integers(0, 256))
    scale = np.float32(rng.uniform(1e-4, 0.5))
    levels = CodeLevels.of(np.array(scale, np.float32), np.array(zero_point, dtype))
    codes = _codes(rng, size, kind, zero_point, dtype)
    dequant = levels.decode(codes)
    assert np.array_equal(dequant, (codes.astype(np.float32) - zero_point) * scale)  # what DequantizeLinear computes
    origin = (dequant + rng.normal(0, scale, size)).astype(np.float32)  # the float tensor it approximates

    from_codes, sorted_ = report._Levels(dequant, codes, levels), report._Flat(dequant)
    got, want = from_codes.stats(), sorted_.stats()
    assert got[:5] == want[:5]  # Min, Q1, Median, Q3, Max: the same elements
    assert got[7] == want[7] == np.mean(dequant == 0)  # Sparsity
    np.testing.assert_allclose(got[5:7], want[5:7], rtol=1e-12, atol=1e-15)  # Mean, Var (std): summed otherwise
    np.testing.assert_allclose(got[5:7], (dequant.astype(np.float64).mean(), dequant.astype(np.float64).std()),
                               rtol=1e-12, atol=1e-15)
    assert from_codes.bounds() == sorted_.bounds()
    np.testing.assert_allclose(from_codes.norm2(), np.sum(dequant.astype(np.float64) ** 2), rtol=1e-13)

    flat_origin = report._Flat(origin)
    assert flat_origin.clip(from_codes) == flat_origin.clip(sorted_) == report.clip_rate(origin, dequant)
    np.testing.assert_allclose(flat_origin.cosine(from_codes), flat_origin.cosine(sorted_), rtol=1e-13)
    for got_part, want_part in zip(flat_origin.histogram(from_codes), flat_origin.histogram(sorted_), strict=True):
        assert np.array_equal(got_part, want_part)


@pytest.mark.parametrize("size", [1, 2, 3, 1000, (1 << 17) - 1, 1 << 17, (1 << 17) + 1, 300_001])
def test_code_histogram_counts_every_code(size):
    rng = np.random.default_rng(size)
    codes = rng.integers(0, 256, size).astype(np.uint8)
    codes[: size // 2] = 7  # a long run of one code
    expected = np.bincount(codes, minlength=256)
    assert np.array_equal(code_histogram(codes), expected)
    scratch = Scratch()
    assert np.array_equal(code_histogram(codes, scratch), expected)
    assert np.array_equal(code_histogram(codes[: size // 3 * 2], scratch), np.bincount(codes[: size // 3 * 2],
                                                                                     minlength=256))


@pytest.mark.parametrize("dtype,zero_point", [(np.uint8, 0), (np.uint8, 131), (np.int8, 0), (np.int8, -7)])
@pytest.mark.parametrize("scale", [1e-8, 0.0039215689, 0.5, 3.7])
def test_levels_equal_onnxruntime_dequantize_linear(dtype, zero_point, scale):
    onnx_type = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
    node = helper.make_node("DequantizeLinear", ["codes", "scale", "zp"], ["y"])
    graph = helper.make_graph([node], "dq", [helper.make_tensor_value_info("codes", onnx_type, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])],
                              [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
                               numpy_helper.from_array(np.array(zero_point, dtype), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    codes = np.arange(256, dtype=np.uint8).view(dtype)
    runtime = session.run(None, {"codes": codes})[0]
    levels = CodeLevels.of(np.array(scale, np.float32), np.array(zero_point, dtype))
    assert np.array_equal(levels.decode(codes).view(np.uint32), runtime.view(np.uint32))
    assert np.all(np.diff(levels.values) > 0)  # ascending


def test_levels_only_for_per_tensor_8_bit_quantizers():
    assert CodeLevels.of(np.array([0.1, 0.2], np.float32), np.array([0, 0], np.uint8)) is None  # per channel
    assert CodeLevels.of(np.array(0.1, np.float16), np.array(0, np.uint8)) is None
    assert CodeLevels.of(np.array(0.1, np.float32), np.array(0, np.int32)) is None
    assert CodeLevels.of(np.array(np.inf, np.float32), np.array(0, np.uint8)) is None


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_reports_from_codes_equal_the_sorted_ones(tmp_path, monkeypatch):
    """FULL_QUANT on a Conv-Relu model: every activation has codes; the round files with them equal those without
    (quartiles to the character, Mean/Var/cosines to float64's last bits)."""
    from helpers import conv_model, full_config, samples

    model, feeds = conv_model(), samples((1, 3, 16, 16), count=3)
    quant = convert(model, full_config(), samples=feeds, progress=False).model
    small = [report._Entry("", "", name, "Output", "Activation", name) for name in
             (n.output[0] for n in quant.graph.node if n.op_type == "DequantizeLinear")]
    report._find_codes(quant, small)
    assert small and all(e.levels is None for e in small)  # tensors this small are sorted (_CODED_VALUES)
    monkeypatch.setattr(report, "_CODED_VALUES", 1)
    found = []
    real_find = report._find_codes

    def record(quant_model, entries):
        real_find(quant_model, entries)
        found.extend(e for e in entries if e.levels is not None)

    monkeypatch.setattr(report, "_find_codes", record)
    convert(model, full_config(common=f"debug_info_save_path={tmp_path / 'codes'}\n"), samples=feeds, progress=False)
    # round 0 read and confirmed every entry's codes
    assert found and all(e.levels is not None and e.levels_checked for e in found)
    monkeypatch.setattr(report, "_find_codes", lambda quant_model, entries: None)
    convert(model, full_config(common=f"debug_info_save_path={tmp_path / 'sorted'}\n"), samples=feeds, progress=False)
    for index in range(3):
        with_codes, without = (_rows(tmp_path / name / f"round_{index}.csv") for name in ("codes", "sorted"))
        assert len(with_codes) == len(without) > 2
        for got, want in zip(with_codes, without, strict=True):
            assert got[:11] == want[:11] and got[13:15] == want[13:15] and got[16:] == want[16:]
            if got[4] != "DataTypeFlag":
                np.testing.assert_allclose([float(v) for v in got[11:13] + got[15:17]],
                                           [float(v) for v in want[11:13] + want[15:17]], rtol=1e-8, atol=1e-12)


def test_codes_that_do_not_decode_to_the_tensor_are_dropped(tmp_path, monkeypatch):
    """Round 0 checks the codes against the runtime's dequantized tensor; a mismatch (here: levels off by one
    code) drops them and the rows come from the sorted tensor."""
    from helpers import conv_model, full_config, samples

    model, feeds = conv_model(), samples((1, 3, 16, 16), count=2)
    monkeypatch.setattr(report, "_CODED_VALUES", 1)
    real_of = CodeLevels.of

    def shifted(scale, zero_point):
        levels = real_of(scale, zero_point)
        return None if levels is None else CodeLevels(levels.order, levels.values + levels.values[1])

    monkeypatch.setattr(CodeLevels, "of", staticmethod(shifted))
    convert(model, full_config(common=f"debug_info_save_path={tmp_path / 'shifted'}\n"), samples=feeds,
            progress=False)
    monkeypatch.setattr(report, "_find_codes", lambda quant_model, entries: None)
    convert(model, full_config(common=f"debug_info_save_path={tmp_path / 'sorted'}\n"), samples=feeds, progress=False)
    for index in range(2):
        assert (_rows(tmp_path / "shifted" / f"round_{index}.csv") == _rows(tmp_path / "sorted" / f"round_{index}.csv"))


def test_variance_of_a_tensor_with_a_large_mean_is_centred():
    """The one-pass variance (sum of squares) is used only where it is as accurate as the centred one."""
    rng = np.random.default_rng(5)
    for offset in (0.0, 0.5, 1e4):
        x = (offset + rng.normal(0, 1e-2 if offset > 1 else 1, 10_000)).astype(np.float32)
        std = report._Flat(x).stats()[6]
        np.testing.assert_allclose(std, x.astype(np.float64).std(), rtol=1e-12)


def test_a_local_tensor_with_nan_counts_as_not_finite():
    origin = report._Flat(np.ones(4, np.float32))
    local = report._Flat(np.array([1, np.nan, 1, 1], np.float32), sums=False)
    assert not local.finite and origin.cosine(local) == 0.0
    assert origin.cosine(report._Flat(np.full(4, 2, np.float32), sums=False)) == 1.0

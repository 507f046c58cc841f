"""Debug reports: exact CSV layout, statistics checked against hand-computed numbers, and the convert() hook."""

from __future__ import annotations

import csv
import dataclasses
import sys
import types

import numpy as np
import onnx
import pytest
from helpers import EXAMPLES, RESNET20
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from ptqlite import report
from ptqlite.config import load_config, parse_config
from ptqlite.convert import convert
from ptqlite.errors import ConfigError
from ptqlite.report import (
    LOCAL_HEADER,
    PARAM_HEADER,
    ROUND_HEADER,
    SUMMARY_HEADER,
    clip_rate,
    tensor_stats,
    write_reports,
)
from ptqlite.result import ConversionResult, QuantizedTensor
from ptqlite.runtime import cosine_similarity

W = np.array([[0, 0], [1, 2], [3, 4], [-1, 5]], dtype=np.float32)
W_HAT = np.array([[0, 0], [1, 2], [3, 4], [0, 4]], dtype=np.float32)  # -1 and 5 clipped to the range [0, 4]


def _tiny(weight: np.ndarray) -> onnx.ModelProto:
    """x[1,4] -> MatMul(W[4,2]) -> h -> Relu -> y."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="act")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _result(model: onnx.ModelProto, **params) -> ConversionResult:
    result = ConversionResult(model, "WEIGHT_QUANT")
    result.quantized.append(QuantizedTensor("W", "MatMul", ("mm",), (4, 2), 3, "asymmetric per-channel axis 1",
                                            "packed", 32, 3, 0.1, **params))
    return result


def _rows(path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("debug")
    quant = _tiny(W_HAT)
    result = _result(quant, scale=np.array([0.5, 0.25]), zero_point=np.array([-3, 1]),
                     correction_var=np.array([1.0, 1.5]), correction_mean=np.array([0.0, -0.125]))
    feeds = [{"x": np.ones((1, 4), np.float32)}, {"x": np.array([[0, 0, 1, 1]], np.float32)}]
    rep = write_reports(folder, _tiny(W), quant, result, feeds, notes=["a note"])
    return folder, rep


def test_files_and_exact_headers(tiny_report):
    folder, rep = tiny_report
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["notes.txt", "output_summary.csv", "quant_param.csv", "report.html", "round_0.csv",
                     "round_1.csv"]
    assert rep.rounds == 2
    assert tuple(_rows(folder / "output_summary.csv")[0]) == SUMMARY_HEADER
    assert tuple(_rows(folder / "round_0.csv")[0]) == ROUND_HEADER + LOCAL_HEADER  # the reference's columns first
    assert tuple(_rows(folder / "quant_param.csv")[0]) == PARAM_HEADER
    assert ",".join(ROUND_HEADER) == ("NodeName,NodeType,TensorName,InOutFlag,DataTypeFlag,TensorTypeFlag,Min,Q1,"
                                      "Median,Q3,Max,Mean,Var,Sparsity,Clip,CosineSimilarity")
    assert LOCAL_HEADER == ("LocalCosineSimilarity", "LocalNodeName")
    assert ",".join(PARAM_HEADER) == ("NodeName,NodeType,TensorName,ElementsNum,Dims,Scale,ZeroPoint,Bits,"
                                      "CorrectionVar,CorrectionMean")


def test_one_origin_dequant_pair_per_tensor(tiny_report):
    folder, _ = tiny_report
    rows = _rows(folder / "round_1.csv")[1:]
    assert [(r[0], r[2], r[3], r[4], r[5]) for r in rows] == [
        ("mm", "x", "Input", "Origin", "Activation"), ("mm", "x", "Input", "Dequant", "Activation"),
        ("mm", "W", "Input", "Origin", "Weight"), ("mm", "W", "Input", "Dequant", "Weight"),
        ("mm", "h", "Output", "Origin", "Activation"), ("mm", "h", "Output", "Dequant", "Activation"),
        ("act", "y", "Output", "Origin", "Activation"), ("act", "y", "Output", "Dequant", "Activation"),
    ]
    for origin in rows[::2]:  # Origin rows: Clip 0, cosine 1
        assert (float(origin[14]), float(origin[15])) == (0.0, 1.0)


def test_weight_row_values_by_hand(tiny_report):
    folder, _ = tiny_report
    rows = {(r[2], r[4]): [float(v) for v in r[6:16]] for r in _rows(folder / "round_0.csv")[1:]}
    # origin sorted: -1 0 0 1 2 3 4 5; quartile positions 1.75, 3.5, 5.25 between order statistics
    origin = rows["W", "Origin"]
    assert origin[:5] == [-1.0, 0.0, 1.5, 3.25, 5.0]
    assert origin[5] == 1.75  # mean 14/8
    assert origin[6] == pytest.approx(np.sqrt(56 / 8 - 1.75**2))  # population std, reported as Var
    assert origin[7] == 0.25  # two exact zeros of eight
    dequant = rows["W", "Dequant"]
    assert dequant[:5] == [0.0, 0.0, 1.5, 3.25, 4.0]
    assert dequant[7] == 0.375  # three zeros
    assert dequant[8] == 0.25  # -1 and 5 lie outside [0, 4]
    assert dequant[9] == pytest.approx(50 / np.sqrt(56 * 46), abs=1e-8)  # dot 1+4+9+16+20


def test_activation_rows_and_summary_by_hand(tiny_report):
    folder, _ = tiny_report
    rows = {(r[2], r[4]): [float(v) for v in r[6:16]] for r in _rows(folder / "round_0.csv")[1:]}
    # x = ones: h = column sums = [3, 11] in float, [4, 10] quantized
    assert rows["h", "Origin"][:5] == [3.0, 5.0, 7.0, 9.0, 11.0]
    assert rows["h", "Dequant"][:5] == [4.0, 5.5, 7.0, 8.5, 10.0]
    assert rows["h", "Dequant"][8] == 1.0  # 3 and 11 both lie outside [4, 10]
    expected = 122 / np.sqrt(130 * 116)
    assert rows["h", "Dequant"][9] == pytest.approx(expected, abs=1e-8)
    assert rows["x", "Dequant"][9] == 1.0 and rows["x", "Dequant"][8] == 0.0
    summary = _rows(folder / "output_summary.csv")[1:]
    assert [r[:2] for r in summary] == [["0", "y"], ["1", "y"]]
    assert float(summary[0][2]) == pytest.approx(expected, abs=1e-8)
    # x = [0,0,1,1]: h = [2, 9] float, [3, 8] quantized, both positive so y = h
    assert float(summary[1][2]) == pytest.approx(78 / np.sqrt(85 * 73), abs=1e-8)


def test_quant_param_one_row_per_channel(tiny_report):
    folder, _ = tiny_report
    rows = _rows(folder / "quant_param.csv")[1:]
    assert rows == [["mm", "MatMul", "W", "8", "[4 2]", "0.5", "-3", "3", "1", "0"],
                    ["mm", "MatMul", "W", "8", "[4 2]", "0.25", "1", "3", "1.5", "-0.125"]]


def test_quant_param_writes_what_is_there(tmp_path):
    model = _tiny(W)
    result = _result(model, scale=np.array([0.5]))  # per-tensor, no zero point or corrections recorded
    result.quantized.append(QuantizedTensor("W", "MatMul", ("mm",), (4, 2), 4, "mixed", "indexed", 32, 3, 0.1))
    write_reports(tmp_path, model, model, result, [{"x": np.ones((1, 4), np.float32)}])
    rows = _rows(tmp_path / "quant_param.csv")[1:]
    assert rows == [["mm", "MatMul", "W", "8", "[4 2]", "0.5", "", "3", "", ""],
                    ["mm", "MatMul", "W", "8", "[4 2]", "", "", "4", "", ""]]


def test_html_has_sortable_table_and_plan(tiny_report):
    folder, _ = tiny_report
    text = (folder / "report.html").read_text()
    assert "function sortTable" in text and 'onclick="sortTable(this)"' in text
    assert "asymmetric per-channel axis 1" in text and "packed" in text and "a note" in text
    assert text.count("<svg") == 1 + 4  # the cosine plot, a histogram of each of x, W, h, y
    assert "skip_quant_node=mm" in text and "ptqlite analyze" in text


def test_local_error_is_the_node_alone(tiny_report):
    """h = x @ W is the only quantized node: its local value is its accumulated one; the Relu after it reads the
    float h when run alone, so its local cosine is exactly 1 while its accumulated one carries W's error."""
    folder, _ = tiny_report
    for name in ("round_0.csv", "round_1.csv"):
        rows = {(r[2], r[4]): r for r in _rows(folder / name)[1:]}
        assert rows["h", "Dequant"][16] == rows["h", "Dequant"][15] and rows["h", "Dequant"][17] == "mm"
        assert float(rows["y", "Dequant"][16]) == 1.0 and float(rows["y", "Dequant"][15]) < 0.999
        assert rows["W", "Dequant"][16] == rows["W", "Dequant"][15]  # a weight reads the same alone
        assert all(rows[key][16] == "1" for key in rows if key[1] == "Origin")


def test_reports_are_deterministic(tmp_path):
    quant = _tiny(W_HAT)
    feeds = [{"x": np.ones((1, 4), np.float32)}]
    for name in ("a", "b"):
        write_reports(tmp_path / name, _tiny(W), quant, _result(quant, scale=np.array([0.5, 0.25])), feeds)
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_stale_rounds_are_removed_and_bad_folder_is_a_config_error(tmp_path):
    (tmp_path / "round_7.csv").write_text("old")
    (tmp_path / "round_notes.csv").write_text("kept: not a round file")
    model = _tiny(W)
    write_reports(tmp_path, model, model, _result(model), [{"x": np.ones((1, 4), np.float32)}])
    assert not (tmp_path / "round_7.csv").exists() and (tmp_path / "round_notes.csv").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="debug_info_save_path="):
        write_reports(blocker / "debug", model, model, _result(model), [])


def test_qdq_graph_compares_what_the_consumer_reads(tmp_path):
    """Activations quantized by a QuantizeLinear/DequantizeLinear pair are compared after the pair."""
    float_model = _tiny(W)
    quant = _tiny(W)
    graph = quant.graph
    del graph.node[1:]
    graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                              numpy_helper.from_array(np.array(0, np.int8), "z")])
    graph.node.extend([helper.make_node("QuantizeLinear", ["h", "s", "z"], ["h_q"], name="q"),
                       helper.make_node("DequantizeLinear", ["h_q", "s", "z"], ["h_dq"], name="dq"),
                       helper.make_node("Relu", ["h_dq"], ["y"], name="act")])
    # x = [0.6, 0.3, 0, 0]: h = [0.3, 0.6] float; the int8 step of 1.0 rounds it to [0, 1]
    write_reports(tmp_path, float_model, quant, ConversionResult(quant, "FULL_QUANT"),
                  [{"x": np.array([[0.6, 0.3, 0, 0], ], np.float32)}])
    rows = {(r[2], r[4]): r for r in _rows(tmp_path / "round_0.csv")[1:]}
    assert float(rows["h", "Dequant"][6]) == 0.0 and float(rows["h", "Dequant"][10]) == 1.0
    assert float(rows["h", "Dequant"][13]) == 0.5  # one exact zero of two


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([0, 0, 0], [0, 0, 0], 1.0),
    ([0, 0, 0], [1, 2, 3], 0.0),
    ([1, 2, 3], [0, 0, 0], 0.0),
    ([1, np.nan, 3], [1, 2, 3], 0.0),
    ([1, 2, 3], [1, np.inf, 3], 0.0),
    ([1, 0], [0, 1], 0.0),
    ([1, 2], [-1, -2], -1.0),
    ([3, 4], [4, 3], 24 / 25),
])
def test_cosine_edge_cases(a, b, expected):
    assert cosine_similarity(np.array(a, np.float32), np.array(b, np.float32)) == pytest.approx(expected)


def test_stats_edge_cases():
    nan_stats = tensor_stats(np.array([1.0, np.nan]))
    assert np.isnan(nan_stats[0]) and np.isnan(nan_stats[5])
    assert tensor_stats(np.zeros(5))[7] == 1.0
    assert clip_rate(np.array([-1.0, 0.0, 1.0, 2.0]), np.array([0.0, 1.0])) == 0.5


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=finite), st.floats(0.01, 100))
def test_cosine_properties(x, factor):
    y = (x * np.float32(factor)).astype(np.float32)
    cos = cosine_similarity(x, y)
    assert -1.0 <= cos <= 1.0
    assert cos == pytest.approx(1.0, abs=1e-6) or not np.any(x)
    assert cosine_similarity(x, -y) == pytest.approx(-cos, abs=1e-12) or not np.any(x)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 64), elements=finite), arrays(np.float32, 8, elements=finite))
def test_stats_properties(origin, dequant):
    stats = tensor_stats(origin)
    assert stats[0] <= stats[1] <= stats[2] <= stats[3] <= stats[4]
    assert stats[0] == float(origin.min()) and stats[4] == float(origin.max())
    assert 0.0 <= stats[7] <= 1.0
    clip = clip_rate(origin, dequant)
    inside = (origin >= dequant.min()) & (origin <= dequant.max())
    assert clip == pytest.approx(1.0 - inside.mean())
    assert clip_rate(origin, origin) == 0.0


# ---------------------------------------------------------------- through convert()


def _with_debug(config, folder):
    return dataclasses.replace(config, common=dataclasses.replace(config.common, debug_info_save_path=str(folder)))


@pytest.fixture
def no_histograms(monkeypatch):
    monkeypatch.setattr(report, "HISTOGRAM_LAYERS", 0)  # rendering is tested on the tiny graph; keep these fast


def test_resnet20_weight_quant_writes_all_files(tmp_path, no_histograms):
    config = _with_debug(load_config(EXAMPLES / "configs" / "fixed_bit_weight_quant.cfg"), tmp_path / "dbg")
    model = onnx.load(RESNET20)
    result = convert(model, config)
    folder = tmp_path / "dbg"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "output_summary.csv", "quant_param.csv",
                                                        "report.html", "round_0.csv"]
    assert any("synthetic" in n for n in result.notes)
    assert "synthetic" in (folder / "notes.txt").read_text()
    rows = _rows(folder / "round_0.csv")[1:]
    weights = [r[2] for r in rows if r[5] == "Weight" and r[4] == "Dequant"]
    assert weights == [q.tensor for q in result.quantized]  # graph order matches the plan's order here
    assert len(rows) % 2 == 0
    assert [r[4] for r in rows] == ["Origin", "Dequant"] * (len(rows) // 2)
    assert len({r[2] for r in rows}) == len(rows) // 2  # each tensor once
    for r in rows:
        if r[4] == "Dequant":
            assert 0.99 < float(r[15]) <= 1.0, r[2]  # 8-bit weights barely move anything
    summary = _rows(folder / "output_summary.csv")
    assert summary[1][:2] == ["0", "logits"] and float(summary[1][2]) > 0.999
    params = _rows(folder / "quant_param.csv")[1:]
    channels = {q.tensor: q.scale.size for q in result.quantized}
    assert len(params) == sum(channels.values())


def test_calibration_samples_give_one_round_each(tmp_path, monkeypatch, no_histograms):
    """With calibration data every sample is a round (stand-in data module with the agreed interface)."""
    rng = np.random.default_rng(1)
    samples = [{"input": rng.normal(size=(1, 3, 32, 32)).astype(np.float32)} for _ in range(3)]
    stand_in = types.ModuleType("ptqlite.data")
    stand_in.has_calibration_data = lambda config: True
    stand_in.calibration_set = lambda config, model, input_format=None: samples
    monkeypatch.setitem(sys.modules, "ptqlite.data", stand_in)
    config = _with_debug(load_config(EXAMPLES / "configs" / "packed_4bit_weight_quant.cfg"), tmp_path)
    result = convert(onnx.load(RESNET20), config)
    assert not any("synthetic" in n for n in result.notes)
    assert [r[0] for r in _rows(tmp_path / "output_summary.csv")[1:]] == ["0", "1", "2"]
    assert all((tmp_path / f"round_{i}.csv").exists() for i in range(3))
    assert not (tmp_path / "round_3.csv").exists()


def test_samples_given_to_convert_are_the_rounds(tmp_path, no_histograms):
    rng = np.random.default_rng(2)
    samples = [{"input": rng.normal(size=(1, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    config = _with_debug(load_config(EXAMPLES / "configs" / "fixed_bit_weight_quant.cfg"), tmp_path)
    result = convert(onnx.load(RESNET20), config, samples=samples)
    assert not any("synthetic" in n for n in result.notes)
    assert [r[0] for r in _rows(tmp_path / "output_summary.csv")[1:]] == ["0", "1"]


def test_synthetic_input_is_seeded_uniform():
    model = _tiny(W)
    config = parse_config("[common_quant_param]\nquant_type=WEIGHT_QUANT\n")
    notes: list[str] = []
    (first,), (second,) = report.report_inputs(model, config, notes=notes), report.report_inputs(model, config)
    assert notes == [report.SYNTHETIC_NOTE] and "uniform in [0.1, 1.0], seed 0" in notes[0]
    assert np.array_equal(first["x"], second["x"])
    assert first["x"].shape == (1, 4) and first["x"].dtype == np.float32
    assert (first["x"] >= 0.1).all() and (first["x"] <= 1.0).all()


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, size=(32, 32)).astype(np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"), helper.make_node("Relu", ["h0"], ["a0"],
                                                                                          name="relu0"),
             helper.make_node("MatMul", ["a0", "w1"], ["y"], name="mm1")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("common", [
    "quant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_channel=0",
    "quant_type=WEIGHT_QUANT\nbit_num=0\nmin_quant_weight_channel=0",
    "quant_type=FULL_QUANT\nbit_num=8",
    "quant_type=DYNAMIC_QUANT\nbit_num=8",
])
def test_every_quant_mode_writes_the_reports(tmp_path, no_histograms, common):
    rng = np.random.default_rng(4)
    samples = [{"x": rng.normal(size=(1, 32)).astype(np.float32)} for _ in range(2)]
    data = tmp_path / "bin"
    data.mkdir()
    for index, sample in enumerate(samples):
        sample["x"].tofile(data / f"{index}.bin")
    text = f"[common_quant_param]\n{common}\ndebug_info_save_path={tmp_path / 'dbg'}\n"
    if "FULL_QUANT" in common:
        text += f"[data_preprocess_param]\ncalibrate_path=x:{data}\ncalibrate_size=2\ninput_type=BIN\n"
    path = tmp_path / "q.cfg"
    path.write_text(text)
    result = convert(_mlp(), load_config(path), samples=samples)
    folder = tmp_path / "dbg"
    summary = _rows(folder / "output_summary.csv")
    assert tuple(summary[0]) == SUMMARY_HEADER and [r[:2] for r in summary[1:]] == [["0", "y"], ["1", "y"]]
    assert all(float(r[2]) > 0.9 for r in summary[1:])
    for index in range(2):
        rows = _rows(folder / f"round_{index}.csv")
        assert tuple(rows[0]) == ROUND_HEADER + LOCAL_HEADER
        # every mode's graph gives a local value for every row
        for r in rows[1:]:
            assert 0.9 < float(r[16]) <= 1.0 and r[17], r
        assert [r[4] for r in rows[1:]] == ["Origin", "Dequant"] * ((len(rows) - 1) // 2)
        assert {"x", "a0", "y"} <= {r[2] for r in rows[1:]}  # h0 may be fused away (Relu folded)
    params = _rows(folder / "quant_param.csv")
    assert tuple(params[0]) == PARAM_HEADER and {r[2] for r in params[1:]} == {q.tensor for q in result.quantized}


def test_weight_quant_matmul_and_gather_weights_compare_in_float_units(tmp_path):
    """The default WEIGHT_QUANT strategy feeds MatMul the float codes and Gather the integer table, mapping their
    outputs instead; the reports map the codes back with the recorded scale and offset (a MatMul weight read
    0.725 against its codes before)."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 32])],
                              [numpy_helper.from_array(rng.normal(0, 1, (40, 64)).astype(np.float32), "table"),
                               numpy_helper.from_array(rng.normal(0, 0.2, (64, 32)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = tmp_path / "w.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
                      f"min_quant_weight_channel=0\ndebug_info_save_path={tmp_path / 'debug'}\n")
    result = convert(model, load_config(config))
    assert {(node, slot) for node, slot in result.input_maps} == {("embed", 0), ("proj", 1)}
    rows = [r for r in _rows(tmp_path / "debug" / "round_0.csv")[1:] if r[5] == "Weight" and r[4] == "Dequant"]
    cosines = {r[2]: float(r[15]) for r in rows}
    assert set(cosines) == {"table", "w"} and min(cosines.values()) > 0.9999


def test_threaded_comparison_writes_the_same_files(tmp_path, monkeypatch):
    """A round of many values is compared in two shares on two threads; the files equal the one-thread ones."""
    from helpers import conv_model, full_config, samples

    model, feeds = conv_model(), samples((1, 3, 16, 16), count=3)
    folders = []
    for name, threshold in (("one", 1 << 40), ("two", 1)):  # 1: every round is split between two threads
        monkeypatch.setattr(report, "_PARALLEL_VALUES", threshold)
        folder = tmp_path / name
        convert(model, full_config(common=f"debug_info_save_path={folder}\n"), samples=feeds, progress=False)
        folders.append(folder)
    names = sorted(p.name for p in folders[0].iterdir())
    assert "round_2.csv" in names and names == sorted(p.name for p in folders[1].iterdir())
    for name in names:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_scratch_buffers_give_the_same_statistics():
    """_Flat with reused buffers (a large tensor, then smaller ones in the same buffers) matches _Flat without."""
    rng = np.random.default_rng(3)
    scratch = report.Scratch()
    for size in (5000, 17, 1200, 1):
        origin = np.maximum(rng.standard_normal(size).astype(np.float32), 0)  # many exact zeros
        dequant = np.round(origin * 8) / 8
        plain, plain_d = report._Flat(origin), report._Flat(dequant)
        reused, reused_d = report._Flat(origin, scratch, "origin"), report._Flat(dequant, scratch, "dequant")
        assert reused.stats() == plain.stats() and reused_d.stats() == plain_d.stats()
        assert reused.clip(reused_d) == plain.clip(plain_d) and reused.cosine(reused_d) == plain.cosine(plain_d)
        assert plain.stats()[7] == np.mean(origin == 0)  # the zero count (searched with a float32 zero)

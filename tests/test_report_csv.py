"""The reports' CSV text written without csv.writer's per-field scan (quant_param.csv's rows): the same bytes as
csv.writer, whatever the names hold (commas, quotes, line breaks, nothing)."""

from __future__ import annotations

import csv
import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ptqlite.report import PARAM_HEADER, csv_fields, write_reports
from ptqlite.result import ConversionResult, QuantizedTensor

_NAMES = st.text(st.sampled_from(list('ab ,;"\r\n/_x\t')), max_size=8)


def _writer_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


@settings(max_examples=200, deadline=None)
@given(head=st.lists(_NAMES, min_size=1, max_size=5), tail=st.lists(_NAMES, min_size=1, max_size=4))
def test_fields_then_more_fields_are_what_csv_writes(head, tail):
    assert csv_fields(head) + "," + ",".join(csv_fields([t]) for t in tail) + "\n" == _writer_text([head + tail])


@settings(max_examples=30, deadline=None)
@given(node=_NAMES, tensor=_NAMES, channels=st.integers(1, 4), corrected=st.booleans())
def test_quant_param_rows_are_what_csv_writes(tmp_path_factory, node, tensor, channels, corrected):
    folder = tmp_path_factory.mktemp("report")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels])],
        [numpy_helper.from_array(np.ones((4, channels), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(channels)
    scale = rng.uniform(1e-4, 1, channels).astype(np.float32)
    zero = rng.integers(-128, 128, channels)
    extra = {"correction_var": rng.normal(size=channels), "correction_mean": rng.normal(size=channels)} if corrected else {}
    result = ConversionResult(model, "FULL_QUANT")
    result.quantized.append(QuantizedTensor(tensor, "MatMul", (node, "b,c"), (4, channels), 8, "per-channel",
                                            "DequantizeLinear int8", 64, 16, 0.01, scale=scale, zero_point=zero,
                                            **extra))
    write_reports(folder, model, model, result, [{"x": np.ones((1, 4), np.float32)}])
    texts = [[f"{v:.9g}" for v in a.tolist()] if a is not None else [""] * channels
             for a in (scale, extra.get("correction_var"), extra.get("correction_mean"))]
    expected = [PARAM_HEADER] + [[f"{node};b,c", "MatMul", tensor, 4 * channels, f"[4 {channels}]", s, int(z), 8, v, m]
                                 for s, z, v, m in zip(texts[0], zero.tolist(), texts[1], texts[2], strict=True)]
    with open(folder / "quant_param.csv", newline="") as handle:
        assert handle.read() == _writer_text(expected)

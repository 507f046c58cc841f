"""The verification gate (verify.py) and --inputShape: the output keeps the model's own shapes and must load, run
and stay close to the float model before a conversion reports success."""

from __future__ import annotations

import logging
import re
import sys

import numpy as np
import onnx
import pytest
from helpers import cosine, one_error_line, run
from helpers import run_cli as main
from onnx import TensorProto, helper, numpy_helper

from ptqlite import parse_config
from ptqlite.convert import convert
from ptqlite.errors import VerificationError
from ptqlite.verify import (
    FLOORS,
    SLICE_FLOOR,
    compare,
    describe,
    slice_cosines,
    verify,
)

HIDDEN = 32
SEQ_SHAPE = "x:1,4,32"

CONFIGS = {
    "weight_8bit": "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n",
    "on_the_fly": "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n"
                  "[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n",
    "mixed_bit": "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=0\n",
    "dynamic": "[common_quant_param]\nquant_type=DYNAMIC_QUANT\n",
    "full": "[common_quant_param]\nquant_type=FULL_QUANT\n"
            "[data_preprocess_param]\ncalibrate_path=x:{data}\ncalibrate_size=8\ninput_type=BIN\n",
}


def reshaping_model() -> onnx.ModelProto:
    """x [batch, seq, 32] -> MatMul -> Reshape to [batch, seq, 8, 8] and back, both targets computed from Shape
    (Shape -> Gather -> Concat -> Reshape), -> MatMul -> y [batch, seq, 32]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(HIDDEN, 64)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(64, HIDDEN)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([8, 8], np.int64), "c88"),
             numpy_helper.from_array(np.array([-1], np.int64), "cm1"),
             numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([1], np.int64), "i1")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Shape", ["h"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["b"], name="gather_batch"),
             helper.make_node("Gather", ["s", "i1"], ["q"], name="gather_seq"),
             helper.make_node("Concat", ["b", "q", "c88"], ["t4"], axis=0, name="target4"),
             helper.make_node("Reshape", ["h", "t4"], ["h4"], name="reshape4"),
             helper.make_node("Relu", ["h4"], ["h4r"], name="relu"),
             helper.make_node("Concat", ["b", "q", "cm1"], ["t3"], axis=0, name="target3"),
             helper.make_node("Reshape", ["h4r", "t3"], ["h3"], name="reshape3"),
             helper.make_node("MatMul", ["h3", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "reshaping",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def flags(model, config, output, *extra: str) -> list[str]:
    return ["--fmk=ONNX", f"--modelFile={model}", f"--outputFile={output}", f"--configFile={config}", *extra]






@pytest.fixture
def work(tmp_path):
    """The reshaping model on disk, 8 BIN calibration files at the --inputShape shape, an output folder."""
    model = tmp_path / "model.onnx"
    onnx.save(reshaping_model(), model)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        rng.normal(size=(1, 4, HIDDEN)).astype(np.float32).tofile(data / f"{i}.bin")
    out = tmp_path / "out"
    out.mkdir()
    return model, data, out


def write_config(tmp_path, name: str, data) -> str:
    path = tmp_path / f"{name}.cfg"
    path.write_text(CONFIGS[name].format(data=data))
    return str(path)


# ---------------------------------------------------------------- --inputShape keeps the model's shapes


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_input_shape_output_keeps_dynamic_shapes_and_runs_at_other_shapes(work, tmp_path, capsys, mode):
    model, data, out = work
    code, stdout, err = main(flags(model, write_config(tmp_path, mode, data), out / mode,
                                   f"--inputShape={SEQ_SHAPE}"), capsys)
    assert code == 0, err
    written = onnx.load(str(out / f"{mode}.onnx"))
    assert dims(written.graph.input[0]) == ["batch", "seq", HIDDEN]
    assert dims(written.graph.output[0]) == ["batch", "seq", HIDDEN]
    assert "also runs at x:2,8,32" in stdout
    rng = np.random.default_rng(2)
    for shape in ((2, 3, HIDDEN), (3, 7, HIDDEN)):
        x = rng.normal(size=shape).astype(np.float32)
        (expected,), (got,) = run(reshaping_model(), {"x": x}), run(written, {"x": x})
        assert got.shape == shape
        assert cosine(expected, got) > 0.99, mode


def test_input_shape_in_the_python_api(work):
    model = reshaping_model()
    result = convert(model, parse_config(CONFIGS["dynamic"]), input_shapes={"x": [1, 4, HIDDEN]})
    assert dims(result.model.graph.input[0]) == ["batch", "seq", HIDDEN]
    assert dims(model.graph.input[0]) == ["batch", "seq", HIDDEN]  # the caller's model is untouched
    assert result.verification.other_shapes == "x:2,8,32" and not result.verification.shape_problem


def _baking_pass(monkeypatch, fixed_target: list[int]):
    """A pass that, like a fold of shape arithmetic over fixed shapes, replaces the first Reshape's target with
    a constant."""
    convert_module = sys.modules["ptqlite.convert"]

    def run_pass(model, config, **_):
        from ptqlite.passes import dynamic

        result = dynamic.run(model, config)
        for node in model.graph.node:
            if node.op_type == "Reshape":
                model.graph.initializer.append(numpy_helper.from_array(np.array(fixed_target, np.int64), "baked"))
                node.input[1] = "baked"
                break
        return result

    monkeypatch.setattr(convert_module, "pass_for", lambda config: run_pass)


def test_output_that_works_only_at_the_fixed_shapes_keeps_them_and_says_why(work, tmp_path, capsys, monkeypatch):
    model, data, out = work
    _baking_pass(monkeypatch, [1, 4, 8, 8])
    code, stdout, err = main(flags(model, write_config(tmp_path, "dynamic", data), out / "m",
                                   f"--inputShape={SEQ_SHAPE}"), capsys)
    assert code == 0, err
    written = onnx.load(str(out / "m.onnx"))
    assert dims(written.graph.input[0]) == [1, 4, HIDDEN]
    assert re.search(r"note: the output keeps the --inputShape shapes, since at x:2,8,32 it fails where the float "
                     r"model runs \(.*reshape", stdout, re.IGNORECASE), stdout


# ---------------------------------------------------------------- the gate


def _broken_pass(monkeypatch):
    """A pass whose output ONNX Runtime refuses: a node of an op that does not exist."""
    convert_module = sys.modules["ptqlite.convert"]

    def run_pass(model, config, **_):
        from ptqlite.passes import weight

        result = weight.run(model, config)
        model.graph.node[0].op_type = "NoSuchOp"
        return result

    monkeypatch.setattr(convert_module, "pass_for", lambda config: run_pass)


def test_output_that_does_not_load_is_exit_1_and_nothing_is_written(work, tmp_path, capsys, monkeypatch):
    model, data, out = work
    _broken_pass(monkeypatch)
    code, stdout, err = main(flags(model, write_config(tmp_path, "weight_8bit", data), out / "m"), capsys)
    assert code == 1 and stdout == ""
    line = one_error_line(err)
    assert line.startswith("the quantized model does not load in ONNX Runtime, so nothing was written: ")
    assert "NoSuchOp" in line
    assert list(out.iterdir()) == []


def test_broken_output_is_an_error_in_the_python_api_too(monkeypatch):
    _broken_pass(monkeypatch)
    with pytest.raises(VerificationError, match="does not load"):
        convert(reshaping_model(), parse_config(CONFIGS["weight_8bit"]))


def test_collapse_warns_with_the_cause_and_the_analyze_command(work, tmp_path, capsys, caplog):
    model, _, out = work
    config = tmp_path / "w1.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=1\n")
    with caplog.at_level(logging.WARNING, logger="ptqlite.convert"):
        code, stdout, _ = main(flags(model, config, out / "m", f"--inputShape={SEQ_SHAPE}"), capsys)
    assert code == 0 and (out / "m.onnx").exists()
    assert re.search(r"output 'y': cosine mean 0\.\d{6}, min 0\.\d{6} COLLAPSED", stdout), stdout
    warning = caplog.text
    assert "the quantized model's output collapsed against the float model on 2 synthetic inputs: 'y'" in warning
    assert "below the floor 0.9 for WEIGHT_QUANT; likely cause: bit_num=1 is too few bits" in warning
    assert (f"find the layers responsible with: ptqlite analyze --fmk=ONNX --modelFile={model} "
            f"--configFile={config} --inputShape={SEQ_SHAPE}") in warning


def test_verify_floor_makes_a_collapse_an_error(work, tmp_path, capsys):
    model, data, out = work
    config = write_config(tmp_path, "weight_8bit", data)
    # 8-bit weights reach about 0.9999: a floor of 1 makes them "collapse"
    code, stdout, err = main(flags(model, config, out / "m", "--verifyFloor=1"), capsys)
    assert code == 1 and stdout == ""
    line = one_error_line(err)
    assert "below --verifyFloor=1; likely cause: bit_num=8" in line and "ptqlite analyze" in line
    assert list(out.iterdir()) == []
    assert main(flags(model, config, out / "m", "--verifyFloor=0.99", "--quiet"), capsys)[0] == 0


def test_summary_lines(work, tmp_path, capsys):
    model, data, out = work
    code, stdout, _ = main(flags(model, write_config(tmp_path, "full", data), out / "m",
                                 f"--inputShape={SEQ_SHAPE}"), capsys)
    assert code == 0
    lines = stdout.splitlines()
    start = lines.index("verified in ONNX Runtime against the float model on 8 calibration samples:")
    # the tokens' slices are of one size: no small slice to score on its own, no "worst slice" part
    assert re.fullmatch(r"  output 'y': cosine mean 0\.99\d{4}, min 0\.99\d{4}", lines[start + 1])
    assert lines[start + 2] == "  the output keeps the model's own input shapes and also runs at x:2,8,32"
    assert lines[start + 3].startswith("file size ")


def test_synthetic_inputs_are_named_in_the_summary(work, tmp_path, capsys):
    model, data, out = work
    code, stdout, _ = main(flags(model, write_config(tmp_path, "weight_8bit", data), out / "m"), capsys)
    assert code == 0
    assert "verified in ONNX Runtime against the float model on 2 synthetic inputs:\n" in stdout
    assert "  note: the config has no calibration data, so the gate ran on synthetic inputs" in stdout


def test_verify_off_skips_the_gate(work, tmp_path, capsys, monkeypatch):
    model, data, out = work
    _broken_pass(monkeypatch)  # not loaded, so not noticed
    code, stdout, _ = main(flags(model, write_config(tmp_path, "weight_8bit", data), out / "m", "--verify=off"),
                           capsys)
    assert code == 0 and "not verified (--verify=off)" in stdout


@pytest.mark.parametrize("flag, message", [
    ("--verify=maybe", "--verify=maybe: expected on or off"),
    ("--verifyFloor=abc", "--verifyFloor=abc: expected a number in (0, 1]"),
    ("--verifyFloor=0", "--verifyFloor=0: expected a number in (0, 1]"),
    ("--verifyFloor=1.5", "--verifyFloor=1.5: expected a number in (0, 1]"),
    ("--verifyFloor=nan", "--verifyFloor=nan: expected a number in (0, 1]"),
])
def test_flag_values_are_checked(work, tmp_path, capsys, flag, message):
    model, data, out = work
    code, _, err = main(flags(model, write_config(tmp_path, "weight_8bit", data), out / "m", flag), capsys)
    assert code == 2 and one_error_line(err) == message
    assert list(out.iterdir()) == []


def test_verify_floor_needs_the_gate(work, tmp_path, capsys):
    model, data, out = work
    code, _, err = main(flags(model, write_config(tmp_path, "weight_8bit", data), out / "m", "--verify=off",
                              "--verifyFloor=0.9"), capsys)
    assert code == 2 and one_error_line(err) == "--verifyFloor=0.9: needs --verify=on"


# ---------------------------------------------------------------- comparing outputs


def test_compare_rules():
    x = np.array([1.0, 2.0, 3.0], np.float32)
    assert compare(x, x)[:2] == ("cosine", pytest.approx(1.0))
    assert compare(x, np.array([1.0, np.nan, 3.0], np.float32))[1:3] == (0.0, True)  # NaN where float is finite
    with_inf = np.array([1.0, -np.inf, 3.0], np.float32)  # the float model's own -inf (a mask) is not counted
    assert compare(with_inf, with_inf)[1:3] == (pytest.approx(1.0), False)
    assert compare(x, x[:2])[1:] == (0.0, False, True)
    labels = np.array([1, 2, 3, 4], np.int64)
    assert compare(labels, np.array([1, 2, 0, 4], np.int64))[:2] == ("agreement", 0.75)


def _argmax_model(name: str, weight: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 3]),
                               helper.make_tensor_value_info("label", TensorProto.INT64, [4])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_integer_outputs_by_agreement_and_a_sign_flip_collapses():
    w = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    inputs = [{"x": np.random.default_rng(i).normal(size=(4, 8)).astype(np.float32)} for i in range(4)]
    same = verify(_argmax_model("f", w), _argmax_model("q", w), inputs, "4 given samples", FLOORS["FULL_QUANT"])
    assert [(o.name, o.kind, o.mean, o.collapsed) for o in same.outputs] == [
        ("logits", "cosine", pytest.approx(1.0), False), ("label", "agreement", 1.0, False)]
    flipped = verify(_argmax_model("f", w), _argmax_model("q", -w), inputs, "4 given samples", 0.9)
    assert {o.name for o in flipped.collapsed} == {"logits", "label"}


def test_float_model_that_cannot_run_is_noted_not_failed():
    w = np.ones((8, 3), np.float32)
    broken = _argmax_model("f", w)
    broken.graph.node[0].op_type = "NoSuchOp"
    checked = verify(broken, _argmax_model("q", w), [{"x": np.ones((4, 8), np.float32)}], "1 sample", 0.9)
    assert checked.outputs == [] and checked.skipped.startswith("the float model does not load in ONNX Runtime")


def test_input_shape_that_changes_a_fixed_dim_is_kept_and_noted():
    model = reshaping_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # batch fixed to 1, seq still symbolic
    result = convert(model, parse_config(CONFIGS["dynamic"]), input_shapes={"x": [2, 4, HIDDEN]})
    assert dims(result.model.graph.input[0]) == [2, 4, HIDDEN]
    assert ("--inputShape changes dims the model fixes, so the output takes the given shapes: 'x' 2,4,32 "
            "(the model fixes 1,?,32)") in result.notes
    assert result.verification.outputs[0].min > 0.99


def test_public_api_options(tmp_path):
    import ptqlite

    path = tmp_path / "model.onnx"
    onnx.save(reshaping_model(), path)
    result = ptqlite.convert(path, CONFIGS["dynamic"], input_shapes="x:1,4,32", progress=False)
    assert dims(result.model.graph.input[0]) == ["batch", "seq", HIDDEN]
    assert result.verification.inputs == "2 synthetic inputs" and result.verification.outputs[0].min > 0.99
    assert ptqlite.convert(path, CONFIGS["dynamic"], verify=False).verification is None
    with pytest.raises(ptqlite.PtqError, match=r"verify_floor=1.5: expected a number in \(0, 1\]"):
        ptqlite.convert(path, CONFIGS["dynamic"], verify_floor=1.5)
    with pytest.raises(ptqlite.PtqError, match="collapsed"):
        ptqlite.quantize(path, CONFIGS["dynamic"], verify_floor=1.0)


def test_model_refused_with_the_fixed_shapes_is_converted_on_its_own(work, tmp_path, capsys, monkeypatch):
    """Control flow that ONNX Runtime refuses at the fixed shapes (silero VAD's If over 8k/16k branches): the pass
    works on the model's own shapes and only the BIN calibration files are read at the --inputShape shapes."""
    model, data, out = work
    convert_module = sys.modules["ptqlite.convert"]
    checked = []

    def refuse(reference, path=None):
        checked.append((path, path is not None and path.exists()))
        return "a branch does not fit"

    monkeypatch.setattr(convert_module, "_refused_with_shapes", refuse)
    code, stdout, err = main(flags(model, write_config(tmp_path, "full", data), out / "m",
                                   f"--inputShape={SEQ_SHAPE}"), capsys)
    assert code == 0, err
    # the check read the gate's fixed-shape float file, which then went (the gate runs on the own shapes)
    assert len(checked) == 1 and checked[0][1] and not checked[0][0].exists()
    assert ("note: ONNX Runtime refuses the model with the --inputShape shapes (a branch does not fit), so the "
            "conversion works on its own shapes and reads the calibration data at the given ones") in stdout
    assert "verified in ONNX Runtime against the float model on 8 calibration samples:" in stdout
    assert dims(onnx.load(str(out / "m.onnx")).graph.input[0]) == ["batch", "seq", HIDDEN]


def test_float_model_refused_at_the_fixed_shapes_is_compared_with_its_own_shapes():
    """silero-vad with --inputShape: at the fixed shapes its If/LSTM does not load in ONNX Runtime, at its own shapes
    it runs the same inputs; the gate compares there instead of skipping the comparison."""
    model = reshaping_model()
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.node[0].op_type = "NoSuchOp"  # stands for the shapes that break inference
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 3, HIDDEN)).astype(np.float32)}
    other = {"x": np.random.default_rng(1).normal(size=(3, 7, HIDDEN)).astype(np.float32)}
    result = verify(fixed, model, [feeds], "1 calibration sample", 0.9, (model, other, f"x:3,7,{HIDDEN}"))
    assert not result.skipped and not result.collapsed
    without_fallback = verify(fixed, model, [feeds], "1 calibration sample", 0.9)
    assert without_fallback.skipped.startswith("the float model does not load")


def _concat_with_batch_one_model() -> onnx.ModelProto:
    """x [batch, 4] -> MatMul -> Concat with a [1, 32] constant on axis 1 -> MatMul: runs only at batch 1, so the
    gate's run at doubled --inputShape dims fails inside ONNX Runtime (a Concat whose other dims do not match, as in
    the PP-OCRv4 recogniser)."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(size=(4, HIDDEN)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(1, HIDDEN)).astype(np.float32), "c"),
             numpy_helper.from_array(rng.normal(size=(2 * HIDDEN, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Concat", ["h", "c"], ["hc"], axis=1),
             helper.make_node("MatMul", ["hc", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "concat_batch_one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_runtime_errors_the_gate_expects_do_not_reach_the_terminal(tmp_path, capfd):
    """ONNX Runtime logs a failed run itself ("[E:onnxruntime:, sequential_executor.cc ... ExecuteKernel]") on the
    process's stderr; ptqlite's sessions keep it quiet, so a conversion that succeeds prints only its summary."""
    from ptqlite import cli

    model = tmp_path / "model.onnx"
    onnx.save(_concat_with_batch_one_model(), model)
    config = tmp_path / "w8.cfg"
    config.write_text(CONFIGS["weight_8bit"])
    code = cli.main(flags(model, config, tmp_path / "out", "--inputShape=x:1,4"))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "also runs at x:2,4" in captured.out
    assert "onnxruntime" not in captured.err.lower() and "ExecuteKernel" not in captured.err


# ---------------------------------------------------------------- slices: what the whole-output cosine hides


def _yolo_head(quantize_output: bool = False) -> onnx.ModelProto:
    """A YOLO-style head: box coordinates in pixels (0..160) and class scores (0..1) concatenated on axis 1 into
    y [1, 6, 256]. quantize_output puts one uint8 QuantizeLinear/DequantizeLinear pair on y, as one scale for the
    whole graph output did to YOLOv8n: the scores take three values while the whole-output cosine stays 1.000."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, .3, (4, 8, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, .3, (2, 8, 1, 1)).astype(np.float32), "wc"),
             numpy_helper.from_array(np.array(160, np.float32), "stride"),
             numpy_helper.from_array(np.array([1, 6, 256], np.int64), "shape"),
             numpy_helper.from_array(np.array(160 / 255 * 2, np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "zero")]
    nodes = [helper.make_node("Conv", ["x", "wb"], ["b"]), helper.make_node("Sigmoid", ["b"], ["bs"]),
             helper.make_node("Mul", ["bs", "stride"], ["boxes"]),
             helper.make_node("Conv", ["x", "wc"], ["c"]), helper.make_node("Sigmoid", ["c"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["cat"], axis=1),
             helper.make_node("Reshape", ["cat", "shape"], ["y0" if quantize_output else "y"])]
    if quantize_output:
        nodes += [helper.make_node("QuantizeLinear", ["y0", "scale", "zero"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "scale", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "yolo_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 256])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_collapsed_score_channel_is_seen_although_the_whole_output_cosine_is_high():
    inputs = [{"x": np.random.default_rng(i).normal(size=(1, 8, 16, 16)).astype(np.float32)} for i in range(4)]
    collapsed = verify(_yolo_head(), _yolo_head(quantize_output=True), inputs, "4 given samples", 0.9)
    (check,) = collapsed.outputs
    assert check.min > 0.999  # the box coordinates dominate the whole output
    assert check.slice_where.startswith("axis 1 index ") and check.slice_where.endswith(" of 6")
    assert check.slice_where != "axis 1 index 0 of 6" and check.slice_min < SLICE_FLOOR
    assert check.collapsed and "worst slice (axis 1 index" in describe(check)
    healthy = verify(_yolo_head(), _yolo_head(), inputs, "4 given samples", 0.9)
    assert healthy.outputs[0].slice_min == pytest.approx(1.0) and not healthy.collapsed


def test_slice_rules():
    rng = np.random.default_rng(5)
    logits = [rng.normal(size=(1, 1000)) for _ in range(4)]  # one value per class and sample: no slice scored
    assert slice_cosines(logits, [2 * x for x in logits]) is None
    maps = [rng.normal(size=(1, 3, 8, 8)) * np.array([100.0, 1.0, 0.5]).reshape(1, 3, 1, 1) for _ in range(4)]
    noisy = [m + 0.001 * rng.normal(size=m.shape) for m in maps]
    worst, where = slice_cosines(maps, noisy)
    assert worst > 0.99 and where.startswith("axis 1 index ")
    flipped = [m.copy() for m in maps]
    for m in flipped:
        m[0, 2] *= -1  # one small channel's sign: its cosine is -1, the whole output's stays near 1
    assert slice_cosines(maps, flipped) == (pytest.approx(-1.0), "axis 1 index 2 of 3")
    assert compare(np.concatenate(maps), np.concatenate(flipped))[1] > 0.999
    same_size = [m / np.array([100.0, 1.0, 0.5]).reshape(1, 3, 1, 1) for m in flipped]
    assert slice_cosines(same_size, same_size) is None  # slices of one size: judged by the whole output only
    zero = [m.copy() for m in maps]
    for m in zero:
        m[0, 1] = 0.0  # all zero in float: not scored (the whole-output cosine covers it)
    assert slice_cosines(zero, [m + 1e-4 for m in zero])[0] > 0.99


def _tanh_mlp(layers: int = 2, width: int = 64) -> onnx.ModelProto:
    """x [1, 8, width] -> (MatMul -> Tanh) x layers."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        x = f"t{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_few_bits_checked_on_synthetic_inputs_only_are_warned_about(tmp_path):
    """A text recogniser at 4 bits: 0.973 on the synthetic inputs, 0.84 on rendered text, and no word of it. At 4
    bits or fewer a check on synthetic inputs alone now says that it cannot vouch for the output (no floor there
    separates that recogniser from healthy 4-bit classifiers at 0.91-0.93); with calibration data it is silent."""
    four_bits = "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=4\n"
    synthetic = convert(_tanh_mlp(), parse_config(four_bits))
    check = synthetic.verification.outputs[0]
    assert synthetic.verification.inputs == "2 synthetic inputs" and not check.collapsed
    assert synthetic.verification.floor == FLOORS["WEIGHT_QUANT"]
    (warning,) = synthetic.warnings
    assert warning.startswith(f"bit_num=4 was verified on synthetic inputs only (min output cosine {check.min:.4f})")
    assert "calibrate_path" in warning and "ptqlite analyze" in warning
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        np.random.default_rng(i).normal(size=(1, 8, 64)).astype(np.float32).tofile(data / f"{i}.bin")
    with_data = four_bits + f"[data_preprocess_param]\ncalibrate_path=x:{data}\ncalibrate_size=8\ninput_type=BIN\n"
    real = convert(_tanh_mlp(), parse_config(with_data))
    assert real.verification.inputs == "8 calibration samples" and not real.warnings
    eight_bits = convert(_tanh_mlp(), parse_config(CONFIGS["weight_8bit"]))
    assert eight_bits.verification.inputs == "2 synthetic inputs" and not eight_bits.warnings


def test_samples_compared_before_one_the_float_model_rejects_still_count():
    model = _concat_with_batch_one_model()
    rng = np.random.default_rng(6)
    inputs = [{"x": rng.normal(size=(1, 4)).astype(np.float32)}, {"x": rng.normal(size=(2, 4)).astype(np.float32)}]
    checked = verify(model, model, inputs, "2 given samples", 0.9)
    assert checked.samples == 1 and checked.outputs[0].min == pytest.approx(1.0)
    assert checked.skipped.startswith("the float model does not run on sample 1 of the 2 given samples")
    first = verify(model, model, inputs[::-1], "2 given samples", 0.9)
    assert first.outputs == [] and first.skipped.startswith("the float model does not run on the 2 given samples")

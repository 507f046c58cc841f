"""Input rules (docs/architecture.md, "Input rules"): invalid graphs, NaN/Inf weights and calibration data, and
models that are already quantized are refused with one line and exit 2, in every mode, before anything is
written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqlite import cli
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.errors import DataError, ModelError

MODES = {
    "WEIGHT_QUANT": "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
                    "min_quant_weight_channel=0\n",
    "ON_THE_FLY": "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
                  "min_quant_weight_channel=0\n[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n",
    "DYNAMIC_QUANT": "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
                     "min_quant_weight_channel=0\n",
    # in-memory samples stand in for the files (Python API)
    "FULL_QUANT": "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
                  "min_quant_weight_channel=0\n[data_preprocess_param]\ncalibrate_path=x:/nonexistent\n"
                  "calibrate_size=1\ninput_type=BIN\n",
}
SAMPLES = [{"x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)}]


def _w(name: str = "W", shape=(8, 8), seed: int = 0) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _model(nodes, initializers=(), opset: int = 17, name: str = "g", extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def matmul(name: str = "g") -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_w()], name=name)


def _convert(model: onnx.ModelProto, mode: str, **options):
    return convert(model, parse_config(MODES[mode]), samples=SAMPLES, progress=False, **options)


def test_a_valid_model_converts_in_every_mode():
    for mode in MODES:
        assert _convert(matmul(), mode).quantized


# ---------------------------------------------------------------- invalid graphs


INVALID = {
    "dangling input": (_model([helper.make_node("MatMul", ["x", "missing"], ["y"], name="mm")], [_w()]),
                       ("not a valid ONNX model (Nodes in a graph must be topologically sorted, however input "
                       "'missing' of node: name: mm OpType: MatMul is not output of any previous nodes)")),
    "cycle": (_model([helper.make_node("Add", ["x", "b"], ["a"], name="add"),
                      helper.make_node("Relu", ["a"], ["b"], name="relu"),
                      helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")], [_w()]),
              ("not a valid ONNX model (Nodes in a graph must be topologically sorted, however input 'b' of node: "
              "name: add OpType: Add is not output of any previous nodes)")),
    "unknown opset": (_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_w()], opset=99),
                      (f"opset 99 of the default ONNX domain is unknown (known: 1 to {onnx.defs.onnx_opset_version()}); "
                      "re-export the model with a released opset")),
    "wrong shapes": (_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_w(shape=(4, 8))]),
                     ("not a valid ONNX model ([ShapeInferenceError] Inference error(s): (op_type:MatMul, node name: "
                     "mm): [ShapeInferenceError] Incompatible dimensions for matrix multiplication)")),
    "unknown op": (_model([helper.make_node("NoSuchOp", ["x"], ["y"], name="odd")]),
                   ("not a valid ONNX model (No Op registered for NoSuchOp with domain_version of 17; Bad node spec "
                   "for node. Name: odd OpType: NoSuchOp)")),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", INVALID)
def test_invalid_graph_is_refused_in_every_mode(case, mode):
    model, message = INVALID[case]
    with pytest.raises(ModelError) as caught:
        _convert(model, mode)
    assert str(caught.value) == f"model 'g': {message}"


def test_invalid_graph_through_the_cli_is_one_line_exit_2_naming_the_file(tmp_path, capsys):
    path = tmp_path / "bad.onnx"
    onnx.save(INVALID["dangling input"][0], path)
    config = tmp_path / "w.cfg"
    config.write_text(MODES["WEIGHT_QUANT"])
    code = cli.main(["--fmk=ONNX", f"--modelFile={path}", f"--outputFile={tmp_path / 'out'}",
                     f"--configFile={config}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"ptqlite: error: {path}: not a valid ONNX model (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "w.cfg"]


def test_stale_recorded_shapes_are_refused_with_the_fix():
    """ONNX Runtime loads such a model with a warning; the passes plan with the recorded shapes, so it is refused."""
    model = _model([helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
                    helper.make_node("Relu", ["a"], ["y"], name="relu")], [_w()])
    model.graph.value_info.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 5]))
    with pytest.raises(ModelError) as caught:
        _convert(model, "WEIGHT_QUANT")
    message = str(caught.value)
    assert message.startswith("model 'g': not a valid ONNX model ([ShapeInferenceError] Inference error(s): "
                              "(op_type:MatMul, node name: mm): [ShapeInferenceError] Inferred shape and existing "
                              "shape differ in dimension 1: (8) vs (5)")
    assert message.endswith("; the shapes recorded in the model (value_info, graph outputs) contradict what its ops "
                            "compute: remove the stale ones (e.g. del model.graph.value_info[:]) and convert again")
    del model.graph.value_info[:]
    assert _convert(model, "WEIGHT_QUANT").quantized


def test_runtime_refusal_is_one_line_without_the_runtime_source_location(monkeypatch):
    from ptqlite import validate

    monkeypatch.setattr(validate, "_check_onnx", lambda model, source: None)  # let the model reach the runtime
    with pytest.raises(ModelError) as caught:
        _convert(INVALID["cycle"][0], "WEIGHT_QUANT")
    assert str(caught.value) == ("model 'g': onnxruntime cannot load the model as given (This is an invalid model. "
                                 "Error: the graph is not acyclic)")


def test_missing_output_shape_is_accepted_and_missing_input_shape_names_the_flag():
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_w()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert _convert(model, "WEIGHT_QUANT").quantized
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(ModelError, match=r"^model 'g': input 'x' has no shape; give one with --inputShape"):
        _convert(model, "WEIGHT_QUANT")


def test_validation_leaves_the_output_bytes_unchanged():
    model = matmul()
    checked = _convert(model, "WEIGHT_QUANT").model.SerializeToString(deterministic=True)
    unchecked = _convert(model, "WEIGHT_QUANT", validate=False).model.SerializeToString(deterministic=True)
    assert checked == unchecked


# ---------------------------------------------------------------- NaN / Inf in weights


def _with_values(tensor: onnx.TensorProto, *values: float) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor).copy()
    array.flat[: len(values)] = values
    return numpy_helper.from_array(array, tensor.name)


@pytest.mark.parametrize("mode", MODES)
def test_nan_in_a_weight_is_refused_naming_it(mode):
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_with_values(_w(), np.nan)])
    with pytest.raises(ModelError) as caught:
        _convert(model, mode)
    assert str(caught.value) == ("model 'g': weight 'W' has 1 NaN value(s) of 64; expected finite numbers "
                                 "(the float model itself computes NaN there)")


def test_inf_in_a_constant_node_weight_is_refused():
    constant = helper.make_node("Constant", [], ["W"], name="const",
                                value=_with_values(_w(), np.inf, -np.inf))
    model = _model([constant, helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")])
    with pytest.raises(ModelError, match=r"^model 'g': weight 'W' has 2 infinite value\(s\) of 64; expected finite"):
        _convert(model, "WEIGHT_QUANT")


def test_nan_in_a_subgraph_initializer_is_refused_naming_the_subgraph():
    def branch(name: str, values) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", f"W_{name}"], [f"y_{name}"], name=f"mm_{name}")],
                                 name, [], [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [1, 8])],
                                 [values])

    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", _w("W_then")),
                            else_branch=branch("else", _with_values(_w("W_else"), np.nan)))
    model = _model([node], [cond])
    with pytest.raises(ModelError, match=r"^model 'g': weight 'W_else' \(in subgraph 'else'\) has 1 NaN value"):
        _convert(model, "WEIGHT_QUANT")


def test_minus_inf_in_an_attention_style_mask_is_accepted():
    mask = numpy_helper.from_array(np.array([[0, 0, 0, 0, -np.inf, -np.inf, 0, 0]], np.float32), "mask")
    model = _model([helper.make_node("MatMul", ["x", "W"], ["s"], name="mm"),
                    helper.make_node("Add", ["s", "mask"], ["m"], name="masked"),
                    helper.make_node("Softmax", ["m"], ["y"], name="softmax")], [_w(), mask])
    assert _convert(model, "WEIGHT_QUANT").quantized


# ---------------------------------------------------------------- NaN / Inf in calibration data


def _bin_setup(tmp_path, values: list[np.ndarray]):
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, array in enumerate(values):
        array.astype("<f4").tofile(folder / f"{index:02d}.bin")
    model_path = tmp_path / "m.onnx"
    onnx.save(matmul(), model_path)
    config = tmp_path / "full.cfg"
    config.write_text(MODES["FULL_QUANT"].replace("x:/nonexistent", f"x:{folder}")
                      .replace("calibrate_size=1", f"calibrate_size={len(values)}"))
    return model_path, config, folder


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_a_bin_file_is_exit_2_naming_file_and_input(tmp_path, capsys, bad):
    good = np.linspace(-1, 1, 8, dtype=np.float32)
    broken = good.copy()
    broken[3] = bad
    model_path, config, folder = _bin_setup(tmp_path, [good, broken, good])
    out = tmp_path / "out"
    code = cli.main(["--fmk=ONNX", f"--modelFile={model_path}", f"--outputFile={out}", f"--configFile={config}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"ptqlite: error: {folder / '01.bin'}: calibration data for input 'x' has 1 NaN/Inf value(s) "
                   "of 8; expected finite numbers\n")
    assert not out.with_suffix(".onnx").exists()


def test_nan_in_in_memory_samples_is_refused_for_lists_and_generators():
    bad = [SAMPLES[0], {"x": np.full((1, 8), np.nan, np.float32)}]
    config = parse_config(MODES["FULL_QUANT"])
    with pytest.raises(DataError, match=r"^calibration sample 1: calibration data for input 'x' has 8 NaN/Inf"):
        convert(matmul(), config, samples=bad, progress=False)

    class Stream:  # re-iterable, no len(): checked while it is read
        def __iter__(self):
            return iter(bad)

    with pytest.raises(DataError, match=r"^calibration sample 1: "):
        convert(matmul(), config, samples=Stream(), progress=False)


# ---------------------------------------------------------------- already quantized


def _conv_integer_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "w_q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    nodes = [helper.make_node("ConvInteger", ["x", "w_q"], ["acc"], name="conv_int"),
             helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["acc_f", "scale"], ["y"], name="rescale")]
    graph = helper.make_graph(nodes, "q", [x], [y], [w, scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _qdq_model() -> onnx.ModelProto:
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("MatMul", ["xd", "W"], ["y"], name="mm")]
    return _model(nodes, [_w(), scale, zero], name="q")


def _matmul_nbits_model() -> onnx.ModelProto:
    packed = numpy_helper.from_array(np.zeros((8, 1, 4), np.uint8), "Wq")
    scales = numpy_helper.from_array(np.ones(8, np.float32), "Ws")
    node = helper.make_node("MatMulNBits", ["x", "Wq", "Ws"], ["y"], name="mm4", domain="com.microsoft", K=8, N=8,
                            bits=4, block_size=16)
    return _model([node], [packed, scales], name="q", extra_opsets=[helper.make_opsetid("com.microsoft", 1)])


QUANTIZED = {"ConvInteger": (_conv_integer_model, "1 ConvInteger; first: 'conv_int'"),
             "QDQ": (_qdq_model, "1 DequantizeLinear, 1 QuantizeLinear; first: 'q'"),
             "MatMulNBits": (_matmul_nbits_model, "1 MatMulNBits; first: 'mm4'")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", QUANTIZED)
def test_an_already_quantized_model_is_refused_in_every_mode(case, mode):
    build, listed = QUANTIZED[case]
    samples = [{"x": np.ones((1, 1, 4, 4), np.uint8)}] if case == "ConvInteger" else SAMPLES
    with pytest.raises(ModelError) as caught:
        convert(build(), parse_config(MODES[mode]), samples=samples, progress=False)
    assert str(caught.value) == (f"model 'q': the model is already quantized ({listed}); ptqlite quantizes float "
                                 "models: convert the float original instead")


def test_a_dynamic_quant_output_fed_back_is_refused():
    once = _convert(matmul(), "DYNAMIC_QUANT").model
    with pytest.raises(ModelError, match="already quantized"):
        _convert(once, "DYNAMIC_QUANT")


# ---------------------------------------------------------------- models over 2 GB (threshold lowered)


def test_models_over_the_limit_are_checked_from_their_file(tmp_path, monkeypatch):
    from ptqlite import model as model_module
    from ptqlite.validate import validate_model

    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 100)  # 256 bytes of weights count as "over 2 GB"
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    model_module.save_model(matmul(), good)
    model_module.save_model(INVALID["dangling input"][0], bad)
    assert (tmp_path / "good.onnx.data").exists()
    assert validate_model(onnx.load(str(good)), str(good), good) == []
    with pytest.raises(ModelError, match=rf"^{bad}: not a valid ONNX model \(Nodes in a graph must be topologically"):
        validate_model(onnx.load(str(bad)), str(bad), bad)
    # in memory only, the checker and the runtime cannot see it: said in a note, the other rules still hold
    result = _convert(onnx.load(str(good)), "WEIGHT_QUANT")
    assert "the ONNX checker and the ONNX Runtime load check did not run: the model is over 2 GB" in result.notes[-1]
    with pytest.raises(ModelError, match="NaN"):
        _convert(_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_with_values(_w(), np.nan)]),
                 "WEIGHT_QUANT")


# ---------------------------------------------------------------- the checks read a split copy of the model


def _with_large_weight(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with an unused 64x64 initializer, which the split copy moves to its data file."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.initializer.append(_w("big", (64, 64)))
    return model


@pytest.mark.parametrize("case", INVALID)
def test_checks_on_the_split_copy_refuse_alike(case, monkeypatch):
    """The checker and ONNX Runtime read model.write_split's copy (the weights in a data file); every refusal is
    the sentence the checks on the model itself give (where no copy can be written, they run on the model)."""
    from ptqlite import validate

    model = _with_large_weight(INVALID[case][0])
    messages = []
    for copy in (True, False):
        if not copy:
            monkeypatch.setattr(validate, "_split_copy", lambda model: None)
        with pytest.raises(ModelError) as caught:
            validate.validate_model(model, "m.onnx")
        messages.append(str(caught.value))
    assert messages[0] == messages[1] == f"m.onnx: {INVALID[case][1]}"


def test_the_runtime_check_on_the_split_copy_says_what_onnx_runtime_says(monkeypatch):
    from ptqlite import validate

    monkeypatch.setattr(validate, "_check_onnx", lambda model, source: None)  # let the model reach the runtime
    with pytest.raises(ModelError) as caught:
        validate.validate_model(_with_large_weight(INVALID["cycle"][0]), "m.onnx")
    assert str(caught.value) == ("m.onnx: onnxruntime cannot load the model as given (This is an invalid model. "
                                 "Error: the graph is not acyclic)")


def test_checks_read_the_split_copy_not_the_model(monkeypatch):
    """Neither check serialises the model: the checker reads the copy's graph file (the weights in its data file),
    ONNX Runtime loads the copy without prepacking; the copy is gone afterwards. A model without output shapes:
    the checker's graph gets the inferred ones, ONNX Runtime loads the model's own."""
    import shutil
    from pathlib import Path

    from ptqlite import runtime, validate

    checked, loaded = [], []
    real_check, real_session = onnx.checker.check_model, runtime.cpu_session
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, **k: checked.append(m) or real_check(m, **k))
    monkeypatch.setattr(validate, "cpu_session",
                        lambda m, *a, **k: loaded.append((m, onnx.load(m, load_external_data=False), k))
                        or real_session(m, *a, **k))
    model = _with_large_weight(matmul())
    assert validate.validate_model(model, "m.onnx") == []
    (file, graph, options), = loaded
    assert checked == [file] and Path(file).name == "model.onnx" and options["prepacking"] is False
    assert [t.data_location for t in graph.graph.initializer] == [TensorProto.DEFAULT, TensorProto.EXTERNAL]
    assert not Path(file).parent.exists()
    shapeless = _with_large_weight(matmul())
    shapeless.graph.output[0].type.tensor_type.ClearField("shape")
    assert validate.validate_model(shapeless, "m.onnx") == []
    assert Path(checked[-1]).name == "checked.onnx" and Path(checked[-1]).parent == Path(loaded[-1][0]).parent
    assert not loaded[-1][1].graph.output[0].type.tensor_type.HasField("shape")
    # the copy validate_with_copy keeps for the caller holds the same model
    notes, copy = validate.validate_with_copy(model, "m.onnx")
    try:
        again = onnx.load(str(copy))
        for tensor in again.graph.initializer:
            tensor.ClearField("data_location")  # set to DEFAULT where onnx read it back
        assert notes == [] and again.SerializeToString() == model.SerializeToString()
    finally:
        shutil.rmtree(copy.parent)


def test_a_model_that_cannot_be_copied_is_checked_in_memory(monkeypatch):
    import tempfile

    from ptqlite import validate

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", no_room)
    assert validate.validate_with_copy(_with_large_weight(matmul()), "m.onnx") == ([], None)
    with pytest.raises(ModelError, match="Incompatible dimensions"):
        validate.validate_model(_with_large_weight(INVALID["wrong shapes"][0]), "m.onnx")

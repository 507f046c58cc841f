"""--fmk=TFLITE and --fmk=TF (SavedModel folder, frozen graph) through tf2onnx, and the refusals of CAFFE and
MINDIR. The conversions need the optional tf extra (TensorFlow + tf2onnx: `make test-frontends`) and skip
without it; the refusals and the file checks made before TensorFlow is imported always run."""

from __future__ import annotations

import os
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import cosine, one_error_line, run, run_cli

from ptqlite import convert, parse_config
from ptqlite.errors import ModelError, UsageError
from ptqlite.frontends import fmk_for_path, graph_ends
from ptqlite.model import load_model

TF_REASON = "needs the optional tf extra (TensorFlow + tf2onnx): pip install -e '.[tf]' or make test-frontends"
SHAPE = (1, 16, 16, 3)
WEIGHT_CFG = "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_channel=0\n"


# -- always: refusals and checks before TensorFlow ---------------------------------------------------------------

@pytest.mark.parametrize("fmk, hint", [("CAFFE", "Caffe"), ("MINDIR", "mindspore.export")])
def test_caffe_and_mindir_say_how_to_export_to_onnx(tmp_path, capsys, fmk, hint):
    model = tmp_path / "m.bin"
    model.write_bytes(b"\0" * 16)
    (tmp_path / "q.cfg").write_text(WEIGHT_CFG)
    code, out, err = run_cli(["convert", f"--fmk={fmk}", f"--modelFile={model}", f"--outputFile={tmp_path}/o",
                              f"--configFile={tmp_path}/q.cfg"], capsys)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith(f"--fmk={fmk}: ptqlite cannot read") and hint in line and "--fmk=ONNX" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("fmk", ["TFLITE", "TF"])
def test_without_the_extra_one_line_names_it(tmp_path, capsys, monkeypatch, fmk):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if not installed: `import tf2onnx` raises ImportError
    if fmk == "TFLITE":
        model = tmp_path / "m.tflite"
        model.write_bytes(b"\x1c\0\0\0TFL3" + b"\0" * 64)  # passes the identifier check, so the import is reached
    else:
        model = tmp_path / "saved"
        model.mkdir()
        (model / "saved_model.pb").write_bytes(b"")
    (tmp_path / "q.cfg").write_text(WEIGHT_CFG)
    code, out, err = run_cli(["convert", f"--fmk={fmk}", f"--modelFile={model}", f"--outputFile={tmp_path}/o",
                              f"--configFile={tmp_path}/q.cfg"], capsys)
    assert code == 2 and out == ""
    assert one_error_line(err).startswith(f"--fmk={fmk} needs tf2onnx and TensorFlow: pip install 'ptqlite[tf]'")


def test_a_file_that_is_not_tflite_is_refused_before_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # the check must not need the extra
    path = tmp_path / "m.tflite"
    path.write_bytes(b"\x08\x01\x12\x04onnx")
    with pytest.raises(ModelError, match=r"m.tflite: not a TFLite model \(no 'TFL3' file identifier"):
        load_model(path, "TFLITE")
    with pytest.raises(ModelError, match="model file not found; --fmk=TFLITE expects a .tflite file"):
        load_model(tmp_path / "missing.tflite", "TFLITE")


def test_tf_paths_are_checked_before_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(ModelError, match="folder without saved_model.pb; --fmk=TF expects a SavedModel"):
        load_model(tmp_path, "TF")
    with pytest.raises(ModelError, match="model file not found; --fmk=TF expects a SavedModel folder or a frozen"):
        load_model(tmp_path / "frozen.pb", "TF")
    fifo = tmp_path / "fifo.pb"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        load_model(fifo, "TF")


def test_fmk_for_path():
    assert fmk_for_path("m.tflite") == "TFLITE"
    assert fmk_for_path("frozen.PB") == "TF"
    assert fmk_for_path("m.onnx") == "ONNX"
    assert fmk_for_path(".") == "TF"  # a folder: a SavedModel


def test_frozen_graph_ends_are_placeholders_and_unread_nodes():
    node = SimpleNamespace
    graph = SimpleNamespace(node=[
        node(name="x", op="Placeholder", input=[]),
        node(name="w", op="Const", input=[]),
        node(name="mm", op="MatMul", input=["x", "w"]),
        node(name="split", op="Split", input=["mm"]),
        node(name="a", op="Relu", input=["split:1", "^w"]),
        node(name="b", op="Identity", input=["split"]),
        node(name="init", op="NoOp", input=[]),
    ])
    assert graph_ends(graph) == (["x:0"], ["a:0", "b:0"])


# -- with the extra: tiny Keras models converted by TensorFlow's own tools ---------------------------------------

@pytest.fixture(scope="module")
def tf_models(tmp_path_factory):
    """A small Keras CNN (conv, depthwise conv, batch norm, ReLU6, pooling, dense) as a SavedModel folder, a
    .tflite file (tf.lite.TFLiteConverter) and a frozen graph, with its Keras outputs on a few inputs."""
    tf = pytest.importorskip("tensorflow", reason=TF_REASON)
    pytest.importorskip("tf2onnx", reason=TF_REASON)
    import keras
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    root = tmp_path_factory.mktemp("tf")
    keras.utils.set_random_seed(0)
    image = keras.Input(SHAPE[1:], batch_size=1, name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(image)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(24, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    net = keras.Model(image, keras.layers.Dense(10)(x))
    # Batch-norm statistics that are not the identity, so folding them is tested.
    bn = next(layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization))
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 1.5, 16), rng.uniform(-0.2, 0.2, 16), rng.uniform(-0.2, 0.2, 16),
                    rng.uniform(0.5, 2.0, 16)])
    saved = root / "saved"
    net.export(str(saved), verbose=False)
    tflite = root / "net.tflite"
    tflite.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())
    func = tf.function(lambda t: net(t)).get_concrete_function(tf.TensorSpec(SHAPE, tf.float32, name="x"))
    frozen = root / "frozen.pb"
    frozen.write_bytes(convert_variables_to_constants_v2(func).graph.as_graph_def().SerializeToString())
    inputs = [rng.uniform(0.0, 1.0, SHAPE).astype(np.float32) for _ in range(8)]
    expected = [np.asarray(net(t)) for t in inputs]
    return SimpleNamespace(root=root, saved=saved, tflite=tflite, frozen=frozen, inputs=inputs, expected=expected)


def tflite_outputs(path, inputs):
    """The .tflite file run in TensorFlow Lite's own interpreter."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    results = []
    for x in inputs:
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"]).copy())
    return results


@pytest.mark.parametrize("kind, fmk", [("tflite", "TFLITE"), ("saved", "TF"), ("frozen", "TF")])
def test_tensorflow_models_load_as_onnx_with_the_same_outputs(tf_models, kind, fmk):
    model = load_model(getattr(tf_models, kind), fmk)
    (name,) = [i.name for i in model.graph.input]
    reference = tflite_outputs(tf_models.tflite, tf_models.inputs) if kind == "tflite" else tf_models.expected
    for x, want in zip(tf_models.inputs, reference):
        np.testing.assert_allclose(run(model, {name: x})[0], want, rtol=1e-4, atol=1e-5)
    if kind == "saved":  # the serving signature's names
        assert name == "image" and [o.name for o in model.graph.output] == ["output_0"]
    if kind == "frozen":  # 'x:0' is named x, as the graph's author wrote it
        assert name == "x"


def test_tflite_weight_quant_through_the_cli(tf_models, tmp_path, capsys):
    (tmp_path / "q.cfg").write_text(WEIGHT_CFG)
    code, out, err = run_cli(["convert", "--fmk=TFLITE", f"--modelFile={tf_models.tflite}",
                              f"--outputFile={tmp_path}/net", f"--configFile={tmp_path}/q.cfg"], capsys)
    assert code == 0, err
    assert "quantized 4 tensors" in out  # three convolutions and the dense layer
    name = load_model(tmp_path / "net.onnx").graph.input[0].name
    reference = tflite_outputs(tf_models.tflite, tf_models.inputs)
    for x, want in zip(tf_models.inputs, reference):
        assert cosine(run(tmp_path / "net.onnx", {name: x})[0], want) > 0.999


@pytest.mark.parametrize("kind, fmk", [("tflite", "TFLITE"), ("saved", "TF")])
def test_full_quant_through_the_cli_with_bin_calibration(tf_models, tmp_path, capsys, kind, fmk):
    model = load_model(getattr(tf_models, kind), fmk)
    name = model.graph.input[0].name
    data = tmp_path / "calib"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i in range(8):
        rng.uniform(0.0, 1.0, SHAPE).astype(np.float32).tofile(data / f"{i}.bin")
    (tmp_path / "full.cfg").write_text(f"""[common_quant_param]
quant_type=FULL_QUANT
bit_num=8
[data_preprocess_param]
calibrate_path={name}:{data}
calibrate_size=8
input_type=BIN
[full_quant_param]
activation_quant_method=MAX_MIN
per_channel=true
""")
    code, _, err = run_cli(["convert", f"--fmk={fmk}", f"--modelFile={getattr(tf_models, kind)}",
                            f"--outputFile={tmp_path}/int8", f"--configFile={tmp_path}/full.cfg"], capsys)
    assert code == 0, err
    quantized = load_model(tmp_path / "int8.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) >= 4
    reference = tflite_outputs(tf_models.tflite, tf_models.inputs) if kind == "tflite" else tf_models.expected
    cosines = [cosine(run(quantized, {name: x})[0], want) for x, want in zip(tf_models.inputs, reference)]
    assert min(cosines) > 0.99, cosines


def test_python_api_takes_a_tflite_path(tf_models):
    result = convert(tf_models.tflite, parse_config(WEIGHT_CFG, "q.cfg"))
    assert len(result.quantized) == 4
    name = result.model.graph.input[0].name
    want = tflite_outputs(tf_models.tflite, tf_models.inputs[:1])[0]
    assert cosine(run(result.model, {name: tf_models.inputs[0]})[0], want) > 0.999


def test_a_quantized_tflite_model_is_refused_as_already_quantized(tf_models, tmp_path):
    """An int8 .tflite file converts to a QDQ graph, which the input rules refuse like any quantized model."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(tf_models.saved))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x] for x in tf_models.inputs)
    path = tmp_path / "int8.tflite"
    path.write_bytes(converter.convert())
    with pytest.raises(ModelError, match="quantiz"):
        convert(path, parse_config(WEIGHT_CFG, "q.cfg"))


def test_quiet_tflite_conversion_prints_nothing(tf_models, tmp_path, capfd):
    """TensorFlow's native notices (the TFLite interpreter that tf2onnx runs writes to fd 2) are dropped."""
    from ptqlite import cli

    (tmp_path / "q.cfg").write_text(WEIGHT_CFG)
    code = cli.main(["convert", "--fmk=TFLITE", f"--modelFile={tf_models.tflite}", f"--outputFile={tmp_path}/net",
                     f"--configFile={tmp_path}/q.cfg", "--quiet"])
    out, err = capfd.readouterr()
    assert code == 0 and out == "" and err == ""


def test_dynamic_batch_tflite_with_input_shape_named_like_tflite(tmp_path, capsys):
    """A Keras model without a fixed batch: the ONNX input keeps a symbolic batch, and --inputShape takes the
    TFLite tensor name with its ':0' (the last ':' separates the dims)."""
    tf = pytest.importorskip("tensorflow", reason=TF_REASON)
    pytest.importorskip("tf2onnx", reason=TF_REASON)
    import keras

    keras.utils.set_random_seed(1)
    image = keras.Input(SHAPE[1:], name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, activation="relu")(image))
    net = keras.Model(image, keras.layers.Dense(4)(x))
    net.export(str(tmp_path / "saved"), verbose=False)
    path = tmp_path / "dyn.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved")).convert())
    (name,) = [i.name for i in load_model(path, "TFLITE").graph.input]
    assert name.endswith(":0")
    batch = load_model(path, "TFLITE").graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch.HasField("dim_value") or batch.dim_value == 0  # symbolic
    (tmp_path / "q.cfg").write_text(WEIGHT_CFG)
    code, out, err = run_cli(["convert", "--fmk=TFLITE", f"--modelFile={path}", f"--outputFile={tmp_path}/o",
                              f"--configFile={tmp_path}/q.cfg", f"--inputShape={name}:1,16,16,3"], capsys)
    assert code == 0, err
    assert f"also runs at {name}:2,16,16,3" in out
    x = np.random.default_rng(0).uniform(0, 1, (3, *SHAPE[1:])).astype(np.float32)
    assert cosine(run(tmp_path / "o.onnx", {name: x})[0], np.asarray(net(x))) > 0.999

"""converter_lite's other flags: benign values accepted (same output as without them), the rest refused in one
line, --fp16=on (float16 storage of the float parts), --inputDataType/--outputDataType INT8/UINT8 (integer
graph inputs and outputs of FULL_QUANT models, with their scales)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import EXAMPLES, cli_workspace, cosine, one_error_line, samples, session
from helpers import run_cli as run
from onnx import TensorProto, helper, numpy_helper

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.fp16 import store_float16
from ptqlite.io_types import METADATA_KEY, quantize_io

WEIGHT_CFG = "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n"


@pytest.fixture
def work(tmp_path):
    return cli_workspace(tmp_path, WEIGHT_CFG, "w8.cfg")


def flags(model, config, output, *extra: str, quiet: bool = True) -> list[str]:
    return ["--fmk=ONNX", f"--modelFile={model}", f"--outputFile={output}", f"--configFile={config}",
            *(["--quiet"] if quiet else []), *extra]


BENIGN = ["--fp16=off", "--optimize=none", "--optimize=general", "--optimize=gpu_oriented",
          "--optimize=ascend_oriented", "--inputDataType=FLOAT32", "--inputDataType=DEFAULT",
          "--outputDataType=FLOAT32", "--outputDataType=DEFAULT", "--encryption=false", "--infer=true",
          "--infer=false", "--trainModel=false"]


def test_benign_converter_lite_flags_give_the_same_output(work, capsys):
    model, config, out = work
    assert run(flags(model, config, out / "plain"), capsys)[0] == 0
    assert run(flags(model, config, out / "lite", *BENIGN), capsys)[0] == 0
    assert (out / "plain.onnx").read_bytes() == (out / "lite.onnx").read_bytes()


@pytest.mark.parametrize("flag, message", [
    ("--fp16=ON", "--fp16=ON: expected one of off, on"),
    ("--optimize=fast", "--optimize=fast: expected one of none, general, gpu_oriented, ascend_oriented"),
    ("--inputDataType=FLOAT16", "--inputDataType=FLOAT16: expected one of DEFAULT, FLOAT32, INT8, UINT8"),
    ("--encryption=true", "--encryption=true: expected one of false (ptqlite does not encrypt models)"),
    ("--trainModel=true", "--trainModel=true: expected one of false (ptqlite converts inference models only)"),
    ("--saveType=MINDIR_LITE", "--saveType=MINDIR_LITE: ptqlite writes ONNX models only (.onnx); drop --saveType"),
    ("--device=Ascend", ("--device=Ascend: ptqlite writes an ONNX model for ONNX Runtime; the int8 preset comes "
                        "from target_device in [full_quant_param]; drop --device")),
    ("--encryptKey=30313233", "--encryptKey=30313233: ptqlite does not encrypt models; drop --encryptKey"),
    ("--decryptKey=30313233", "--decryptKey=30313233: ptqlite reads unencrypted models only; drop --decryptKey"),
    ("--weightFile=m.caffemodel", ("--weightFile=m.caffemodel: --weightFile belongs to Caffe models; ptqlite "
                                  "reads ONNX, so export the model to ONNX")),
    ("--inputDataType=INT8", ("--inputDataType=INT8: needs quant_type=FULL_QUANT in the config (WEIGHT_QUANT keeps "
                             "float activations, so there are no integer codes at the model's boundary)")),
])
def test_other_values_are_refused_in_one_line(work, capsys, flag, message):
    model, config, out = work
    code, stdout, err = run(flags(model, config, out / "m", flag), capsys)
    assert code == 2 and stdout == ""
    assert one_error_line(err) == message
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- --fp16=on


def test_fp16_on_stores_the_unquantized_float_parts_in_float16(work, capsys):
    model, config, out = work
    config.write_text(WEIGHT_CFG + "skip_quant_node=/layer3/layer3.2/conv2/Conv\n")
    assert run(flags(model, config, out / "f32"), capsys)[0] == 0
    code, stdout, _ = run(flags(model, config, out / "f16", "--fp16=on", quiet=False), capsys)
    assert code == 0 and "note: fp16: " in stdout
    f32, f16 = onnx.load(out / "f32.onnx"), onnx.load(out / "f16.onnx")
    halves = [t for t in f16.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert halves and not [t for t in f32.graph.initializer if t.data_type == TensorProto.FLOAT16]
    # the skipped 64x64x3x3 conv weight is float16 now; quantization parameters stay float32
    assert any(tuple(t.dims) == (64, 64, 3, 3) for t in halves)
    saved = (out / "f32.onnx").stat().st_size - (out / "f16.onnx").stat().st_size
    assert saved > 64 * 64 * 9 * 2
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    a, b = session(f32).run(None, {"input": x})[0], session(f16).run(None, {"input": x})[0]
    assert cosine(a, b) > 0.99999
    assert onnx.checker.check_model(f16, full_check=True) is None


def _mask_model() -> onnx.ModelProto:
    """x @ w + mask, with a -1e9 mask (beyond float16) and a bias of 8 elements (too small to pay for a Cast)."""
    rng = np.random.default_rng(0)
    mask = np.where(rng.uniform(size=(4, 32)) > 0.5, -1e9, 0).astype(np.float32)
    inits = [numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w"),
             numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(np.ones(8, np.float32), "small")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "mask"], ["y"]),
             helper.make_node("Add", ["s", "small"], ["t"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16]),
                                           helper.make_tensor_value_info("s", TensorProto.FLOAT, [8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32]),
                               helper.make_tensor_value_info("t", TensorProto.FLOAT, [8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_keeps_values_beyond_float16_and_small_constants_float32():
    model = _mask_model()
    count, saved, too_large = store_float16(model, {"w", "mask", "small"})
    assert (count, saved, too_large) == (1, 16 * 32 * 2, ["mask"])
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types == {"mask": TensorProto.FLOAT, "small": TensorProto.FLOAT, "w_fp16": TensorProto.FLOAT16}
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    y = session(model).run(None, {"x": x, "s": np.zeros(8, np.float32)})[0]
    w = numpy_helper.to_array(_mask_model().graph.initializer[0])
    reference = x @ w.astype(np.float16).astype(np.float32) + numpy_helper.to_array(_mask_model().graph.initializer[1])
    np.testing.assert_allclose(y, reference, rtol=1e-5)


def test_fp16_through_convert_reaches_the_verification_gate():
    config = parse_config("[common_quant_param]\nquant_type=DYNAMIC_QUANT\n")
    result = convert(_mask_model(), config, float16=True)
    assert result.verification is not None and result.verification.outputs
    assert any(n.startswith("fp16: ") for n in result.notes)


# ---------------------------------------------------------------- --inputDataType / --outputDataType


def _full_config(tmp_path, size: int = 8):
    text = (EXAMPLES / "configs" / "full_quant.cfg").read_text()
    text = text.replace("calibrate_path=input:examples/calib/input", f"calibrate_path=input:{EXAMPLES}/calib/input")
    text = text.replace("calibrate_size=100", f"calibrate_size={size}") + "latency_aware=false\n"
    path = tmp_path / "full.cfg"
    path.write_text(text)
    return path


@pytest.mark.parametrize("dtype", ["INT8", "UINT8"])
def test_integer_inputs_and_outputs_of_a_full_quant_model(work, capsys, tmp_path, dtype):
    model, _, out = work
    config = _full_config(tmp_path)
    assert run(flags(model, config, out / "qdq"), capsys)[0] == 0
    code, stdout, _ = run(flags(model, config, out / "int", f"--inputDataType={dtype}",
                                f"--outputDataType={dtype}", quiet=False), capsys)
    assert code == 0
    assert f"note: input 'input' is {dtype.lower()}: float = (input - " in stdout
    assert f"note: output 'logits' is {dtype.lower()}: float = (logits - " in stdout
    q = onnx.load(out / "int.onnx")
    assert onnx.checker.check_model(q, full_check=True) is None
    code_type = TensorProto.INT8 if dtype == "INT8" else TensorProto.UINT8
    assert q.graph.input[0].type.tensor_type.elem_type == code_type
    assert q.graph.output[0].type.tensor_type.elem_type == code_type
    params = {p["kind"]: p for p in json.loads({m.key: m.value for m in q.metadata_props}[METADATA_KEY])}
    assert params["input"]["dtype"] == dtype.lower() and params["input"]["source"] == "the scale of its QuantizeLinear"
    # the input's QuantizeLinear is gone: the first node reads the codes
    assert not any(n.op_type == "QuantizeLinear" and "input" in n.input for n in q.graph.node)
    lo, hi = (-128, 127) if dtype == "INT8" else (0, 255)
    x = np.random.default_rng(0).uniform(-2, 2, (2, 3, 32, 32)).astype(np.float32)
    i, o = params["input"], params["output"]
    codes = np.clip(np.round(x / i["scale"]) + i["zero_point"], lo, hi).astype(dtype.lower())
    y_codes = session(q).run(None, {"input": codes})[0]
    assert y_codes.dtype == np.dtype(dtype.lower())
    y = (y_codes.astype(np.float32) - o["zero_point"]) * o["scale"]
    expected = session(out / "qdq.onnx").run(None, {"input": x})[0]  # the same model with float boundaries
    assert np.abs(y - np.clip(expected, (lo - o["zero_point"]) * o["scale"], (hi - o["zero_point"]) * o["scale"])
                  ).max() <= o["scale"] * 0.5 + 1e-4


def _qdq_model():
    """A FULL_QUANT model whose two outputs are DequantizeLinear(QuantizeLinear(...)), one also read inside."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Add", ["y", "y"], ["z"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 4, 4]) for n in "yz"], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = parse_config("[common_quant_param]\nquant_type=FULL_QUANT\n[data_preprocess_param]\ncalibrate_path="
                          "x:/none\ncalibrate_size=1\ninput_type=BIN\n[full_quant_param]\nlatency_aware=false\n")
    feeds = samples((1, 3, 8, 8), count=4)
    return convert(model, config, samples=feeds, progress=False, verify=False).model, feeds


@pytest.mark.parametrize("dtype", ["INT8", "UINT8"])
def test_quantized_outputs_become_their_codes_exactly(dtype):
    qdq, feeds = _qdq_model()
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    done = quantize_io(model, dtype, dtype, feeds)
    assert {(b.kind, b.tensor, b.source) for b in done} == {
        ("output", "y", "the scale of its QuantizeLinear"), ("output", "z", "the scale of its QuantizeLinear"),
        ("input", "x", "the scale of its QuantizeLinear")}
    assert onnx.checker.check_model(model, full_check=True) is None
    plain = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    exact = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    by = {b.kind + b.tensor: b for b in done}
    for feed in feeds:
        x = by["inputx"]
        lo, hi = (-128, 127) if dtype == "INT8" else (0, 255)
        codes = np.clip(np.round(feed["x"] / x.scale) + x.zero_point, lo, hi).astype(dtype.lower())
        for name, got, want in zip("yz", exact.run(None, {"x": codes}), plain.run(None, feed), strict=True):
            b = by["output" + name]
            np.testing.assert_allclose((got.astype(np.float32) - b.zero_point) * b.scale, want, rtol=0, atol=1e-6)


def test_python_api_keywords_give_the_cli_model(work, capsys, tmp_path):
    """fp16=True, input_data_type/output_data_type: the same code and the same model as the flags."""
    import ptqlite

    model, _, out = work
    config = _full_config(tmp_path, size=4)
    assert run(flags(model, config, out / "cli", "--fp16=on", "--inputDataType=UINT8", "--outputDataType=INT8"),
               capsys)[0] == 0
    api = ptqlite.quantize(str(model), config, progress=False, fp16=True, input_data_type="UINT8",
                           output_data_type="INT8")
    assert api.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert api.SerializeToString() == onnx.load(out / "cli.onnx").SerializeToString()
    weight = tmp_path / "skip.cfg"  # a skipped layer: float parts that --fp16=on stores as float16
    weight.write_text(WEIGHT_CFG + "skip_quant_node=/layer3/layer3.2/conv2/Conv\n")
    assert run(flags(model, weight, out / "cli16", "--fp16=on"), capsys)[0] == 0
    api = ptqlite.quantize(str(model), weight, fp16=True)
    assert any(t.data_type == TensorProto.FLOAT16 for t in api.graph.initializer)
    assert api.SerializeToString() == onnx.load(out / "cli16.onnx").SerializeToString()

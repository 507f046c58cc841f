"""The Python API: model paths or protos, configs as dicts / INI text / paths / dataclasses, in-memory calibration
in every form (the README's example runs in test_readme.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from helpers import RESNET20, conv_model, cosine, run

import ptqlite
from ptqlite.errors import ConfigError, DataError, PtqError, UsageError
from ptqlite.io_types import METADATA_KEY
from ptqlite.progress import known_total

FULL = {"common_quant_param": {"quant_type": "FULL_QUANT", "bit_num": 8}}
INI_FULL = "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n"


def _batches(count=2, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, 3, 16, 16)).astype(np.float32) for _ in range(count)]


def test_dict_config_checked_like_the_ini_with_the_same_message():
    with pytest.raises(ConfigError) as from_dict:
        ptqlite.config_from_dict({"common_quant_param": {"quant_type": "FULL_QUANT", "bit_num": 4}})
    with pytest.raises(ConfigError) as from_ini:
        ptqlite.parse_config("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=4\n", "config dict")
    assert str(from_dict.value) == re.sub(r"^config dict:\d+: ", "config dict: ", str(from_ini.value))
    assert str(from_dict.value) == ("config dict: [common_quant_param] bit_num=4: expected 8 for "
                                    "quant_type=FULL_QUANT")


def test_dict_values_in_python_form():
    config = ptqlite.config_from_dict({
        "common_quant_param": {"quant_type": "WEIGHT_QUANT", "bit_num": 4, "skip_quant_node": ["a", "b"]},
        "data_preprocess_param": {"calibrate_path": {"x": "/data/x"}, "calibrate_size": 10, "input_type": "IMAGE",
                                  "normalize_mean": [1, 2, 3], "normalize_std": [4, 5, 6]},
        "full_quant_param": {"per_channel": False}})
    assert config.common.skip_quant_node == ("a", "b")
    assert config.data.calibrate_path == (("x", "/data/x"),) and config.data.normalize_std == (4, 5, 6)
    assert config.full.per_channel is False
    with pytest.raises(ConfigError, match=r"config dict: \[full_quant_param\] per_channel=maybe"):
        ptqlite.config_from_dict({"common_quant_param": {"quant_type": "WEIGHT_QUANT"},
                                  "full_quant_param": {"per_channel": "maybe"}})


def test_full_quant_from_batches_needs_no_calibrate_path():
    model = conv_model()
    result = ptqlite.convert(model, FULL, calibration=_batches(), progress=False)
    assert any("8 samples" in note for note in result.notes)  # 2 batches of 4 split into 8 samples
    sample = {"x": _batches(1, 1, seed=5)[0]}
    assert cosine(run(model, sample)[0], run(result.model, sample)[0]) > 0.99


@pytest.mark.parametrize("form", ["list_of_dicts", "generator_function", "generator_object", "single_arrays",
                                  "tensor_like", "ini_text", "dataclass"])
def test_calibration_and_config_forms_give_the_same_model(form):
    model = conv_model()
    arrays = [b[i:i + 1] for b in _batches() for i in range(4)]
    reference = ptqlite.quantize(model, FULL, calibration=[{"x": a} for a in arrays], progress=False)

    class Tensor:  # what torch tensors offer, without torch
        def __init__(self, value):
            self.value, self.shape = value, value.shape

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.value

    config = FULL
    calibration = {
        "list_of_dicts": [{"x": a} for a in arrays],
        "generator_function": lambda: (a for a in arrays),
        "generator_object": (a for a in arrays),
        "single_arrays": [a[0] for a in arrays],  # without the batch axis
        "tensor_like": [Tensor(a) for a in arrays],
        "ini_text": arrays,
        "dataclass": arrays,
    }[form]
    if form == "ini_text":
        config = INI_FULL
    elif form == "dataclass":
        config = ptqlite.parse_config(INI_FULL, samples_given=True)
    quantized = ptqlite.quantize(model, config, calibration=calibration, progress=False)
    assert quantized.SerializeToString() == reference.SerializeToString()


def test_transform_maps_each_item():
    model = conv_model()
    items = [("label", b) for b in _batches()]
    direct = ptqlite.quantize(model, FULL, calibration=_batches(), progress=False)
    mapped = ptqlite.quantize(model, FULL, calibration=items, transform=lambda item: item[1], progress=False)
    assert mapped.SerializeToString() == direct.SerializeToString()


def test_model_path_and_config_path(tmp_path):
    config = tmp_path / "w8.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n")
    from_path = ptqlite.quantize(str(RESNET20), config)
    from_proto = ptqlite.quantize(onnx.load(str(RESNET20)), str(config))
    assert from_path.SerializeToString() == from_proto.SerializeToString()


def test_wrong_argument_types_and_unknown_options():
    with pytest.raises(TypeError, match="model: expected a path or an onnx.ModelProto"):
        ptqlite.convert(42, FULL)
    with pytest.raises(TypeError, match="config: expected"):
        ptqlite.convert(conv_model(), 3.5)
    with pytest.raises(TypeError):
        ptqlite.convert(conv_model(), FULL, calibration=_batches(), smaples=[])
    with pytest.raises(TypeError, match="calibration: expected"):
        ptqlite.convert(conv_model(), FULL, calibration=7)


def test_empty_calibration_and_multi_input_arrays_say_why():
    with pytest.raises(DataError, match="no samples"):
        ptqlite.convert(conv_model(), FULL, calibration=lambda: iter([]), progress=False)
    two_inputs = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["a", "b"], ["c"])], "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4]) for n in "ab"],
        [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 4])]))
    data = ptqlite.CalibrationData([np.zeros((1, 4), np.float32)], two_inputs)
    with pytest.raises(DataError, match="2 inputs"):
        list(data)


# ---------------------------------------------------------------- converter_lite's flags as keywords


def test_fp16_keyword_stores_the_unquantized_float_parts_in_float16():
    model = conv_model()
    config = {"common_quant_param": {"quant_type": "WEIGHT_QUANT", "bit_num": 8, "skip_quant_node": ["conv2"]}}
    f32 = ptqlite.quantize(model, config)
    f16 = ptqlite.quantize(model, config, fp16=True)
    halves = {t.name: t for t in f16.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert "w2_fp16" in halves and not any(t.data_type == onnx.TensorProto.FLOAT16 for t in f32.graph.initializer)
    w2 = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(halves["w2_fp16"]), w2.astype(np.float16))
    assert f16.ByteSize() < f32.ByteSize() - w2.size * 2 + 200  # the Cast node costs a few bytes
    sample = {"x": _batches(1, 1, seed=3)[0]}
    a, b = run(f32, sample)[0], run(f16, sample)[0]
    assert cosine(a, b) > 0.99999
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-3 * float(np.abs(a).max()))


@pytest.mark.parametrize("input_type, output_type", [("UINT8", "INT8"), ("INT8", "FLOAT32")])
def test_integer_inputs_and_outputs_from_in_memory_calibration(input_type, output_type):
    model = conv_model()
    qdq = ptqlite.quantize(model, FULL, calibration=_batches(), progress=False)
    result = ptqlite.convert(model, FULL, calibration=_batches(), progress=False, input_data_type=input_type,
                             output_data_type=output_type)
    q = result.model
    assert onnx.checker.check_model(q, full_check=True) is None
    types = {"INT8": onnx.TensorProto.INT8, "UINT8": onnx.TensorProto.UINT8, "FLOAT32": onnx.TensorProto.FLOAT}
    assert q.graph.input[0].type.tensor_type.elem_type == types[input_type]
    assert q.graph.output[0].type.tensor_type.elem_type == types[output_type]
    params = {p["kind"]: p for p in json.loads({m.key: m.value for m in q.metadata_props}[METADATA_KEY])}
    assert set(params) == ({"input", "output"} if output_type != "FLOAT32" else {"input"})
    assert params["input"]["dtype"] == input_type.lower()
    assert any(n.startswith(f"input 'x' is {input_type.lower()}: float = (x - ") for n in result.notes)
    x = _batches(1, 1, seed=7)[0]
    i = params["input"]
    lo, hi = (-128, 127) if input_type == "INT8" else (0, 255)
    codes = np.clip(np.round(x / i["scale"]) + i["zero_point"], lo, hi).astype(input_type.lower())
    y = run(q, {"x": codes})[0]
    expected = run(qdq, {"x": x})[0]  # the same model with float boundaries
    if output_type == "FLOAT32":
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    else:
        o = params["output"]
        assert y.dtype == np.int8
        y = (y.astype(np.float32) - o["zero_point"]) * o["scale"]
        assert np.abs(y - np.clip(expected, (-128 - o["zero_point"]) * o["scale"], (127 - o["zero_point"]) * o["scale"])
                      ).max() <= o["scale"] * 0.5 + 1e-4


@pytest.mark.parametrize("options, message", [
    ({"input_data_type": "FLOAT16"}, "input_data_type=FLOAT16: expected one of DEFAULT, FLOAT32, INT8, UINT8"),
    ({"output_data_type": "int8"}, "output_data_type=int8: expected one of DEFAULT, FLOAT32, INT8, UINT8"),
    ({"fp16": "on"}, "fp16='on': expected True or False"),
    ({"output_data_type": "INT8", "config": {"common_quant_param": {"quant_type": "WEIGHT_QUANT"}}},
     ("output_data_type=INT8: needs quant_type=FULL_QUANT in the config (WEIGHT_QUANT keeps float activations, so "
      "there are no integer codes at the model's boundary)")),
])
def test_converter_lite_keywords_refused_in_one_line(options, message):
    config = options.pop("config", FULL)
    with pytest.raises(UsageError) as error:
        ptqlite.convert(conv_model(), config, calibration=_batches(), progress=False, **options)
    assert isinstance(error.value, PtqError) and str(error.value) == message


# ---------------------------------------------------------------- progress bars


def test_progress_bars_know_their_total_for_a_list(monkeypatch, tmp_path):
    import ptqlite.progress

    totals: list[tuple[str, int | None]] = []
    real = ptqlite.progress.progress_bar

    def recording(total, desc, enabled=None, unit="step"):
        totals.append((desc, total))
        return real(total, desc, False, unit)

    monkeypatch.setattr(ptqlite.progress, "progress_bar", recording)
    config = {"common_quant_param": {"quant_type": "FULL_QUANT", "bit_num": 8,
                                     "debug_info_save_path": str(tmp_path / "reports")}}
    ptqlite.convert(conv_model(), config, calibration=_batches(count=3, batch=4), progress=True)
    assert totals and ("debug reports", 12) in totals  # 3 batches of 4 split into 12 samples
    assert all(total == 12 for desc, total in totals if desc != "debug reports"), totals
    # a callable gives no length up front: the bars know the total once one pass has counted the samples
    data = ptqlite.CalibrationData(lambda: iter(_batches(count=3, batch=4)), conv_model())
    assert known_total(data) is None
    assert len(list(data)) == 12 and known_total(data) == 12

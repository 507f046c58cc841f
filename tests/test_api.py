"""The Python API: model paths or protos, configs as dicts / INI text / paths / dataclasses, in-memory calibration
in every form (the README's example runs in test_readme.py)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from helpers import RESNET20, conv_model, cosine, run

import ptqlite
from ptqlite.errors import ConfigError, DataError

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

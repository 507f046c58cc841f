"""The block search weighted by calibration activations ([weight_quant_param] activation_weighted, block_size)."""

import numpy as np
import onnx
import pytest
from helpers import session
from onnx import TensorProto, helper, numpy_helper

from ptqlite import api
from ptqlite.activation_weights import channel_mean_squares
from ptqlite.config import parse_config
from ptqlite.convert import convert

K, N, LOUD = 64, 48, 5


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    w[rng.random(w.shape) < 0.02] *= 6  # outliers: the plain search clips them, costing the loud channel most
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "awq",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _samples(count: int = 32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((count, 1, K)).astype(np.float32)
    x[:, :, LOUD] *= 40.0  # one input channel of large activations, as transformers have
    return [{"x": s} for s in x]


def _config(extra: str = "", data: str = "", strategy: str = "dequant_strategy=ON_THE_FLY\n"):
    return parse_config("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=4\n[weight_quant_param]\n"
                        f"{strategy}block_size=16\n{extra}{data}", "test.cfg")


def _output_error(model: onnx.ModelProto, samples) -> float:
    float_run, quant_run = session(_model()), session(model)
    return float(sum(np.sum((quant_run.run(None, s)[0] - float_run.run(None, s)[0]) ** 2) for s in samples))


def test_channel_mean_squares_are_the_activations_mean_squares():
    samples = _samples(8)
    squares = channel_mean_squares(_model(), {"w"}, samples)
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    np.testing.assert_allclose(squares["w"], np.mean(x ** 2, axis=0), rtol=1e-12)


@pytest.mark.parametrize("strategy", ["dequant_strategy=ON_THE_FLY\n", ""], ids=["on_the_fly", "default"])
def test_calibration_samples_lower_the_layers_output_error(strategy):
    samples = _samples()
    plain = convert(_model(), _config(strategy=strategy), verify=False)
    weighted = api.convert(_model(), _config(strategy=strategy), samples, verify=False)
    assert any(n.startswith("activation-weighted block search: 1 of 1") for n in weighted.notes)
    plain_error, weighted_error = _output_error(plain.model, samples), _output_error(weighted.model, samples)
    assert weighted_error < 0.8 * plain_error, (weighted_error, plain_error)


def test_calibrate_path_files_weight_the_search_too(tmp_path):
    samples = _samples(8)
    for i, s in enumerate(samples):
        s["x"].tofile(tmp_path / f"{i:02d}.bin")
    data = f"[data_preprocess_param]\ncalibrate_path=x:{tmp_path}\ncalibrate_size=8\ninput_type=BIN\n"
    from_files = convert(_model(), _config(data=data), verify=False).model
    in_memory = api.convert(_model(), _config(), samples, verify=False).model
    assert from_files.SerializeToString() == in_memory.SerializeToString()


def test_activation_weighted_false_or_no_data_leaves_the_output_unchanged():
    plain = convert(_model(), _config(), verify=False).model.SerializeToString()
    off = api.convert(_model(), _config("activation_weighted=false\n"), _samples(), verify=False)
    assert off.model.SerializeToString() == plain
    assert not any("activation-weighted" in n for n in off.notes)
    assert _config().weight.activation_weighted is True

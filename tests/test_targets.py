"""target_device presets: each produces a model that onnxruntime (CPU) loads, close to float, with the
parameters the target asks for."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cosine
from onnx import TensorProto, numpy_helper
from test_full_quant import _config, conv_model, depthwise_model, outputs, samples

from ptqlite.convert import convert
from ptqlite.targets import PRESETS, target


def _inits(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("per_channel", [True, False])
def test_every_preset_loads_and_stays_close_to_float(name, per_channel):
    model = conv_model()
    evaluate = samples((1, 3, 16, 16), 6, seed=11)
    result = convert(model, _config(target=name, per_channel=per_channel, bias_correction=True),
                     samples=samples((1, 3, 16, 16)), progress=False)
    reference = outputs(model, evaluate)
    assert cosine(reference, outputs(result.model, evaluate, fused=False)) > 0.995
    # With this CPU's int8 kernels: the CPU preset is built for them; the others target other runtimes and only
    # need to load and run here.
    assert cosine(reference, outputs(result.model, evaluate)) > (0.98 if name == "CPU" else 0.9)


def test_nvgpu_is_symmetric_with_zero_points_at_zero():
    result = convert(conv_model(), _config(target="NVGPU"), samples=samples((1, 3, 16, 16)), progress=False)
    inits = _inits(result.model)
    activation_zeros = [v for k, v in inits.items() if k.endswith("_zero_point") and v.dtype == np.int8]
    assert activation_zeros and all(not v.any() for v in activation_zeros)
    # TensorRT fuses Conv+ReLU itself: the Relu nodes stay (a symmetric quantizer cannot clamp at 0).
    assert sum(n.op_type == "Relu" for n in result.model.graph.node) == 2
    assert inits["x_zero_point"].dtype == np.int8


def test_cpu_uses_uint8_activations_and_int8_weights():
    result = convert(conv_model(), _config(), samples=samples((1, 3, 16, 16)), progress=False)
    inits = {t.name: t for t in result.model.graph.initializer}
    assert inits["x_zero_point"].data_type == TensorProto.UINT8
    assert inits["w1_quantized"].data_type == TensorProto.INT8
    assert not numpy_helper.to_array(inits["w1_zero_point"]).any()


def test_dsp_per_tensor_weights_are_uint8_asymmetric():
    model = depthwise_model(relu6=False)
    result = convert(model, _config(target="DSP", per_channel=False), samples=samples((1, 4, 8, 8), low=0.0),
                     progress=False)
    inits = {t.name: t for t in result.model.graph.initializer}
    assert inits["w1_quantized"].data_type == TensorProto.UINT8
    assert numpy_helper.to_array(inits["w1_scale"]).size == 1


def test_presets_are_data():
    for name, preset in PRESETS.items():
        assert target(name) is preset and preset.name == name
        assert preset.activation_type in (TensorProto.UINT8, TensorProto.INT8)
        assert {"Conv", "MatMul", "Gemm", "Add"} <= preset.compute_ops
        assert not preset.compute_ops & preset.shared_ops
    assert PRESETS["NVGPU"].activation_symmetric and not PRESETS["CPU"].activation_symmetric

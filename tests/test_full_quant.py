"""FULL_QUANT: QDQ graph structure, accuracy against float, bias correction, CLE, skip_quant_node, ResNet20."""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import (
    ROOT,
    conv_model,
    cosine,
    depthwise_model,
    full_config,
    initializer,
    masked_attention_model,
    outputs,
    samples,
    session,
)
from onnx import TensorProto, helper, numpy_helper

from ptqlite.config import load_config
from ptqlite.convert import convert
from ptqlite.equalize import capped_tensors, equalize
from ptqlite.prepare import fold_batch_norm, fold_constants

RNG = np.random.default_rng(0)


def matmul_model(seed: int = 11) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    rng = np.random.default_rng(seed)
    inits = [initializer("w", rng.normal(0, 0.2, (32, 64))), initializer("b", rng.normal(0, 0.1, 64)),
             initializer("w2", rng.normal(0, 0.2, (64, 8)))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    path = tmp_path / "optimized.onnx"
    session(model, optimized_path=path, intra_op_num_threads=1)
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_conv_graph_runs_int8_end_to_end(tmp_path):
    model = conv_model()
    calib, evaluate = samples((1, 3, 16, 16)), samples((1, 3, 16, 16), 8, seed=2)
    result = convert(model, full_config(), samples=calib, progress=False)
    ops = optimized_ops(result.model, tmp_path)
    # Every conv, the residual add, the average pool and the classifier run on integer kernels.
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    assert ops["QGemm"] == 1
    assert ops["Conv"] == 0 and ops["Add"] == 0 and ops["Gemm"] == 0 and ops["Relu"] == 0
    # Both Relu are folded into their producers' output quantizers.
    assert not any(n.op_type == "Relu" for n in result.model.graph.node)
    reference = outputs(model, evaluate)
    assert cosine(reference, outputs(result.model, evaluate, fused=False)) > 0.999
    assert cosine(reference, outputs(result.model, evaluate)) > 0.99
    # Weights are int8 behind a per-channel DequantizeLinear, biases int32.
    inits = {t.name: t for t in result.model.graph.initializer}
    assert inits["w1_quantized"].data_type == TensorProto.INT8
    assert inits["b1_quantized"].data_type == TensorProto.INT32
    assert [i.name for i in result.model.graph.output] == ["y"]


def test_bias_scale_is_input_scale_times_weight_scale():
    model = conv_model()
    result = convert(model, full_config(), samples=samples((1, 3, 16, 16)), progress=False)
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_allclose(inits["b1_scale"], inits["x_scale"] * inits["w1_scale"], rtol=1e-6)
    b1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b1"))
    np.testing.assert_allclose(inits["b1_quantized"] * inits["b1_scale"], b1, atol=inits["b1_scale"].max())


def test_matmul_model_quantized(tmp_path):
    model = matmul_model()
    calib, evaluate = samples((1, 4, 32)), samples((1, 4, 32), 8, seed=3)
    result = convert(model, full_config(), samples=calib, progress=False)
    ops = optimized_ops(result.model, tmp_path)
    assert ops["MatMul"] == 0  # both MatMuls run on integer kernels
    assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] + ops["DynamicQuantizeMatMul"] >= 1
    reference = outputs(model, evaluate)
    assert cosine(reference, outputs(result.model, evaluate, fused=False)) > 0.999
    assert cosine(reference, outputs(result.model, evaluate)) > 0.99


def test_deterministic():
    model = conv_model()
    first = convert(model, full_config("KL", bias_correction=True), samples=samples((1, 3, 16, 16)), progress=False).model
    second = convert(model, full_config("KL", bias_correction=True), samples=samples((1, 3, 16, 16)), progress=False).model
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True)


# On these uniform inputs KL's threshold cut the input's range (cosine 0.90); it now falls back to MAX_MIN's.
@pytest.mark.parametrize("method,bound", [("MAX_MIN", 0.995), ("KL", 0.995), ("REMOVAL_OUTLIER", 0.995)])
def test_activation_methods(method, bound):
    model = conv_model()
    evaluate = samples((1, 3, 16, 16), 8, seed=2)
    result = convert(model, full_config(method), samples=samples((1, 3, 16, 16)), progress=False)
    assert cosine(outputs(model, evaluate), outputs(result.model, evaluate, fused=False)) > bound


def head_model(seed: int = 0) -> onnx.ModelProto:
    """A detector-like head: Conv+Relu, then a 1x1 Conv whose output map is near 0 except where an object is."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="head")]
    inits = [initializer("w1", rng.normal(0, 0.3, (8, 4, 3, 3))), initializer("b1", np.zeros(8)),
             initializer("w2", rng.normal(0, 0.3, (4, 8, 1, 1))), initializer("b2", np.zeros(4))]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def scenes(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Background noise with one bright 2x2 object per image: 0.4% of the values carry the signal."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.normal(0, 0.3, (1, 4, 32, 32)).astype(np.float32)
        i, j = rng.integers(0, 31, 2)
        x[0, :, i:i + 2, j:j + 2] += rng.uniform(15, 25, (4, 1, 1))
        feeds.append({"x": x})
    return feeds


def test_kl_keeps_the_rare_values_a_detector_head_needs():
    """KL used to clip the objects away (output cosine 0.89 against MAX_MIN's 0.998); the clipped ranges now fall
    back to MAX_MIN's where clipping costs more than it saves, and the summary says how many did."""
    model = head_model()
    evaluate = scenes(8, seed=2)
    reference = outputs(model, evaluate, fused=False)
    result = convert(model, full_config("KL"), samples=scenes(16, seed=1), progress=False)
    assert cosine(reference, outputs(result.model, evaluate, fused=False)) > 0.99
    assert any(note.startswith("KL: ") and "fell back to MAX_MIN ranges" in note for note in result.notes)
    max_min = convert(model, full_config("MAX_MIN"), samples=scenes(16, seed=1), progress=False)
    assert not any("fell back" in note for note in max_min.notes)


def test_equalize_keeps_the_function_and_balances_ranges():
    model = depthwise_model()
    # Inputs up to 4 drive many activations past the ReLU6 cap: the per-channel Min must reproduce it.
    feeds = [{"x": f["x"] * 4} for f in samples((1, 4, 8, 8), 4, low=0.0)]
    reference = outputs(model, feeds)
    equalized = onnx.ModelProto()
    equalized.CopyFrom(model)
    notes = equalize(equalized)
    # The depthwise conv pairs with the conv before it only: one pair, one capped ReLU6.
    assert "1 conv pairs" in notes[0] and "1 ReLU6" in notes[1]
    assert [n.op_type for n in equalized.graph.node] == ["Conv", "Relu", "Min", "Conv", "Clip", "Conv"]
    np.testing.assert_allclose(outputs(equalized, feeds), reference, rtol=1e-4, atol=1e-4)
    w2 = numpy_helper.to_array(next(t for t in equalized.graph.initializer if t.name == "w2"))
    ranges = np.abs(w2).reshape(16, -1).max(1)
    assert ranges.max() / ranges.min() < 40  # was ~1000 before: the spread is shared with the first conv
    # The caps matter on these inputs: with plain ReLUs the model computes something else.
    relu = onnx.ModelProto()
    relu.CopyFrom(model)
    for node in relu.graph.node:
        if node.op_type == "Clip":
            del node.input[1:]
            node.op_type = "Relu"
    assert np.abs(outputs(relu, feeds) - reference).max() > 0.1


def test_equalize_zeroes_weights_behind_dead_channels():
    """A channel with zero weights and a negative bias is 0 after the ReLU: the next conv's weights on it are
    zeroed (exactly the same function) instead of dominating its per-tensor range."""
    model = depthwise_model()
    inits = {t.name: t for t in model.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(inits[n]).copy() for n in ("w1", "b1", "w2"))
    w1[3], b1[3], w2[3] = 0.0, -0.5, 500.0
    for name, value in (("w1", w1), ("b1", b1), ("w2", w2)):
        inits[name].CopyFrom(initializer(name, value))
    feeds = samples((1, 4, 8, 8), 4, low=0.0)
    reference = outputs(model, feeds)
    equalize(model)
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))
    assert not w2[3].any()
    np.testing.assert_allclose(outputs(model, feeds), reference, rtol=1e-4, atol=1e-4)


def test_per_tensor_with_equalisation_beats_plain_per_tensor(monkeypatch):
    model = depthwise_model(relu6=False)
    # Every depthwise channel matters as much to the output: per tensor, the small ones round to zero.
    inits = {t.name: t for t in model.graph.initializer}
    spread = np.logspace(-1.5, 1.5, 16).reshape(1, -1, 1, 1)
    inits["w3"].CopyFrom(initializer("w3", np.random.default_rng(7).normal(0, 0.3, (8, 16, 1, 1)) / np.sqrt(spread)))
    inits["b2"].CopyFrom(initializer("b2", np.zeros(16)))
    calib, evaluate = samples((1, 4, 8, 8), low=0.0), samples((1, 4, 8, 8), 8, seed=5, low=0.0)
    reference = outputs(model, evaluate)
    with_cle = convert(model, full_config(per_channel=False), samples=calib, progress=False)
    assert any("equalisation" in n for n in with_cle.notes)
    from ptqlite.passes import full

    monkeypatch.setattr(full, "equalize", lambda m, **_: [])
    without = convert(model, full_config(per_channel=False), samples=calib, progress=False)
    good = cosine(reference, outputs(with_cle.model, evaluate, fused=False))
    bad = cosine(reference, outputs(without.model, evaluate, fused=False))
    assert good > bad + 0.002
    scales = numpy_helper.to_array(next(t for t in with_cle.model.graph.initializer if t.name == "w2_scale"))
    assert scales.size == 1  # per tensor


def test_bias_correction_reduces_mean_error():
    """Weights at n + 0.45 steps of their scale all round down: a systematic per-channel error that bias
    correction removes (created bias included: the conv has none)."""
    steps = RNG.integers(-126, 126, (8, 4, 3, 3)) + 0.45
    steps[:, 0, 0, 0] = 127  # pins each channel's scale to exactly 1 step
    w = (steps * 0.01).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "bc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [initializer("w", w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib, evaluate = samples((1, 4, 8, 8), low=0.0), samples((1, 4, 8, 8), 8, seed=7, low=0.0)
    reference = outputs(model, evaluate)

    def channel_error(config) -> float:
        quantized = convert(model, config, samples=calib, progress=False).model
        diff = outputs(quantized, evaluate, fused=False) - reference
        return float(np.abs(diff.mean(axis=(0, 1, 3, 4))).mean())

    plain, corrected = channel_error(full_config()), channel_error(full_config(bias_correction=True))
    assert corrected < plain / 4, (plain, corrected)


def test_skip_quant_node_keeps_float_with_boundaries(caplog):
    model = conv_model()
    evaluate = samples((1, 3, 16, 16), 4, seed=2)
    with caplog.at_level(logging.WARNING):
        result = convert(model, full_config(skip="conv2,conv_2x"), samples=samples((1, 3, 16, 16)), progress=False)
    assert "conv_2x" in caplog.text and "conv2" in caplog.text  # unknown name, with the near match
    graph = result.model.graph
    conv2 = next(n for n in graph.node if n.name == "conv2")
    producers = {o: n for n in graph.node for o in n.output}
    assert conv2.input[1] == "w2" and conv2.input[2] == "b2"  # float weight and bias
    assert producers[conv2.input[0]].op_type == "DequantizeLinear"  # reads the int8 tensor through a DQ
    # Its float output is quantized again for the int8 Add after it.
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == conv2.output[0] for n in graph.node)
    assert any(s.reason.startswith("skip_quant_node") for s in result.skipped)
    assert cosine(outputs(model, evaluate), outputs(result.model, evaluate)) > 0.99


def test_prepare_folds_batch_norm_and_constants():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Add", ["k1", "k2"], ["k"], name="const_add"),
             helper.make_node("Mul", ["bn", "k"], ["y"], name="mul")]
    inits = [initializer("w", RNG.normal(0, 1, (4, 2, 1, 1))), initializer("g", RNG.uniform(0.5, 2, 4)),
             initializer("b", RNG.normal(0, 1, 4)), initializer("m", RNG.normal(0, 1, 4)), initializer("v", RNG.uniform(0.5, 2, 4)),
             initializer("k1", np.array([2.0])), initializer("k2", np.array([1.0]))]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = samples((1, 2, 3, 3), 2)
    reference = outputs(model, feeds)
    assert fold_constants(model) == 1 and fold_batch_norm(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv", "Mul"]
    np.testing.assert_allclose(outputs(model, feeds), reference, rtol=1e-5, atol=1e-5)


def test_resnet20_with_bundled_images(tmp_path, monkeypatch):
    """The bundled config: IMAGE calibration of the bundled ResNet20 on the bundled PNGs."""
    import cv2

    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "examples" / "configs" / "full_quant.cfg")
    model = onnx.load(str(ROOT / "examples" / "models" / "resnet20_cifar10.onnx"))
    result = convert(model, config, progress=False)
    files = sorted((ROOT / "examples" / "calib" / "input").glob("*.png"))[:40]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    feeds = [{"input": (((cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) / 255.0 - mean) / std)
                        .astype(np.float32).transpose(2, 0, 1)[None])} for f in files]
    labels = np.array([int(f.stem.split("_")[1]) for f in files])
    reference = outputs(model, feeds)[:, 0]
    fake, fused = outputs(result.model, feeds, fused=False)[:, 0], outputs(result.model, feeds)[:, 0]
    assert cosine(reference, fake) > 0.998
    # The int8 kernels of CPUs without VNNI saturate some u8*s8 sums (docs/full_quant.md), hence the looser bound.
    assert cosine(reference, fused) > 0.97
    assert (fake.argmax(1) == labels).mean() >= (reference.argmax(1) == labels).mean() - 0.05
    ops = optimized_ops(result.model, tmp_path)
    assert ops["QLinearConv"] == 19 and ops["QLinearAdd"] == 9 and ops["QGemm"] == 1
    assert ops["Conv"] == 0 and ops["Add"] == 0


def test_gemm_output_reaching_the_graph_output_stays_float():
    """Gemm -> Reshape -> Identity -> output: the logits are not quantized (the shape ops stay float); the same
    chain after a Conv is quantized (onnxruntime has no int8 Conv with float output)."""
    def head(op: str) -> onnx.ModelProto:
        weighted = (helper.make_node("Gemm", ["r1", "w2", "b2"], ["c2"], name="logits", transB=1) if op == "Gemm"
                    else helper.make_node("Conv", ["r1_4d", "w2", "b2"], ["c2"], name="logits"))
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["c1"], name="fc1", transB=1),
                 helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                 helper.make_node("Reshape", ["r1", "shape"], ["r1_4d"], name="to_4d") if op == "Conv" else None,
                 weighted,
                 helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
                 helper.make_node("Identity", ["f"], ["y"], name="identity")]
        nodes = [n for n in nodes if n is not None]
        w2 = RNG.normal(0, 0.3, (10, 8) if op == "Gemm" else (10, 8, 1, 1))
        inits = [initializer("w1", RNG.normal(0, 0.3, (8, 6))), initializer("b1", RNG.normal(0, 0.1, 8)),
                 initializer("w2", w2), initializer("b2", RNG.normal(0, 0.1, 10)),
                 numpy_helper.from_array(np.array([1, 8, 1, 1], np.int64), "shape")]
        graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    for op, expected in (("Gemm", {"x", "r1"}), ("Conv", {"x", "r1", "c2"})):
        model = head(op)
        result = convert(model, full_config(), samples=samples((1, 6)), progress=False)
        quantized = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
        assert quantized - {"r1_4d", "f", "y_float"} == expected, op
        evaluate = samples((1, 6), 8, seed=4)
        assert cosine(outputs(model, evaluate), outputs(result.model, evaluate)) > 0.99


def test_relu_after_a_skipped_conv_stays_float():
    """Quantizing the unbounded input of a Relu whose producer is float would waste codes on clipped values."""
    result = convert(conv_model(), full_config(skip="conv1"), samples=samples((1, 3, 16, 16)), progress=False)
    quantized = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    assert "c1" not in quantized and "r1" in quantized


def test_equalize_with_channel_maxima_keeps_one_clip():
    """With calibration maxima the ReLU6 stays one Clip (no float Min): exact on the calibration data, since the
    channels reaching 6 share one scale and the others stay under the new bound."""
    from ptqlite.passes.full import channel_max

    model = depthwise_model()
    feeds = [{"x": f["x"] * 10} for f in samples((1, 4, 8, 8), 4, low=0.0)]
    reference = outputs(model, feeds)
    equalized = onnx.ModelProto()
    equalized.CopyFrom(model)
    names = capped_tensors(equalized)
    assert names == ["c1"]
    peaks, _ = channel_max(equalized, names, feeds, False)
    assert 0 < (peaks["c1"] >= 6).sum() < 16  # some channels reach the cap, some do not
    notes = equalize(equalized, channel_max=peaks)
    assert "1 ReLU6" in notes[-1] and "one Clip" in notes[-1]
    assert [n.op_type for n in equalized.graph.node] == ["Conv", "Clip", "Conv", "Clip", "Conv"]
    inits = {t.name: numpy_helper.to_array(t) for t in equalized.graph.initializer}
    first, second = (n for n in equalized.graph.node if n.op_type == "Clip")
    assert float(inits[first.input[2]]) != 6.0 and float(inits[second.input[2]]) == 6.0  # "hi" is shared
    np.testing.assert_allclose(outputs(equalized, feeds), reference, rtol=1e-4, atol=1e-4)


def test_per_tensor_relu6_model_has_no_float_min():
    """Per tensor, the ReLU6 between equalised convs is folded into the int8 conv: no Min runs in float."""
    model = depthwise_model()
    calib, evaluate = samples((1, 4, 8, 8), low=0.0), samples((1, 4, 8, 8), 8, seed=5, low=0.0)
    result = convert(model, full_config(per_channel=False), samples=calib, progress=False)
    ops = {n.op_type for n in result.model.graph.node}
    assert "Min" not in ops and "Relu" not in ops
    assert cosine(outputs(model, evaluate), outputs(result.model, evaluate, fused=False)) > 0.99


def masked_attention_samples(rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    """Inputs of masked_attention_model: random tokens, the last 1-4 of 8 positions padded (mask 0)."""
    feeds = []
    for _ in range(count):
        mask = np.ones((1, 1, 8), np.float32)
        mask[..., rng.integers(4, 8):] = 0
        feeds.append({"x": rng.normal(0, 1, (1, 8, 16)).astype(np.float32), "mask": mask})
    return feeds


def test_attention_mask_and_softmax_stay_float():
    """The masked scores feed a float Softmax, so nothing int8 reads them: no quantizer may take the mask's
    -3.4e38 into its range (that made every score 0 and the output garbage)."""
    model = masked_attention_model()
    rng = np.random.default_rng(5)
    calib = masked_attention_samples(rng, 8)
    quant = convert(model, full_config(), samples=calib, progress=False).model
    quantized = {node.input[0] for node in quant.graph.node if node.op_type == "QuantizeLinear"}
    assert not quantized & {"masked", "bias", "ss", "s", "inv"}
    assert {"x", "p"} <= quantized  # the projections' input and the probabilities stay int8
    float_s, quant_s = session(model), session(quant)
    for feed in masked_attention_samples(rng, 4):
        assert cosine(quant_s.run(None, feed)[0], float_s.run(None, feed)[0]) > 0.99


@pytest.mark.parametrize("target", ["CPU", "NVGPU"])
def test_embedding_table(target):
    """The CPU preset stores a Gather table as int8 rows (only gathered rows dequantized), as DYNAMIC_QUANT does;
    the other presets keep it float."""
    rng = np.random.default_rng(8)
    table = rng.normal(0, 1, (50, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])],
                              [initializer("table", table), initializer("w", rng.normal(0, 0.3, (16, 8)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"ids": rng.integers(0, 50, (1, 6))} for _ in range(6)]
    result = convert(model, full_config(target=target), samples=calib, progress=False)
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    records = {q.tensor: q for q in result.quantized}
    if target == "CPU":
        assert "table" not in stored and stored["table_quantized"] == TensorProto.INT8
        assert records["table"].bytes_after == 50 * 16 + 4 * 50
    else:
        assert stored["table"] == TensorProto.FLOAT and "table" not in records
    feed = {"ids": np.array([[0, 3, 49, 7, 7, 12]])}
    assert cosine(session(result.model).run(None, feed)[0], session(model).run(None, feed)[0]) > 0.98


def test_static_3d_matmul_with_bias_keeps_its_int8_kernel(tmp_path):
    """With static shapes onnxruntime would fuse MatMul + Add(1-D bias) into Reshape -> float Gemm -> Reshape
    before its QDQ fusions, dequantizing the weight at every run; the bias gets the output's rank instead."""
    rng = np.random.default_rng(13)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
             helper.make_node("Tanh", ["a"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "mm_bias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
                              [initializer("w", rng.normal(0, 0.2, (32, 16))), initializer("b", rng.normal(0, 0.1, 16))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = [{"x": rng.normal(0, 1, (1, 8, 32)).astype(np.float32)} for _ in range(4)]
    quant = convert(model, full_config(), samples=calib, progress=False).model
    (add,) = [n for n in quant.graph.node if n.op_type == "Add"]
    bias = {t.name: t for t in quant.graph.initializer}[add.input[1]]
    assert list(bias.dims) == [1, 1, 16]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(quant.SerializeToString(), options, providers=["CPUExecutionProvider"])
    executed = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "MatMulIntegerToFloat" in executed and "Gemm" not in executed
    feed = calib[0]
    assert cosine(session(quant).run(None, feed)[0], session(model).run(None, feed)[0]) > 0.999


def test_dsp_keeps_a_masked_softmax_float():
    """DSP quantizes Softmax, but an input reaching -1e4 or below carries a mask: that Softmax stays float."""
    model = masked_attention_model()
    rng = np.random.default_rng(5)
    result = convert(model, full_config(target="DSP"), samples=masked_attention_samples(rng, 8), progress=False)
    assert any("1 Softmax node(s) kept float" in note for note in result.notes)
    quantized = {node.input[0] for node in result.model.graph.node if node.op_type == "QuantizeLinear"}
    assert "masked" not in quantized
    for feed in masked_attention_samples(rng, 4):
        assert cosine(session(result.model).run(None, feed)[0], session(model).run(None, feed)[0]) > 0.98


# sha256 of the bundled FULL_QUANT config's output on the bundled ResNet20 (examples/configs/full_quant.cfg, 100
# calibration PNGs); last changed by the constant Pad written on the integer codes (docs/results.md, "Portable
# outputs"; onnxruntime outputs unchanged). A refactoring keeps it; a
# change that means to alter FULL_QUANT's output updates it and says why in docs/results.md.
GOLDEN_RESNET20_FULL_QUANT = "cdc8200afd6e78bf029e5944363a23d81371b5f54575a219d95ee50e0c298738"


def test_bundled_resnet20_full_quant_output_is_byte_identical(tmp_path, monkeypatch):
    import hashlib

    from helpers import EXAMPLES, RESNET20

    from ptqlite.model import save_model

    monkeypatch.chdir(ROOT)  # the config's calibrate_path is relative to the repository root
    result = convert(onnx.load(str(RESNET20)), load_config(EXAMPLES / "configs" / "full_quant.cfg"), progress=False)
    out = tmp_path / "resnet20_full.onnx"
    save_model(result.model, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == GOLDEN_RESNET20_FULL_QUANT


def yolo_head_model() -> onnx.ModelProto:
    """A YOLO-style output: Concat of box coordinates in pixels (0..160) and class scores (0..1), reshaped."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, .3, (4, 8, 1, 1)).astype(np.float32), "wb"),
             numpy_helper.from_array(rng.normal(0, .3, (2, 8, 1, 1)).astype(np.float32), "wc"),
             numpy_helper.from_array(np.array(160, np.float32), "stride"),
             numpy_helper.from_array(np.array([1, 6, 256], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_box"),
             helper.make_node("Sigmoid", ["b"], ["bs"], name="sig_box"),
             helper.make_node("Mul", ["bs", "stride"], ["boxes"], name="pixels"),
             helper.make_node("Conv", ["x", "wc"], ["c"], name="conv_cls"),
             helper.make_node("Sigmoid", ["c"], ["scores"], name="sig_cls"),
             helper.make_node("Concat", ["boxes", "scores"], ["cat"], name="cat", axis=1),
             helper.make_node("Reshape", ["cat", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "yolo_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 256])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_concat_of_very_different_ranges_stays_float():
    """nudenet's YOLOv8n: one int8 scale for pixels and probabilities made every score 0 or 1.25 (0 of 13 boxes)
    while the output cosine stayed 1.000; each input keeps its precision when the Concat stays float."""
    model = yolo_head_model()
    feeds = samples((1, 8, 16, 16), 8)
    result = convert(model, full_config(), samples=feeds, progress=False)
    assert any("1 Concat node(s) kept float" in note and "(cat)" in note for note in result.notes)
    x = samples((1, 8, 16, 16), 1, seed=7)[0]
    reference, quantized = session(model).run(None, x)[0], session(result.model).run(None, x)[0]
    assert np.abs(reference[0, 4:] - quantized[0, 4:]).max() < 0.02  # the scores' own 0..1 range at 8 bit
    assert {n.op_type for n in result.model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}  # convs int8


def test_concat_of_similar_ranges_stays_int8():
    model = yolo_head_model()
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.array(4, np.float32), "stride"))  # 0..4 vs 0..1
    result = convert(model, full_config(), samples=samples((1, 8, 16, 16), 8), progress=False)
    assert not any("Concat" in note for note in result.notes)
    concat_inputs = {i for n in result.model.graph.node if n.op_type == "Concat" for i in n.input}
    assert all(name.endswith("_dequantized") for name in concat_inputs)

"""Mixed-bit weight quantization (bit_num=0) and auto_tune."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import EXAMPLES, RESNET20, cosine, run, session
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ptqlite.autotune import MAX_COARSE, TARGET_COSINE, search_scale
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.encoding import SharedConstants, plan_split
from ptqlite.model import GraphIndex
from ptqlite.passes.mixed_bit import (
    channel_errors,
    quantize_layer,
    rice_decode,
    rice_encode,
    rice_parameter,
    search_step,
    signed_form_fits,
    split_decoder,
    unzigzag,
    zigzag,
)
from ptqlite.plan import WeightSpec
from ptqlite.runtime import cosine_similarity

CALIB = EXAMPLES / "calib" / "input"


def mixed_config(init_scale: float = 0.02, extra: str = "", **common) -> object:
    lines = ["[common_quant_param]", "quant_type=WEIGHT_QUANT", "bit_num=0", "min_quant_weight_size=0",
             "min_quant_weight_channel=0"] + [f"{k}={v}" for k, v in common.items()]
    lines += ["[mixed_bit_weight_quant_param]", f"init_scale={init_scale}", extra]
    return parse_config("\n".join(lines))


def _weights(seed: int, channels: int, size: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-spread, spread, (channels, 1)))
    return (rng.standard_normal((channels, size)) * scales * 0.1).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), channels=st.integers(1, 6), size=st.integers(2, 80),
       spread=st.floats(0, 3), target=st.floats(0.003, 0.3))
def test_step_search_meets_the_target_per_tensor_and_per_channel(seed, channels, size, spread, target):
    w = _weights(seed, channels, size, spread)
    for axis in (None, 0):
        step, met = search_step(w, target, axis)
        assert met.all()
        assert np.all(channel_errors(w, step, axis) <= target)
    # The layer actually stored meets it too (the decoders' float32 arithmetic included).
    index = GraphIndex(helper.make_graph([], "g", [], []))
    spec = WeightSpec("w", "MatMul", ("m",), w.shape, axis=0)
    layer = quantize_layer(index, SharedConstants(index), spec, w, target)
    assert layer.relative_error <= target * (1 + 1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
def test_no_channel_is_wiped_out_by_a_common_step(per_channel):
    """One channel 200x smaller than the others (as depthwise convs of MobileNet V2 have): a step sized for the
    tensor's error alone would round it to zero (MobileNet V2 at init_scale 0.02: 0.5 top-1). Every channel of the
    stored weight meets the target, whichever measurement wins."""
    w = _weights(3, 8, 64, 0.2)
    w[5] *= 0.005
    tensor_only, _ = search_step(w, 0.02, None)
    assert channel_errors(w, tensor_only, 0)[5] > 0.5  # what the reference's per-tensor measure would do
    index = GraphIndex(helper.make_graph([], "g", [], []))
    spec = WeightSpec("w", "MatMul", ("m",), w.shape, axis=0)
    layer = quantize_layer(index, SharedConstants(index), spec, w, 0.02, per_channel=per_channel)
    per_row = np.linalg.norm(w - layer.decoded, axis=1) / np.linalg.norm(w, axis=1)
    assert per_row.max() <= 0.02 * (1 + 1e-5)
    if not per_channel:
        assert layer.measure == "per-tensor" and "error measured per channel" in layer.scheme


def test_step_search_lands_within_one_percent_on_a_large_tensor():
    w = _weights(1, 32, 500, 1.0)
    for axis in (None, 0):
        step, _ = search_step(w, 0.02, axis)
        errors = channel_errors(w, step, axis)
        assert np.all((errors <= 0.02) & (errors >= 0.02 * 0.99))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-3000, 3000), min_size=1, max_size=300))
def test_rice_code_round_trips(values):
    q = np.array(values, np.int64)
    z = zigzag(q)
    assert np.all(z >= 0) and np.array_equal(unzigzag(z), q)
    k = rice_parameter(z)
    stream, remainders = rice_encode(z, k)
    assert np.array_equal(unzigzag(rice_decode(stream, remainders, k, q.size)), q)


def test_unreachable_target_falls_back_to_8_bits():
    w = _weights(2, 4, 64, 0.0)
    index = GraphIndex(helper.make_graph([], "g", [], []))
    spec = WeightSpec("w", "MatMul", ("m",), w.shape, axis=0)
    layer = quantize_layer(index, SharedConstants(index), spec, w, 1e-7)
    assert layer.measure == "fallback" and layer.bits == 8
    assert layer.relative_error < 0.01


def _matmul_model(weights: dict[str, np.ndarray], opset: int = 13) -> onnx.ModelProto:
    """y_i = x @ W_i for each weight: with x the identity, the outputs are the weights the runtime decoded."""
    rows = next(iter(weights.values())).shape[0]
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}") for name in weights]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, rows])],
        [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [rows, w.shape[1]])
         for name, w in weights.items()],
        [numpy_helper.from_array(w, name) for name, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _unzigzag_tables(model: onnx.ModelProto) -> int:
    """Range nodes that start an unzigzag table (the byte table's Range is followed by a Reshape)."""
    readers = {name: n.op_type for n in model.graph.node for name in n.input}
    return sum(n.op_type == "Range" and readers[n.output[0]] != "Reshape" for n in model.graph.node)


def _assert_folded_to_matmuls(optimized, count: int) -> None:
    """After load only the model's MatMuls remain, each followed by the Mul of its step (a scalar step is fused
    into FusedMatMul's alpha): every decoder node was folded."""
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    assert set(ops) <= {"MatMul", "FusedMatMul", "Mul"}
    assert ops.count("MatMul") + ops.count("FusedMatMul") == count and ops.count("Mul") <= count


def test_decoded_weights_in_onnxruntime_equal_the_numpy_reconstruction(tmp_path):
    rng = np.random.default_rng(3)
    sparse = (rng.standard_normal((64, 400)) * (rng.random((64, 400)) < 0.04)).astype(np.float32)
    weights = {"a": _weights(4, 48, 64, 0.5).T.copy(), "b": _weights(5, 32, 64, 0.0).T.copy(),
               "c": sparse}
    model = _matmul_model(weights)
    result = convert(model, mixed_config(0.05))
    layers = {q.tensor: q for q in result.quantized}
    assert set(layers) == set(weights)
    storages = {q.storage.split(",")[0].split()[0] for q in result.quantized}
    assert "rice" in storages and len(storages) >= 2  # the sparse weight is stored another way
    eye = np.eye(64, dtype=np.float32)
    optimized = tmp_path / "optimized.onnx"
    outputs = session(result.model, optimized).run(None, {"x": eye})
    # Every decoder was folded at load.
    _assert_folded_to_matmuls(optimized, 3)
    # The recorded relative errors are those of what the runtime computes, and meet the target.
    from ptqlite.passes.weight import relative_error

    for (name, w), out in zip(weights.items(), outputs):
        assert relative_error(w, out) == pytest.approx(layers[name].relative_error, rel=1e-9)
        assert layers[name].relative_error <= 0.05 * (1 + 1e-5)


def test_numpy_reconstruction_is_bit_exact_with_the_runtime():
    from ptqlite.passes.mixed_bit import quantize_weights

    rng = np.random.default_rng(6)
    weights = {"a": _weights(7, 24, 64, 1.0).T.copy(),
               "c": (rng.standard_normal((64, 16)) * (rng.random((64, 16)) < 0.03)).astype(np.float32)}
    model = _matmul_model(weights)
    config = mixed_config(0.03)
    layers, _ = quantize_weights(model, config, 0.03)
    outputs = run(convert(model, config).model, {"x": np.eye(64, dtype=np.float32)})
    for layer, out in zip(layers, outputs):
        assert np.array_equal(layer.decoded, out)


def test_bits_and_bytes_fall_as_init_scale_grows():
    w = _weights(8, 32, 300, 0.7)
    index = GraphIndex(helper.make_graph([], "g", [], []))
    spec = WeightSpec("w", "MatMul", ("m",), w.shape, axis=0)
    scales = (0.005, 0.01, 0.02, 0.05, 0.1)
    layers = [quantize_layer(index, SharedConstants(index), spec, w, t) for t in scales]
    bits = [layer.bits for layer in layers]
    sizes = [layer.stored_bytes for layer in layers]
    errors = [layer.relative_error for layer in layers]
    assert bits == sorted(bits, reverse=True) and bits[0] > bits[-1]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert errors == sorted(errors)


def _calibration_images(count: int) -> np.ndarray:
    import cv2

    files = sorted(CALIB.glob("*.png"))[:count]
    rgb = np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]).astype(np.float32)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    return ((rgb - mean) / std).astype(np.float32).transpose(0, 3, 1, 2).copy()


def test_bundled_resnet20_shrinks_as_init_scale_grows_and_stays_close():
    model = onnx.load(str(RESNET20))
    x = _calibration_images(16)
    reference = run(model, {"input": x})[0]
    sizes, cosines = [], []
    for t in (0.01, 0.02, 0.05):
        result = convert(model, mixed_config(t))
        assert all(q.relative_error <= t * (1 + 1e-5) for q in result.quantized)
        sizes.append(result.model.ByteSize())
        cosines.append(cosine(reference, run(result.model, {"input": x})[0]))
    float_size = model.ByteSize()
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[1] < 0.23 * float_size  # 5.8 bits per weight at init_scale 0.02
    assert cosines[0] > 0.999 and cosines[1] > 0.998 and cosines[2] > 0.98
    # Same inputs, same bytes.
    again = convert(model, mixed_config(0.02))
    assert again.model.SerializeToString() == convert(model, mixed_config(0.02)).model.SerializeToString()


def test_search_scale_brackets_then_bisects_within_bounds():
    calls = []

    def evaluate(scale: float) -> float:  # cosine falls with scale; 0.995 is reached at scale 0.0707...
        calls.append(scale)
        return 1 - scale**2

    found = search_scale(evaluate, 0.02)
    assert TARGET_COSINE <= found.cosine <= TARGET_COSINE + 0.001
    assert found.init_scale == pytest.approx(math.sqrt(0.005), rel=0.05)
    assert len(calls) <= 16
    # A target that no scale reaches: the smallest scale tried, after a bounded number of evaluations.
    missed = search_scale(lambda s: 0.5, 0.02)
    assert missed.init_scale == min(s for s, _ in missed.history) < 0.001
    assert len(missed.history) == MAX_COARSE


def test_auto_tune_cosine_edge_cases():
    zeros, ones = np.zeros(4), np.ones(4)
    assert cosine_similarity(zeros, zeros) == 1.0
    assert cosine_similarity(zeros, ones) == 0.0
    assert cosine_similarity(ones, np.array([1, 1, np.nan, 1])) == 0.0
    assert cosine_similarity(ones, -ones) == -1.0
    assert cosine_similarity(np.array([1.0, 0]), np.array([1.0, 1])) == pytest.approx(math.sqrt(0.5))


def test_auto_tune_without_data_says_it_used_random_inputs():
    model = _matmul_model({"a": _weights(9, 48, 64, 0.5).T.copy()})
    result = convert(model, mixed_config(0.02, "auto_tune=true"))
    notes = " ".join(result.notes)
    assert "random" in notes and "auto_tune: init_scale=" in notes


def test_auto_tune_on_resnet20_calibration_images_reaches_the_target_cosine():
    count = 24
    extra = "\n".join([
        "auto_tune=true", "[data_preprocess_param]", f"calibrate_path=input:{CALIB}",
        f"calibrate_size={count}",
        "input_type=IMAGE", "image_to_format=RGB", "normalize_mean=[123.675,116.28,103.53]",
        "normalize_std=[58.395,57.12,57.375]"])
    model = onnx.load(str(RESNET20))
    result = convert(model, mixed_config(0.02, extra), input_format="NCHW")
    assert any(f"{count} calibration samples" in n for n in result.notes)
    x = _calibration_images(count)
    reference = run(model, {"input": x})[0]
    quantized = run(result.model, {"input": x})[0]
    mean_cosine = np.mean([cosine_similarity(r, q) for r, q in zip(reference, quantized)])
    assert abs(mean_cosine - TARGET_COSINE) <= 0.003


@pytest.mark.parametrize("chunk", [1 << 20, 1000])
def test_integer_rice_decoder_on_opset_14_is_bit_exact_and_folded(tmp_path, monkeypatch, chunk):
    """Opset >= 14: the Rice decoder stays integer (uint8 bits and quotients, int32 indices) up to one Gather per
    layer; weights with per-tensor and per-channel steps, several k (odd ones too), one layer cut over several
    streams (chunk=1000), all bit-identical to the recorded reconstruction and folded away at load."""
    from ptqlite.passes import mixed_bit

    monkeypatch.setattr(mixed_bit, "RICE_CHUNK", chunk)
    monkeypatch.setattr(mixed_bit, "RICE_MARGIN", -1e9)  # Rice always wins here (opset 17 also offers split)
    rng = np.random.default_rng(11)
    weights = {"a": _weights(7, 24, 64, 1.0).T.copy(), "b": _weights(8, 24, 64, 0.0).T.copy() * 3,
               "d": _weights(9, 48, 64, 0.3).T.copy(),
               "e": (rng.laplace(size=(64, 32)) * 0.01).astype(np.float32)}
    model = _matmul_model(weights, opset=17)
    for target in (0.004, 0.03, 0.3):
        config = mixed_config(target)
        layers, _ = mixed_bit.quantize_weights(model, config, target)
        converted = convert(model, config).model
        assert {layer.encoding.split()[0] for layer in layers} == {"rice"}
        assert {layer.measure for layer in layers} == {"per-tensor", "per-channel"} or target != 0.03
        optimized = tmp_path / f"optimized_{target}.onnx"
        outputs = session(converted, optimized).run(None, {"x": np.eye(64, dtype=np.float32)})
        for layer, out in zip(layers, outputs):
            assert np.array_equal(layer.decoded, out)
        _assert_folded_to_matmuls(optimized, 4)
        # No float tensor as large as the bit stream or the values: TopK reads uint8 bits (and a second TopK
        # sorts the positions it found), and the only float ops are the small unzigzag table (Range and four
        # ops on it, one Mul per per-tensor step), the byte table and each layer's Gather (and Mul for
        # per-channel steps).
        nodes = [n for n in converted.graph.node if n.op_type != "MatMul"]
        topk = [n for n in nodes if n.op_type == "TopK"]
        producers = {o: n for n in nodes for o in n.output}
        reads = [producers[t.input[0]].op_type for t in topk]
        assert topk and reads.count("Reshape") == reads.count("TopK") == len(topk) // 2
        assert not [n for n in nodes if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT]
        ks = {layer.rice_k for layer in layers}
        assert _unzigzag_tables(converted) == len(ks)
        # one Gather per layer from its unzigzag table (the others read stored bytes or the uint8 byte tables)
        byte_tables = {n.output[0] for n in nodes if n.op_type == "Cast" and n.attribute[0].i == TensorProto.UINT8}
        assert len([n for n in nodes if n.op_type == "Gather" and n.input[0] in producers
                    and n.input[0] not in byte_tables]) == len(layers)
        # Same inputs, same bytes.
        assert converted.SerializeToString() == convert(model, config).model.SerializeToString()


def test_rice_parameter_keeps_quotients_within_the_integer_decoder():
    from ptqlite.passes.mixed_bit import MAX_QUOTIENT

    z = np.concatenate([np.zeros(5000, np.int64), [40000]])  # one outlier: the shortest k would be 0
    k = rice_parameter(z)
    assert int(z.max()) >> k <= MAX_QUOTIENT and int(z.max()) >> (k - 1) > MAX_QUOTIENT
    assert rice_parameter(np.arange(64)) == rice_parameter(np.arange(64))  # unconstrained case unchanged


@pytest.mark.parametrize("signed_min", [None, 0])
def test_split_form_is_bit_exact_folded_and_without_topk(tmp_path, monkeypatch, signed_min):
    """With Rice ruled out, opset >= 16 stores layers in the split form: per-tensor and per-channel steps, weights
    bit-identical to the recorded reconstruction, folded away at load, no TopK, byte-identical reruns; in the
    unsigned form (these layers are small) and, with the size threshold off, in the signed form."""
    from ptqlite.passes import mixed_bit

    monkeypatch.setattr(mixed_bit, "RICE_MARGIN", 0.999)
    if signed_min is not None:
        monkeypatch.setattr(mixed_bit, "SIGNED_MIN_VALUES", signed_min)
    rng = np.random.default_rng(12)
    weights = {"a": _weights(7, 24, 256, 1.0).T.copy(), "b": _weights(8, 24, 256, 0.0).T.copy() * 3,
               "e": (rng.laplace(size=(256, 64)) * 0.01).astype(np.float32)}
    model = _matmul_model(weights, opset=17)
    for target in (0.004, 0.03):
        config = mixed_config(target)
        layers, _ = mixed_bit.quantize_weights(model, config, target)
        forms = {layer.encoding.split()[0] for layer in layers}
        assert "split" in forms and "rice" not in forms
        converted = convert(model, config).model
        signed = [mixed_bit.signed_form_fits(layer.q, layer.split) for layer in layers if layer.split is not None]
        assert all(signed) if signed_min == 0 else not any(signed)
        optimized = tmp_path / f"optimized_{target}.onnx"
        outputs = session(converted, optimized).run(None, {"x": np.eye(256, dtype=np.float32)})
        for layer, out in zip(layers, outputs):
            assert np.array_equal(layer.decoded, out)
            if layer.encoding.startswith("split"):  # the same product as the step search measured
                assert np.array_equal(layer.decoded, layer.q.astype(np.float32) * layer.step)
        _assert_folded_to_matmuls(optimized, 3)
        assert not [n for n in converted.graph.node if n.op_type == "TopK"]
        assert converted.SerializeToString() == convert(model, config).model.SerializeToString()
        # Decoder values get the shortest free names (never the model's own "a", "b", "x": the MatMuls now read
        # the codes, so the weights' names are gone from the model), and layers whose
        # code ranges round to the same 2^n - 1 share one unzigzag table.
        # (a small layer may be stored in a fixed-width form, rebuilt at load under its own name).
        names = {n for node in converted.graph.node for n in [*node.input, *node.output]}
        names |= {t.name for t in converted.graph.initializer}
        added = names - {"x", *weights, *(f"y_{name}" for name in weights)}
        split = {layer.spec.tensor for layer in layers if layer.encoding.startswith("split")}
        assert names.isdisjoint(split) and max(len(n) for n in added) <= 2
        # The signed split form (every layer here) reads no unzigzag table; the unsigned one shares them.
        tables = {(1 << int(zigzag(layer.q).max()).bit_length()) - 1 for layer in layers
                  if layer.split is not None and not mixed_bit.signed_form_fits(layer.q, layer.split)}
        assert _unzigzag_tables(converted) == len(tables)


def test_rice_needs_a_clear_margin_over_the_lean_forms():
    """Default rule: a layer whose Rice code is within RICE_MARGIN of the split form is stored split."""
    from ptqlite.passes import mixed_bit

    rng = np.random.default_rng(5)
    w = (rng.laplace(size=(256, 1024)) * 0.01).astype(np.float32)
    spec = WeightSpec("w", "MatMul", ("mm",), w.shape, axis=1)
    graph = helper.make_graph([], "g", [], [], [numpy_helper.from_array(w, "w")])
    index = GraphIndex(graph)
    layer = quantize_layer(index, SharedConstants(index, 17), spec, w, 0.02)
    z = zigzag(layer.q)
    rice = -(-mixed_bit.rice_bits(z, rice_parameter(z)) // 8) + layer.step.nbytes
    assert layer.encoding.startswith("split")
    assert rice > (1 - mixed_bit.RICE_MARGIN) * layer.stored_bytes  # Rice is smaller, but not by the margin
    assert rice < layer.stored_bytes
    old = quantize_layer(index, SharedConstants(index, 14), spec, w, 0.02)  # no split below opset 16
    assert old.encoding.startswith("rice")


def test_split_layers_with_the_same_plan_share_one_decoding_graph(tmp_path, monkeypatch):
    """Layers of the unsigned split form (low parts above 8 bits or codes near the int16 limit; forced here) with
    the same widths (here one weight times powers of two) are decoded once and cut by a Split; the weights stay
    bit-identical to the recorded reconstruction and everything folds at load."""
    from ptqlite.passes import mixed_bit

    monkeypatch.setattr(mixed_bit, "RICE_MARGIN", 0.999)
    monkeypatch.setattr(mixed_bit, "signed_split_fits", lambda qmax, plan: False)
    rng = np.random.default_rng(3)
    w = (rng.laplace(size=(128, 96)) * 0.01).astype(np.float32)
    weights = {"a": w, "b": w * 2, "c": w * 4}
    model = _matmul_model(weights, opset=17)
    config = mixed_config(0.02)
    index = GraphIndex(model.graph)
    shared = SharedConstants(index, 17)
    layers, _ = mixed_bit.quantize_weights(model, config, 0.02, index, shared)
    assert len({(layer.split.k, layer.split.gap_bits, layer.split.value_bits) for layer in layers}) == 1
    converted = convert(model, config).model
    ops = [n.op_type for n in converted.graph.node]
    assert ops.count("Split") == 1 and ops.count("ScatterElements") == 1
    optimized = tmp_path / "optimized.onnx"
    outputs = session(converted, optimized).run(None, {"x": np.eye(128, dtype=np.float32)})
    for layer, out in zip(layers, outputs):
        assert np.array_equal(layer.decoded, out)
    _assert_folded_to_matmuls(optimized, 3)
    # one layer's own decoder (as the search built it) and the shared values it reads (unzigzag and byte
    # tables), the Split, then Reshape, Cast, Gather, Mul per further layer
    own = len(layers[0].decoder.nodes) + len(shared.nodes_used_by(layers[0].decoder.nodes))
    assert len(ops) - 3 <= own + 1 + 4 * (len(layers) - 1)
    assert converted.SerializeToString() == convert(model, config).model.SerializeToString()


def test_matmul_weights_fold_only_the_codes_and_scale_the_output(tmp_path, monkeypatch):
    """Split and integer Rice layers read only as MatMul B: the float codes are folded (no folded Mul of the
    weight's size) and the step multiplies the output, equal to x @ decoded up to float rounding; the reports
    get the map codes -> weight."""
    from ptqlite.passes import mixed_bit

    rng = np.random.default_rng(21)
    weights = {"a": (rng.laplace(size=(128, 96)) * 0.01).astype(np.float32),
               "b": (rng.laplace(size=(128, 48)) * rng.uniform(0.01, 0.1, 48)).astype(np.float32)}
    model = _matmul_model(weights, opset=17)
    x = rng.standard_normal((128, 128)).astype(np.float32)
    for margin in (0.999, -1e9):  # split, then Rice
        monkeypatch.setattr(mixed_bit, "RICE_MARGIN", margin)
        config = mixed_config(0.02)
        layers, _ = mixed_bit.quantize_weights(model, config, 0.02)
        assert {layer.encoding.split()[0] for layer in layers} == {"split" if margin > 0 else "rice"}
        result = convert(model, config)
        converted = result.model
        assert converted.SerializeToString() == convert(model, config).model.SerializeToString()
        optimized = tmp_path / f"optimized_{margin}.onnx"
        outputs = session(converted, optimized).run(None, {"x": x})
        _assert_folded_to_matmuls(optimized, 2)
        folded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(optimized)).graph.initializer}
        for layer, out in zip(layers, outputs):
            np.testing.assert_allclose(out, x @ layer.decoded, rtol=1e-5, atol=1e-6 * np.abs(out).max())
            mm = next(n for n in converted.graph.node if n.name == f"mm_{layer.spec.tensor}")
            scale, offset = result.input_maps[(mm.name, 1)]
            assert offset is None and np.array_equal(scale, layer.step)
            # The MatMul's folded B holds the codes themselves: codes times the map is the recorded weight.
            codes = next(v for v in folded.values() if v.shape == layer.q.shape)
            assert np.array_equal(codes, layer.q.astype(np.float32))
        # Only the small unzigzag tables are multiplied in the decoders, never a weight-sized value.
        muls = [n for n in converted.graph.node if n.op_type == "Mul" and n.output[0].startswith("y_")]
        assert len(muls) == 2


def test_gather_tables_stay_integer_and_decode_the_gathered_rows(tmp_path, monkeypatch):
    """An embedding table read only by Gather keeps integer codes after load; the gathered rows are cast and
    multiplied by their row's step, bit-identical to the recorded reconstruction."""
    from ptqlite.passes import mixed_bit

    monkeypatch.setattr(mixed_bit, "RICE_MARGIN", 0.999)
    rng = np.random.default_rng(22)
    table = (rng.laplace(size=(1100, 64)) * rng.uniform(0.01, 0.1, (1100, 1))).astype(np.float32)  # signed form
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [2, 7, 64])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = mixed_config(0.02)
    layers, _ = mixed_bit.quantize_weights(model, config, 0.02)
    assert layers[0].encoding.startswith("split")
    result = convert(model, config)
    ids = rng.integers(0, 1100, (2, 7))
    optimized = tmp_path / "optimized.onnx"
    (rows,) = session(result.model, optimized).run(None, {"ids": ids})
    assert np.array_equal(rows, layers[0].decoded[ids])
    folded = [numpy_helper.to_array(t) for t in onnx.load(str(optimized)).graph.initializer]
    codes = next(v for v in folded if v.shape == table.shape)
    # int8 where every code and high-part entry fits (this table's), else int16
    assert codes.dtype == np.int8 and np.array_equal(codes, layers[0].q)
    scale, offset = result.input_maps[("embed", 0)]
    assert offset is None and np.array_equal(codes * scale, layers[0].decoded)
    assert result.model.SerializeToString() == convert(model, config).model.SerializeToString()


def _folded_bytes(nodes, initializers) -> int:
    """Bytes of every value the nodes compute (all from constants): what ONNX Runtime materialises while it folds
    them at load (each folded output becomes an initializer until the whole graph is folded)."""
    outputs = [name for node in nodes for name in node.output]
    graph = helper.make_graph(nodes, "g", [], [helper.make_empty_tensor_value_info(n) for n in outputs],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = ort.InferenceSession(model.SerializeToString(), options,
                                  providers=["CPUExecutionProvider"]).run(None, {})
    return sum(np.asarray(v).nbytes for v in values)


@pytest.mark.parametrize("site", ["MatMul", "Gather"])
def test_signed_split_form_folds_in_fewer_bytes(site):
    """Op-level property of the signed split form against the unsigned one on the same codes (6-bit low parts,
    MiniLM's plan): the same values, the same stored bytes, and under 0.7x the bytes of folded values besides
    the result (the unsigned form: uint8 unpacking, uint16 widening, scatter, reshape copies and the int32 index
    of the value table). On MiniLM itself 10.3 against 18.4 bytes a value (docs/results.md)."""
    rng = np.random.default_rng(31)
    # MiniLM's codes at init_scale 0.02: a 6-bit core and about 3% of values beyond it (up to about +-500)
    q = np.clip(np.round(rng.laplace(0, 8, size=(256, 256))), -32, 31).astype(np.int64)
    wide = rng.random(q.shape) < 0.03
    q[wide] = rng.choice([-1, 1], wide.sum()) * rng.integers(32, 500, wide.sum())
    plan = plan_split(zigzag(q))
    assert plan.k == 6 and signed_form_fits(q, plan)
    result_bytes = q.size * (2 if site == "Gather" else 4)
    folded, values, stored = {}, {}, {}
    for signed in (True, False):
        index = GraphIndex(helper.make_graph([], "g", [], []))
        shared = SharedConstants(index, 17)
        decoder = split_decoder(index, shared, "w", q, np.array(0.01, np.float32), plan, site, signed=signed)
        nodes = shared.nodes_used_by(decoder.nodes) + decoder.nodes
        inits = shared.used_by(decoder.nodes) + decoder.initializers
        folded[signed] = (_folded_bytes(nodes, inits) - result_bytes) / q.size
        stored[signed] = decoder.stored_bytes
        graph = helper.make_graph(nodes, "g", [], [helper.make_empty_tensor_value_info(decoder.output)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        values[signed] = ort.InferenceSession(model.SerializeToString(),
                                              providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(values[True], values[False]) and values[True].dtype == values[False].dtype
    assert abs(stored[True] - stored[False]) <= 8  # padding of the byte groups only
    assert folded[False] > 16 and folded[True] < 0.7 * folded[False], folded  # 12.3 against 19.2 bytes a value

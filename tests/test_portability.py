"""Quantized models compute the same in ONNX Runtime, the ONNX reference evaluator and OpenVINO (CPU).

Decoders of every storage form and width are compared bit for bit on their decoded weights; whole converted
models (the bundled example configs on ResNet20, MiniLM where it is built) on their outputs. The OpenVINO parts
skip where openvino is not installed (it is in the `test` extra, so `make test` has it)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import (
    BLOCK_FEEDS,
    EXAMPLES,
    PROBES,
    RESNET20,
    ROOT,
    block_model,
    cosine,
    default_config,
    full_config,
    initializer,
    outputs,
    samples,
    session,
)
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ptqlite.config import load_config, parse_config
from ptqlite.convert import convert
from ptqlite.encoding import SharedConstants, SplitPlan, build_decoder, plan_split, signed_split_fits
from ptqlite.model import GraphIndex
from ptqlite.passes.mixed_bit import (
    MixedLayer,
    rice_decoders,
    rice_parameter,
    split_decoder,
    zigzag,
)
from ptqlite.passes.weight import CodeGroups
from ptqlite.plan import WeightSpec
from ptqlite.qmath import pack_code_groups

try:
    import openvino
except ImportError:  # the OpenVINO checks skip; ONNX Runtime and the reference are still compared
    openvino = None

NO_OPENVINO = "openvino is not installed (pip install -e '.[test]' installs it)"
MINILM = ROOT / ".cache" / "minilm" / "all-MiniLM-L6-v2.onnx"
SLOW = os.environ.get("PTQLITE_SLOW_TESTS") == "1"


@functools.cache
def _core():
    return openvino.Core()


def openvino_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path,
                 properties: dict | None = None) -> list[np.ndarray]:
    """Read, compile (CPU) and run `model` in OpenVINO as a user would: from the saved ONNX file."""
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    core = _core()
    compiled = core.compile_model(core.read_model(path), "CPU", properties or {})
    results = compiled(feeds)
    return [np.asarray(results[out]) for out in compiled.outputs]


def assert_same_everywhere(model: onnx.ModelProto, tmp_path: Path, fused: np.ndarray | None = None,
                           feeds: dict[str, np.ndarray] | None = None) -> list:
    """The graph outputs (of no inputs, or of `feeds`) are bit-identical in ONNX Runtime, the reference evaluator
    and OpenVINO.

    fused: for a float output codes * scale + offset, the same rounded once (a fused multiply-add): OpenVINO
    contracts the decoder's Mul and Add so, where ONNX Runtime rounds twice; each element must be one of the two."""
    feeds = feeds or {}
    onnx.checker.check_model(model)
    expected = session(model).run(None, feeds)
    for want, got in zip(expected, ReferenceEvaluator(model).run(None, feeds)):
        np.testing.assert_array_equal(got, want, err_msg="reference evaluator")
    assert_exact_when_saturating(model, expected, feeds)
    if openvino is None:
        pytest.skip(NO_OPENVINO)
    for want, got in zip(expected, openvino_run(model, feeds, tmp_path)):
        assert got.dtype == want.dtype and got.shape == want.shape
        if fused is not None and got.dtype == np.float32:
            got = np.where(got == fused, want, got)
        np.testing.assert_array_equal(got, want, err_msg="OpenVINO")
    return expected


def _saturating(op: str, compute):
    """An evaluator op that computes integers like OpenVINO's CPU plugin may: in float, rounded to the nearest
    integer and saturated to the type's range (where the ONNX reference wraps and truncates)."""

    def run(self, a, b=None, **_):
        if a.dtype.kind not in "iu":
            return (compute(a, b).astype(a.dtype),)
        info = np.iinfo(a.dtype)
        exact = compute(a.astype(np.float64), np.asarray(b, np.float64))
        return (np.clip(np.floor(exact + 0.5), info.min, info.max).astype(a.dtype),)

    return type(op, (OpRun,), {"op_domain": "", "_run": run})


class _SaturatingBitShift(OpRun):
    """BitShift as OpenVINO's CPU plugin may compute it: multiplication and division by powers of two, saturated
    and rounded (`16 << 2` gives 255 and `10 >> 4` gives 1 in uint8)."""

    op_domain = ""

    def _run(self, x, y, direction=None):
        info = np.iinfo(x.dtype)
        power = np.exp2(np.asarray(y, np.float64))
        exact = x * power if direction == "LEFT" else x / power
        return (np.clip(np.floor(exact + 0.5), info.min, info.max).astype(x.dtype),)


_SaturatingBitShift.__name__ = "BitShift"

# Left and right shifts as multiplication and division by powers of two.
SATURATING = [_saturating("Add", np.add), _saturating("Sub", np.subtract), _saturating("Mul", np.multiply),
              _saturating("Div", np.divide), _SaturatingBitShift]


def assert_exact_when_saturating(model: onnx.ModelProto, expected: list[np.ndarray],
                                 feeds: dict[str, np.ndarray] | None = None) -> None:
    """The decoders give the same result where integer arithmetic saturates and quotients round (the reference
    evaluator with SATURATING ops) as in ONNX Runtime (`expected`): no result depends on overflow or inexact
    division (BitShift included: the gathered tables' CodeGroups shift uint32 words). This catches the bug class
    without OpenVINO."""
    for want, got in zip(expected, ReferenceEvaluator(model, new_ops=SATURATING).run(None, feeds or {})):
        np.testing.assert_array_equal(got, want, err_msg="saturating, rounding evaluator")


def _decoder_model(nodes, initializers, shape, opset: int, outputs=(("w", TensorProto.FLOAT),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(name, dtype, list(shape))
                                               for name, dtype in outputs], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _form_codes(form: str, bits: int, shape: tuple[int, ...]):
    rng = np.random.default_rng(bits)
    zero = rng.integers(0, 1 << bits, size=(shape[0],) + (1,) * (len(shape) - 1))
    codes = rng.integers(0, 1 << bits, size=shape)
    if form == "indexed":  # few distinct values, so an index is narrower than the codes
        table = rng.integers(0, 1 << bits, size=max(1, (1 << bits) // 4))
        codes = table[rng.integers(0, table.size, size=shape)]
    if form == "sparse":  # most codes on the channel zero point
        codes = np.where(rng.random(shape) < 0.8, zero, codes)
    return codes, zero, rng


FORMS = [(form, bits) for form in ("packed", "indexed", "sparse") for bits in range(1, 17)
         if not (form == "indexed" and bits < 3)]  # an index cannot be narrower than 1 or 2 bit codes


FORMS = [(form, bits, shape) for form, bits in FORMS for shape in [(6, 5, 3), (7, 3, 5)]
         if form == "packed" or shape == (6, 5, 3)]  # odd sizes (padding, no even axis) matter to packing


@pytest.mark.parametrize("form, bits, shape", FORMS)
def test_fixed_width_forms_decode_identically(tmp_path, form, bits, shape):
    """The integer codes bit for bit; the float weight (codes * scale + offset) too, or OpenVINO's fused value."""
    codes, zero, rng = _form_codes(form, bits, shape)
    scale = rng.uniform(0.01, 0.1, size=zero.shape)
    offset = rng.uniform(-1, 1, size=zero.shape)
    graph = helper.make_graph([], "g", [], [])
    index = GraphIndex(graph)
    shared = SharedConstants(index, 17)
    decoder = build_decoder(index, shared, "w", codes, bits, scale, offset, zero, forms=(form,))
    assert decoder.encoding == form
    integer = next(n.input[0] for n in decoder.nodes if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT)
    outputs = [("w", TensorProto.FLOAT), (integer, TensorProto.UINT16 if bits > 8 else TensorProto.UINT8)]
    model = _decoder_model(shared.nodes_used_by(decoder.nodes) + decoder.nodes,
                           shared.used_by(decoder.nodes) + decoder.initializers, shape, 17, outputs)
    fused = (codes * scale.astype(np.float32).astype(np.float64)
             + offset.astype(np.float32).astype(np.float64)).astype(np.float32)
    weight, decoded = assert_same_everywhere(model, tmp_path, fused)
    np.testing.assert_array_equal(decoded, codes)
    np.testing.assert_array_equal(weight, codes.astype(np.float32) * scale.astype(np.float32)
                                  + offset.astype(np.float32))


@pytest.mark.parametrize("bits", [8, 16])
def test_unencoded_storage_decodes_identically(tmp_path, bits):
    codes, zero, _ = _form_codes("packed", bits, (6, 5, 3))
    graph = helper.make_graph([], "g", [], [])
    index = GraphIndex(graph)
    shared = SharedConstants(index, 17)
    decoder = build_decoder(index, shared, "w", codes, bits, np.full(zero.shape, 0.25), np.full(zero.shape, -3.0),
                            zero, encode=False)
    model = _decoder_model(decoder.nodes, shared.used_by(decoder.nodes) + decoder.initializers, codes.shape, 17)
    assert_same_everywhere(model, tmp_path)


def _mixed_layer(bits: int, shape=(6, 40), per_channel: bool = False):
    """Signed codes of about `bits` bits (Laplace, so Rice and split forms pay) and their step."""
    rng = np.random.default_rng(100 + bits)
    limit = (1 << (bits - 1)) - 1 if bits > 1 else 1
    q = np.clip(np.round(rng.laplace(0, max(limit / 6, 0.3), size=shape)), -limit - 1, limit).astype(np.int64)
    q.flat[0], q.flat[1] = -limit - 1, limit  # the full range
    step = (rng.uniform(0.001, 0.01, size=(shape[0], 1)) if per_channel else np.array(0.003)).astype(np.float32)
    spec = WeightSpec("w", "Conv", ("c",), shape, axis=0)
    return spec, q, step


def _mixed_model(decoders, shared, shape) -> onnx.ModelProto:
    nodes = [n for d in decoders for n in d.nodes]
    inits = [t for d in decoders for t in d.initializers]
    return _decoder_model(shared.nodes_used_by(nodes) + nodes, shared.used_by(nodes) + inits, shape, 17)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", range(1, 17))
def test_mixed_bit_rice_decodes_identically(tmp_path, bits, per_channel):
    spec, q, step = _mixed_layer(bits, per_channel=per_channel)
    shared = SharedConstants(GraphIndex(helper.make_graph([], "g", [], [])), 17)
    layer = MixedLayer(spec, "per-tensor", bits, step, q, q * step, 0.0, 0, rice_k=rice_parameter(zigzag(q)))
    out = assert_same_everywhere(_mixed_model(rice_decoders(shared.index, shared, [layer]), shared, q.shape),
                                 tmp_path)[0]
    np.testing.assert_array_equal(out, q.astype(np.float32) * step)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", range(1, 17))
def test_mixed_bit_split_decodes_identically(tmp_path, bits, per_channel):
    _, q, step = _mixed_layer(bits, per_channel=per_channel)
    shared = SharedConstants(GraphIndex(helper.make_graph([], "g", [], [])), 17)
    decoder = split_decoder(shared.index, shared, "w", q, step, plan_split(zigzag(q)))
    out = assert_same_everywhere(_mixed_model([decoder], shared, q.shape), tmp_path)[0]
    np.testing.assert_array_equal(out, q.astype(np.float32) * step)


@pytest.mark.parametrize("site", ["load", "MatMul", "Gather"])
@pytest.mark.parametrize("shape", [(50,), (6, 40), (3, 5, 2, 7)])
@pytest.mark.parametrize("bits", [6, 10])
@pytest.mark.parametrize("k", range(1, 9))
def test_mixed_bit_signed_split_decodes_as_the_unsigned_form(tmp_path, k, bits, shape, site):
    """The signed split form (low bits as two's complement int8 fields, high parts added by one scatter) gives
    the unsigned form's values bit for bit, for every low width, where each step is applied (the weight, the
    codes as float for MatMul, integer codes for Gather: int8 where they fit), on shapes whose axes do and do not
    divide the byte groups, with filler and extra entries (3-bit gaps, 2-bit values), few entries (ScatterND at
    coordinates) and many (flat ScatterElements), in every runtime."""
    _, q, step = _mixed_layer(bits, shape, per_channel=len(shape) > 1)
    step = step.reshape((-1,) + (1,) * (len(shape) - 1))  # one per channel of axis 0
    plan = SplitPlan(k, 3, 2, 0)
    assert signed_split_fits(int(np.abs(q).max()), plan)  # (a layer this small gets the unsigned form by default)
    made, results = {}, {}
    for signed in (True, False):
        shared = SharedConstants(GraphIndex(helper.make_graph([], "g", [], [])), 17)
        decoder = split_decoder(shared.index, shared, "w", q, step, plan, site, signed=signed)
        ops = {n.op_type for n in decoder.nodes}
        assert ("ScatterElements" in ops) != signed or "ScatterND" not in ops
        model = _decoder_model(shared.nodes_used_by(decoder.nodes) + decoder.nodes,
                               shared.used_by(decoder.nodes) + decoder.initializers, shape, 17,
                               outputs=((decoder.output, TensorProto.UNDEFINED),))
        model.graph.output[0].type.tensor_type.elem_type = _inferred_output_type(model)
        made[signed] = model
        results[signed] = session(model).run(None, {})[0]
    new = assert_same_everywhere(made[True], tmp_path)[0]
    old = results[False]
    assert new.dtype.kind == old.dtype.kind and np.array_equal(new, old)
    want = {"load": q.astype(np.float32) * step, "MatMul": q.astype(np.float32), "Gather": q}
    np.testing.assert_array_equal(new, want[site])


def _inferred_output_type(model: onnx.ModelProto) -> int:
    """The element type of the model's (only) output, by shape inference."""
    name = model.graph.output[0].name
    stored = [t.data_type for t in model.graph.initializer if t.name == name]
    if stored:  # codes stored as they are read (int8, k = 8 without high parts)
        return stored[0]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]  # then the value is an intermediate one, which inference records
    inferred = onnx.shape_inference.infer_shapes(copy)
    return next(v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name == name)


def _weight_model(shape=(8, 6, 3, 3), opset: int = 17) -> onnx.ModelProto:
    """A Conv and its weight w."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, shape, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, shape[1], 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _weight_config(bits: int, extra: str = "") -> object:
    return parse_config(f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num={bits}\nmin_quant_weight_size=0\n"
                        f"min_quant_weight_channel=0\n{extra}")


def _on_the_fly_config(bits: int) -> object:
    return parse_config(f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num={bits}\nmin_quant_weight_size=0\n"
                        "min_quant_weight_channel=0\n[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n")


def _same_outputs_with_input(model: onnx.ModelProto, tmp_path: Path) -> None:
    """The Conv output and the decoded weight (made a graph output after the conversion) agree."""
    model.graph.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, None))
    x = np.random.default_rng(1).standard_normal((1, 6, 5, 5)).astype(np.float32)
    expected = session(model).run(None, {"x": x})
    if openvino is None:
        pytest.skip(NO_OPENVINO)
    got = openvino_run(model, {"x": x}, tmp_path)
    # codes * scale + offset may be rounded once in OpenVINO (see assert_same_everywhere): a few ulps of the terms
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=4e-7 * np.abs(expected[1]).max())
    assert cosine(got[0], expected[0]) > 1 - 1e-6


@pytest.mark.parametrize("bits", range(1, 17))
def test_on_the_fly_weights_decode_identically(tmp_path, bits):
    model = convert(_weight_model(), _on_the_fly_config(bits)).model
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    _same_outputs_with_input(model, tmp_path)


@pytest.mark.parametrize("bits", [0, 2, 3, 4, 8, 11, 16])
def test_converted_weights_decode_identically(tmp_path, bits):
    """The whole pass (fixed bit, or mixed bit for 0), whichever forms it chooses."""
    result = convert(_weight_model(), _weight_config(bits))
    assert [q.tensor for q in result.quantized] == ["w"]
    _same_outputs_with_input(result.model, tmp_path)


# ---------------------------------------------------------------- whole models

def _compare_outputs(float_model: onnx.ModelProto, quantized: onnx.ModelProto, feeds, tmp_path: Path,
                     to_each_other: float = 0.9999, to_float: float = 1e-4) -> None:
    """OpenVINO computes the quantized model like ONNX Runtime: each one's output cosine to the float model agrees
    to `to_float`, and their cosine to each other is at least `to_each_other`."""
    if openvino is None:
        pytest.skip(NO_OPENVINO)
    reference = session(float_model).run(None, feeds)[0]
    ort_out = session(quantized).run(None, feeds)[0]
    ov_out = openvino_run(quantized, feeds, tmp_path)[0]
    assert abs(cosine(ov_out, reference) - cosine(ort_out, reference)) <= to_float
    assert cosine(ov_out, ort_out) >= to_each_other


@pytest.mark.parametrize("name", sorted(p.name for p in (EXAMPLES / "configs").glob("*.cfg")))
def test_bundled_configs_on_resnet20_run_alike_in_openvino(tmp_path, monkeypatch, name):
    monkeypatch.chdir(ROOT)  # the FULL_QUANT config names examples/calib relative to the repository root
    float_model = onnx.load(RESNET20)
    quantized = convert(onnx.load(RESNET20), load_config(EXAMPLES / "configs" / name)).model
    x = np.random.default_rng(2).uniform(-2, 2, (4, 3, 32, 32)).astype(np.float32)
    # FULL_QUANT: OpenVINO runs the QDQ pairs as its own int8 kernels, whose activation rounding differs a little
    # (cosine to ONNX Runtime 0.99984 on this input); weight-only and dynamic outputs agree to 1e-12.
    _compare_outputs(float_model, quantized, {"input": x}, tmp_path, 0.999 if name == "full_quant.cfg" else 0.9999)


def _minilm_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 30000, size=(2, 32)).astype(np.int64)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


MINILM_CONFIGS = {
    "8 bit": (8, False),
    "4 bit": (4, True),
    "mixed bit 0.02": (0, True),
    "DYNAMIC_QUANT ALWC": ("ALWC", True),
    "DYNAMIC_QUANT ACWL": ("ACWL", True),
}


@pytest.mark.parametrize("label", MINILM_CONFIGS)
def test_minilm_runs_alike_in_openvino(tmp_path, label):
    bits, slow = MINILM_CONFIGS[label]
    if not (ROOT.parent / "shared" / "bench").is_dir() or not MINILM.is_file():
        pytest.skip("needs ../shared/bench and the MiniLM model built by bench/minilm.py (.cache/minilm)")
    if slow and not SLOW:
        pytest.skip("slow (conversion of MiniLM); set PTQLITE_SLOW_TESTS=1 to run it")
    to_each_other, to_float = 0.9999, 1e-4
    if isinstance(bits, str):
        # Activations quantized at run time: one code that OpenVINO's float ops (LayerNorm, Softmax, Erf, its
        # DynamicQuantizeLinear's (max - min) * (1/255)) move across a rounding boundary changes every later
        # per-tensor or per-row range. Measured on this input: ALWC 0.9962, ACWL 0.9992 to onnxruntime, and
        # onnxruntime against itself with 1-ulp LayerNorm weights as low as 0.9934 / 0.9986 (docs/results.md,
        # "Portable outputs"); the cosines to float stay within 1e-3 of each other.
        config = parse_config("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n"
                              f"[dynamic_quant_param]\nquant_strategy={bits}\n")
        to_each_other, to_float = 0.99, 1e-3
    else:
        config = _weight_config(bits, "[mixed_bit_weight_quant_param]\ninit_scale=0.02\n" if bits == 0 else "")
    float_model = onnx.load(MINILM)
    _compare_outputs(float_model, convert(onnx.load(MINILM), config).model, _minilm_feeds(), tmp_path,
                     to_each_other, to_float)


@pytest.mark.parametrize("strategy", ["ALWC", "ACWL"])
def test_dynamic_matmul_runs_alike_in_openvino(tmp_path, strategy):
    """The DYNAMIC_QUANT pattern itself (on identical float inputs) computes alike; OpenVINO's
    DynamicQuantizeLinear scale, (max - min) * (1/255) instead of (max - min) / 255, moves a few codes (ALWC)."""
    rng = np.random.default_rng(7)
    w = helper.make_tensor("w", TensorProto.FLOAT, (64, 96), (rng.standard_normal((64, 96)) * 0.1).astype(np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, (96,), rng.standard_normal(96).astype(np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = parse_config("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n"
                          f"[dynamic_quant_param]\nquant_strategy={strategy}\n")
    x = rng.standard_normal((2, 16, 64)).astype(np.float32)
    _compare_outputs(float_model, convert(float_model, config).model, {"x": x}, tmp_path, 0.99999)


# ---------------------------------------------------------------- FULL_QUANT graph forms


def _channel_pad_model() -> onnx.ModelProto:
    """The option-A shortcut of the CIFAR ResNets: Conv -> Relu, then Slice (stride 2) -> Pad of the channel axis
    with zeros added to a strided Conv of the same Relu output."""
    rng = np.random.default_rng(20)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Slice", ["r1", "starts", "ends", "axes", "steps"], ["s"], name="slice"),
        helper.make_node("Pad", ["s", "pads"], ["p"], name="pad", mode="constant"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Add", ["c2", "p"], ["y"], name="add"),
    ]
    ints = {"starts": [0, 0], "ends": [8, 8], "axes": [2, 3], "steps": [2, 2], "pads": [0, 4, 0, 0, 0, 4, 0, 0]}
    inits = [initializer("w1", rng.normal(0, 0.3, (8, 3, 3, 3))), initializer("b1", rng.normal(0, 0.1, 8)),
             initializer("w2", rng.normal(0, 0.1, (16, 8, 3, 3))), initializer("b2", rng.normal(0, 0.1, 16))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["CPU", "NVGPU", "DSP", "ASCEND"])
def test_channel_pad_runs_on_codes(target):
    """A constant Pad between QDQ pairs of one set of parameters pads the integer codes with the code of its
    value (the zero point for 0) and has only a DequantizeLinear after it; the QDQ arithmetic is the same as
    QuantizeLinear(Pad(DequantizeLinear(q)))."""
    float_model = _channel_pad_model()
    quantized = convert(float_model, full_config(target=target), samples=samples((1, 3, 8, 8))).model
    index = GraphIndex(quantized.graph)
    pad = next(n for n in quantized.graph.node if n.op_type == "Pad")
    assert index.producer[pad.input[0]].op_type == "QuantizeLinear"
    assert [n.op_type for n, _ in index.consumers[pad.output[0]]] == ["DequantizeLinear"]
    zero = index.array(index.producer[pad.input[0]].input[2])
    np.testing.assert_array_equal(index.array(pad.input[2]), zero)
    feeds = samples((1, 3, 8, 8), count=4, seed=5)
    exact, fused = outputs(quantized, feeds, fused=False), outputs(quantized, feeds)
    reference = outputs(float_model, feeds)
    assert cosine(exact, reference) > 0.99 and cosine(fused, reference) > 0.99


@pytest.mark.parametrize("target", ["CPU", "NVGPU", "DSP", "ASCEND"])
def test_full_quant_presets_on_resnet20_run_alike_in_openvino(tmp_path, monkeypatch, target):
    """Each preset's ResNet20 in OpenVINO. ASCEND (int8 activations, zero point -128 after a Relu) gave cosine
    0.31 to onnxruntime: OpenVINO 2026.4 pads the option-A shortcut's channel Pad with code 0 when the Pad is
    written in float between QDQ pairs (test_channel_pad_runs_on_codes)."""
    monkeypatch.chdir(ROOT)
    text = (EXAMPLES / "configs" / "full_quant.cfg").read_text().replace("target_device=CPU", f"target_device={target}")
    quantized = convert(onnx.load(RESNET20), parse_config(text.replace("calibrate_size=100", "calibrate_size=20"))).model
    x = np.random.default_rng(2).uniform(-2, 2, (4, 3, 32, 32)).astype(np.float32)
    _compare_outputs(onnx.load(RESNET20), quantized, {"input": x}, tmp_path, 0.999, to_float=1e-3)


def test_full_quant_file_computes_alike_without_int8_kernels(tmp_path, monkeypatch):
    """Where FULL_QUANT outputs differ between runtimes (0.9995 on ResNet20), the runtimes' int8 kernels round
    otherwise, not the file: onnxruntime with graph optimisation off (QDQ as the ONNX spec's float arithmetic)
    and OpenVINO with its low-precision transformations off agree to >= 0.9999, and the reference evaluator
    computes onnxruntime's output (docs/results.md, "Portable outputs: the 0.9999 bound")."""
    if openvino is None:
        pytest.skip(NO_OPENVINO)
    monkeypatch.chdir(ROOT)
    text = (EXAMPLES / "configs" / "full_quant.cfg").read_text().replace("calibrate_size=100", "calibrate_size=20")
    quantized = convert(onnx.load(RESNET20), parse_config(text)).model
    x = np.random.default_rng(2).uniform(-2, 2, (4, 3, 32, 32)).astype(np.float32)
    plain = session(quantized, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"input": x})[0]
    exact = openvino_run(quantized, {"input": x}, tmp_path, {"LP_TRANSFORMS_MODE": False})[0]
    kernels = openvino_run(quantized, {"input": x}, tmp_path)[0]
    assert cosine(exact, plain) >= 0.9999
    assert cosine(kernels, plain) < cosine(exact, plain)  # the int8 kernels are where the two part
    from onnx import version_converter

    reference = ReferenceEvaluator(version_converter.convert_version(quantized, 21)).run(None, {"input": x[:1]})[0]
    assert cosine(reference, session(quantized).run(None, {"input": x[:1]})[0]) >= 0.9999


@pytest.mark.parametrize("width", [64, 70])
def test_block_embedding_rows_run_alike_in_openvino(tmp_path, width):
    """ON_THE_FLY block-wise Gather tables: OpenVINO 2026.4 refused the block-wise DequantizeLinear of the gathered
    rows ("DequantizeLinear cannot operate with dynamic shapes of input X"; MiniLM 4 bit block 32 did not
    compile); the rows are now decoded by Cast, Sub and Mul on [rows, blocks, block]. Width 70: a partial last
    block, padded in the table and cut off the decoded rows."""
    rng = np.random.default_rng(8)
    table = helper.make_tensor("embed", TensorProto.FLOAT, (300, width),
                               (rng.standard_normal((300, width))).astype(np.float32))
    graph = helper.make_graph([helper.make_node("Gather", ["embed", "ids"], ["y"], axis=0)], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table])
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    config = ("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=4\nmin_quant_weight_size=0\n"
              "min_quant_weight_channel=0\n[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n"
              "block_size=32\ngather_min_bit_num=0\n")
    ids = rng.integers(0, 300, (2, 7)).astype(np.int64)
    # int4 codes two a byte, split in float after the Gather (gather_min_bit_num=0), the default 6-bit table (4
    # codes in 3 bytes, unpacked by BitShift and BitwiseAnd) and an int8 table with a scale per row; float16
    # scales cast after their Gather
    for text, codes in ((config, TensorProto.UINT8), (config.replace("gather_min_bit_num=0", ""), TensorProto.UINT8),
                        (config.replace("gather_min_bit_num=0", "gather_min_bit_num=8"), TensorProto.INT8)):
        quantized = convert(float_model, parse_config(text)).model
        tables = {t.name: t.data_type for t in quantized.graph.initializer}
        assert tables["embed_quantized"] == codes and tables["embed_scale"] == TensorProto.FLOAT16
        want = session(quantized).run(None, {"ids": ids})[0]
        np.testing.assert_array_equal(ReferenceEvaluator(quantized).run(None, {"ids": ids})[0], want)
        if openvino is not None:
            np.testing.assert_array_equal(openvino_run(quantized, {"ids": ids}, tmp_path)[0], want)
    if openvino is None:
        pytest.skip(NO_OPENVINO)


@pytest.mark.parametrize("width", [64, 37])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 7])
def test_code_groups_unpack_alike_everywhere(tmp_path, bits, width):
    """Rows of codes packed by whole byte groups (qmath.pack_code_groups: 4 codes of 6 bits in 3 bytes), unpacked
    in the graph (weight.CodeGroups: BitShift, BitwiseOr, BitwiseAnd on uint32): the codes of random rows, bit for
    bit, in ONNX Runtime, the reference evaluator (also with saturating, rounding shifts) and OpenVINO, for rows
    of whole groups (64) and rows padded to them (37)."""
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (9, width))
    packed = pack_code_groups(codes, bits)
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("rows", TensorProto.UINT8,
                                                                       ["n", packed.shape[1]])], [], [])
    index = GraphIndex(graph)
    groups = CodeGroups(index, "t", bits, width)
    nodes: list[onnx.NodeProto] = []

    def add(op, inputs, kind, **attrs):
        nodes.append(helper.make_node(op, inputs, [index.unique_name(kind)], **attrs))
        return nodes[-1].output[0]

    out = groups.decode(add, "rows")
    graph.node.extend(nodes)
    graph.initializer.extend(groups.constants)
    graph.output.append(helper.make_tensor_value_info(out, TensorProto.UINT32, ["n", width]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    np.testing.assert_array_equal(session(model).run(None, {"rows": packed})[0], codes)
    assert_same_everywhere(model, tmp_path, feeds={"rows": packed})


def test_block_matmul_float16_scales_decode_alike_everywhere(tmp_path):
    """ON_THE_FLY block-wise MatMul weights: int4 codes, float16 block scales cast to float32 before the
    block-wise DequantizeLinear. The decoded weight (a graph output) is bit-identical in ONNX Runtime, the
    reference evaluator and OpenVINO, and the MatMul output agrees."""
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((128, 48)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 48])],
                              [numpy_helper.from_array(w, "w")])
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = parse_config("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=4\nmin_quant_weight_size=0\n"
                          "min_quant_weight_channel=0\n[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n"
                          "block_size=32\n")
    quantized = convert(float_model, config).model
    assert {t.name: t.data_type for t in quantized.graph.initializer}["w_scale_float16"] == TensorProto.FLOAT16
    decoded = onnx.ModelProto()
    decoded.CopyFrom(quantized)
    del decoded.graph.node[-1], decoded.graph.input[:], decoded.graph.output[:]
    decoded.graph.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [128, 48]))
    weight = assert_same_everywhere(decoded, tmp_path)[0]
    # ONNX Runtime's fused kernel rounds x to int8 at its default accuracy level: compare it in float (level 0)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    want = x.astype(np.float64) @ weight
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    in_float = ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for got in (in_float.run(None, {"x": x})[0], ReferenceEvaluator(quantized).run(None, {"x": x})[0],
                openvino_run(quantized, {"x": x}, tmp_path)[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 11, 16])
def test_default_block_weights_decode_identically(tmp_path, bits):
    """The default strategy with block_size: the decoded MatMul and Gemm weights (folded at load) and the gathered
    rows of the integer table (decoded at run time, on ids of a dynamic shape), bit for bit."""
    model = block_model(width=70)  # a partial last block along the rows and along mm2's K
    quantized = convert(model, default_config(bits)).model
    del quantized.graph.output[:]  # only what the decoders compute: the ops' own kernels round as they like
    shapes = {"e": [5, 70], "mm1": [70, 80], "mm2": [80, 96], "fc": [48, 96]}
    quantized.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in PROBES)
    assert_same_everywhere(quantized, tmp_path, feeds=BLOCK_FEEDS)


def test_acwl_resnet20_runs_alike_in_openvino(tmp_path):
    """ACWL's row codes: a per-axis QuantizeLinear with a scale computed at run time compiled in OpenVINO 2026.4
    but failed when run (FakeQuantize bounds [rows] against data [rows, K]); Mul, Round, Add and Cast run."""
    config = parse_config("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n"
                          "[dynamic_quant_param]\nquant_strategy=ACWL\n")
    x = np.random.default_rng(2).uniform(-2, 2, (4, 3, 32, 32)).astype(np.float32)
    _compare_outputs(onnx.load(RESNET20), convert(onnx.load(RESNET20), config).model, {"input": x}, tmp_path)

"""Block-wise int4/int8 weights (ON_THE_FLY with block_size) and the opset raise they need."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import (
    BLOCK_FEEDS,
    BLOCK_WEIGHTS,
    PROBES,
    block_model,
    cosine,
    default_config,
    run,
    session,
    with_outputs,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ptqlite.blockwise import float16_grid, quantize_blocks
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.errors import ConversionError
from ptqlite.model import ensure_opset
from ptqlite.opset import changed_ops, raise_opset
from ptqlite.qmath import code_groups, pack_int4

RNG = np.random.default_rng(7)
K, N, OUT = 256, 96, 40


def _weights(*shape, scale=0.05, rng=RNG):
    w = rng.standard_normal(shape) * scale
    w[rng.random(shape) < 0.005] *= 6  # a few outliers, as trained weights have
    return w.astype(np.float32)


def matmul_model(opset: int = 17) -> onnx.ModelProto:
    """x -> MatMul -> LayerNorm-like ReduceMean/Sub (axes attribute before opset 18) -> MatMul -> Gemm(transB)."""
    reduce = (helper.make_node("ReduceMean", ["h", "axes"], ["m"], name="mean") if opset >= 18
              else helper.make_node("ReduceMean", ["h"], ["m"], name="mean", axes=[-1]))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), reduce,
             helper.make_node("Sub", ["h", "m"], ["c"], name="centre"),
             helper.make_node("MatMul", ["c", "w2"], ["g"], name="mm2"),
             helper.make_node("Gemm", ["g", "w3"], ["y"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(_weights(K, N), "w1"), numpy_helper.from_array(_weights(N, 64), "w2"),
             numpy_helper.from_array(_weights(OUT, 64), "w3")]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


FEEDS = {"x": RNG.standard_normal((4, K)).astype(np.float32)}


def config(bits: int = 4, block: int = 32, extra: str = ""):
    text = (f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num={bits}\n[weight_quant_param]\n"
            f"dequant_strategy=ON_THE_FLY\nblock_size={block}\n{extra}")
    return parse_config(text, "test.cfg")


def test_pack_int4_low_nibble_first_matches_onnx():
    values = np.array([-8, 7, 1, -1, 3], np.int8)
    tensor = helper.make_tensor("t", TensorProto.INT4, [5], pack_int4(values), raw=True)
    assert pack_int4(values) == bytes([0x78, 0xF1, 0x03])
    assert numpy_helper.to_array(tensor).tolist() == values.tolist()


def test_quantize_blocks_layout_and_search_beats_round_to_nearest():
    w = _weights(100, 24)  # 100 rows: the last block of 32 is partial
    rtn, searched = (quantize_blocks(w, 4, 0, 32, search=s) for s in (False, True))
    assert searched.scale.shape == searched.zero_point.shape == (4, 24) and searched.codes.shape == (100, 24)
    assert searched.codes.min() >= -8 and searched.codes.max() <= 7
    assert searched.zero_point.min() >= -8 and searched.zero_point.max() <= 7
    error = {name: float(np.linalg.norm(q.dequantized() - w) / np.linalg.norm(w))
             for name, q in (("rtn", rtn), ("searched", searched))}
    assert error["searched"] < 0.97 * error["rtn"]  # the clip search and refit gain at least 3% here
    # along axis 1 (Gemm transB, Gather rows): the same blocks, transposed
    transposed = quantize_blocks(w.T.copy(), 4, 1, 32)
    assert transposed.scale.shape == (24, 4)
    np.testing.assert_array_equal(transposed.codes, searched.codes.T)


def test_on_the_fly_block_32_int4_matmul(tmp_path):
    model = matmul_model()
    result = convert(model, config())
    out = result.model
    assert out.opset_import[0].version == 21 and out.ir_version >= 10
    assert {q.storage for q in result.quantized} == {"DequantizeLinear int4 block 32"}
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3
    attrs = {n.output[0]: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in dq}
    # blocks run along K: axis 0 for MatMul's B [K, N], axis 1 for Gemm's transposed B [N, K]
    assert attrs == {"w1": {"axis": 0, "block_size": 32}, "w2": {"axis": 0, "block_size": 32},
                     "w3": {"axis": 1, "block_size": 32}}
    inits = {t.name: t for t in out.graph.initializer}
    codes = inits["w1_quantized"]
    assert codes.data_type == TensorProto.INT4 and not codes.int32_data and len(codes.raw_data) == K * N // 2
    # the scales are stored as float16, cast to float32 for the DequantizeLinear
    scale = inits["w1_scale_float16"]
    assert scale.data_type == TensorProto.FLOAT16 and tuple(scale.dims) == (K // 32, N) and "w1_scale" not in inits
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert [(n.input[0], n.output[0]) for n in casts if n.output[0] == "w1_scale"] == [("w1_scale_float16",
                                                                                      "w1_scale")]
    for want, got in zip(run(model, FEEDS), run(out, FEEDS)):
        assert cosine(want, got) > 0.98  # three stacked 4-bit layers of random weights
    # ONNX Runtime folds the Casts, then fuses DequantizeLinear + MatMul into its 4-bit kernel with float32 scales
    optimized = tmp_path / "opt.onnx"
    session(out, optimized_path=optimized)
    opt = onnx.load(optimized)
    ops = collections.Counter(n.op_type for n in opt.graph.node)
    assert ops["MatMulNBits"] == 2 and ops["MatMul"] == 0 and ops["Cast"] == 0
    opt_inits = {t.name: t for t in opt.graph.initializer}
    fused_scales = [opt_inits[n.input[2]] for n in opt.graph.node if n.op_type == "MatMulNBits"]
    assert [t.data_type for t in fused_scales] == [TensorProto.FLOAT] * 2


def test_block_scales_are_searched_on_the_float16_grid():
    """The stored float16 scales are the ones the search measured: codes chosen for the rounded scale, and the
    float16 file decodes to exactly the weight the search's error describes."""
    w = _weights(K, N)
    half = quantize_blocks(w, 4, 0, 32, scale_grid=float16_grid)
    assert np.array_equal(half.scale.astype(np.float16).astype(np.float32), half.scale)
    full = quantize_blocks(w, 4, 0, 32)
    assert not np.array_equal(full.scale.astype(np.float16).astype(np.float32), full.scale)
    error = {name: float(np.linalg.norm(q.dequantized() - w) / np.linalg.norm(w)) for name, q in
             (("half", half), ("full", full))}
    assert error["half"] < 1.002 * error["full"]  # 11 bits of mantissa cost under 0.2% of the error
    # the weight the converted model computes is the search's (float16 scales cast to float32 exactly)
    model = matmul_model()
    out = convert(model, config()).model
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, None))
    model_w1 = numpy_helper.to_array({t.name: t for t in model.graph.initializer}["w1"])
    want = quantize_blocks(model_w1, 4, 0, 32, scale_grid=float16_grid).dequantized()
    np.testing.assert_array_equal(run(probe, FEEDS)[-1], want)


def test_huge_weights_keep_float32_scales():
    """A block whose scale would pass float16's largest value (65504) keeps float32 scales for the tensor."""
    model = matmul_model()
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1) * np.float32(1e8), "w1"))
    out = convert(model, config(), verify=False).model
    inits = {t.name: t for t in out.graph.initializer}
    assert inits["w1_scale"].data_type == TensorProto.FLOAT and "w1_scale_float16" not in inits
    assert inits["w2_scale_float16"].data_type == TensorProto.FLOAT16


def test_block_int4_file_is_smaller_than_int8_and_closer_than_per_channel_int4():
    model = matmul_model()
    sizes, cosines = {}, {}
    for name, cfg in (("int8", config(bits=8, block=0)), ("int4 per channel", config(block=0)),
                      ("int4 block 32", config())):
        out = convert(model, cfg).model
        sizes[name] = out.ByteSize()
        cosines[name] = cosine(run(model, FEEDS)[0], run(out, FEEDS)[0])
    assert sizes["int4 block 32"] < 0.7 * sizes["int8"]
    assert sizes["int4 per channel"] < 0.6 * sizes["int8"]
    assert cosines["int4 block 32"] > cosines["int4 per channel"]


def test_per_channel_int4_is_raw_packed_too():
    out = convert(matmul_model(), config(block=0)).model
    int4 = [t for t in out.graph.initializer if t.data_type == TensorProto.INT4]
    assert int4 and all(t.raw_data and not t.int32_data for t in int4)


@pytest.mark.parametrize("bits, dtype", [(8, TensorProto.INT8), (6, TensorProto.INT8), (3, TensorProto.INT4)])
def test_block_widths_store_their_type(bits, dtype):
    model = matmul_model()
    result = convert(model, config(bits=bits))
    codes = {t.name: t for t in result.model.graph.initializer}["w1_quantized"]
    assert codes.data_type == dtype
    assert cosine(run(model, FEEDS)[0], run(result.model, FEEDS)[0]) > (0.999 if bits >= 6 else 0.95)


def test_block_size_keeps_other_weights_per_channel():
    """A Conv weight is not split into blocks; it stays per output channel behind its DequantizeLinear."""
    w = numpy_helper.from_array(_weights(32, 8, 3, 3), "conv_w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "conv_w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                              "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 6, 6])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert(model, config())
    assert [q.storage for q in result.quantized] == ["DequantizeLinear int4"]


def test_block_size_on_a_model_that_cannot_reach_opset_21_is_an_error():
    model = matmul_model(18)
    model.opset_import[0].version = 22  # already past 21: nothing to raise
    result = convert(model, config())
    assert {q.storage for q in result.quantized} == {"DequantizeLinear int4 block 32"}
    broken = matmul_model(opset=11)
    broken.graph.node[0].op_type = "NoSuchOp"  # the converter cannot move an unknown op
    with pytest.raises(ConversionError, match="block_size with ON_THE_FLY needs opset 21"):
        convert(broken, config(), validate=False)  # the input rules would refuse the unknown op first


# ---------------------------------------------------------------- opset raise


@pytest.mark.parametrize("opset", [13, 15, 17, 18, 20])
def test_opset_raise_without_converter_preserves_outputs(opset):
    model = matmul_model(opset)
    want = run(model, FEEDS)
    assert changed_ops(model.graph, opset, 21) == []
    assert raise_opset(model, 21) == "direct"
    assert model.opset_import[0].version == 21 and model.ir_version == 10
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(run(model, FEEDS)[0], want[0])
    if opset < 18:  # the axes attribute became an input
        mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
        assert len(mean.input) == 2 and not mean.attribute


def test_opset_raise_rewrites_split_without_sizes():
    nodes = [helper.make_node("Split", ["x"], ["a", "b"], name="split", axis=1),
             helper.make_node("Sub", ["a", "b"], ["y"], name="sub")]
    graph = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feeds = {"x": RNG.standard_normal((2, 4)).astype(np.float32)}
    want = run(model, feeds)[0]
    assert raise_opset(model, 21) == "direct"
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(run(model, feeds)[0], want)


def test_opset_raise_with_a_changed_op_uses_the_converter_without_weights():
    """GroupNormalization changed its scale/bias meaning in opset 21: the converter runs, on a weight-free copy."""
    model = matmul_model(13)
    model.graph.node.append(helper.make_node("RoiAlign", ["r", "rois", "idx"], ["unused"], name="roi"))
    assert changed_ops(model.graph, 13, 21) == ["RoiAlign (opset 16)"]
    model.graph.node.pop()
    # a model the direct path refuses (opset 11: Softmax and Squeeze changed at 13) still converts, weights intact
    old = matmul_model(11)
    weights = {t.name: t.raw_data for t in old.graph.initializer}
    want = run(old, FEEDS)[0]
    assert raise_opset(old, 21) == "converter"
    assert {t.name: t.raw_data for t in old.graph.initializer if t.name in weights} == weights
    onnx.checker.check_model(old, full_check=True)
    np.testing.assert_allclose(run(old, FEEDS)[0], want, rtol=1e-6, atol=1e-6)


def test_ensure_opset_reports_a_converter_failure():
    model = matmul_model(11)
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ConversionError, match="cannot raise the model's opset to 21"):
        ensure_opset(model, 21)


def test_4_bit_per_channel_that_cannot_reach_opset_21_warns_and_says_why(caplog):
    model = matmul_model(17)
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"], name="odd"))  # the converter refuses it
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    # no runtime can run NoSuchOp, so the verification gate is off as well as the input rules
    result = convert(model, config(block=0), validate=False, verify=False)
    assert {q.storage for q in result.quantized} == {"DequantizeLinear int8"}
    assert any("4-bit weights are stored as int8: int4 needs opset 21" in n for n in result.notes)
    assert "4-bit weights are stored as int8" in caplog.text


@pytest.mark.parametrize("bits", [4, 8])
def test_block_embedding_is_gathered_as_integers_and_rows_dequantized(tmp_path, bits):
    rng = np.random.default_rng(17)  # its own data: the cosine bound must not depend on which tests ran before
    table = numpy_helper.from_array(_weights(300, 64, rng=rng), "embed")
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["e"], name="gather", axis=0),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 48])],
                              [table, numpy_helper.from_array(_weights(64, 48, rng=rng), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert(model, config(bits=bits, extra="gather_min_bit_num=0\n"))  # the table at bit_num too
    storage = {q.tensor: q.storage for q in result.quantized}
    assert storage["embed"] == f"DequantizeLinear int{bits} block 32 of the gathered rows"
    feeds = {"ids": rng.integers(0, 300, (2, 5)).astype(np.int64)}
    assert cosine(run(model, feeds)[0], run(result.model, feeds)[0]) > (0.99 if bits == 4 else 0.9999)
    # the rows decoded are exactly the table's blocks dequantized
    from ptqlite.blockwise import quantize_blocks as blocks
    want_rows = blocks(numpy_helper.to_array(table), bits, 1, 32, scale_grid=float16_grid).dequantized()[feeds["ids"]]
    probe = onnx.ModelProto()
    probe.CopyFrom(result.model)
    probe.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
    np.testing.assert_array_equal(run(probe, feeds)[1], want_rows)
    # the file's table: int4 codes two a byte (uint8 [300, 32]) or int8 codes; float16 scales
    inits = {t.name: t for t in result.model.graph.initializer}
    stored = inits["embed_quantized"]
    assert (stored.data_type, tuple(stored.dims)) == ((TensorProto.UINT8, (300, 32)) if bits == 4 else
                                                      (TensorProto.INT8, (300, 64)))
    assert inits["embed_scale"].data_type == TensorProto.FLOAT16
    # after load the Gather reads that table itself: no Cast or DequantizeLinear made a copy of it at load
    optimized = tmp_path / "opt.onnx"
    session(result.model, optimized_path=optimized)
    opt = onnx.load(optimized)
    tables = [t for t in opt.graph.initializer if t.dims[:1] == [300] and len(t.dims) == 2 and t.dims[1] > 2]
    assert [(t.data_type, tuple(t.dims)) for t in tables] == [(stored.data_type, tuple(stored.dims))]
    assert {n.op_type for n in opt.graph.node if tables[0].name in n.input} == {"Gather"}


def test_block_relative_error_matches_the_dequantized_weight():
    w = _weights(70, 40)
    for axis in (0, 1):
        q = quantize_blocks(w, 4, axis, 16)
        direct = float(np.sum((q.dequantized().astype(np.float64) - w) ** 2))
        assert q.squared_error == pytest.approx(direct, rel=1e-4)


def test_every_listed_revision_exists_in_onnx():
    """Each op of the direct-raise table really has a revision at that opset (guards against a typo that would
    let a changed op through)."""
    from onnx import defs

    from ptqlite.opset import _REDUCE_18, _TYPES_OR_DEFAULTS

    for version, ops in _TYPES_OR_DEFAULTS.items():
        for op in ops:
            assert defs.get_schema(op, version).since_version == version, (op, version)
    for op in _REDUCE_18:
        assert defs.get_schema(op, 18).since_version == 18, op


def test_opset_raise_rewrites_reduce_inside_if_bodies():
    def branch(name, op):
        node = helper.make_node(op, ["x"], [f"{name}_y"], name=f"{name}_reduce", axes=[-1], keepdims=1)
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                  [3, 1])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("a", "ReduceMean"),
                              else_branch=branch("b", "ReduceMax"))]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                             helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    want = [run(model, {"c": np.array(flag), "x": x})[0] for flag in (True, False)]
    assert raise_opset(model, 21) == "direct"
    onnx.checker.check_model(model, full_check=True)
    for flag, expected in zip((True, False), want):
        np.testing.assert_array_equal(run(model, {"c": np.array(flag), "x": x})[0], expected)


def test_block_search_gives_the_same_codes_on_any_number_of_threads(monkeypatch):
    """The chunks of a weight are searched on the CPU's cores; the result must not depend on how many."""
    from ptqlite import blockwise

    w = np.random.default_rng(3).standard_normal((512, 640)).astype(np.float32)
    monkeypatch.setattr(blockwise, "_THREADS", 4)
    many = blockwise.quantize_blocks(w, 4, 0, 32)
    monkeypatch.setattr(blockwise, "_THREADS", 1)
    one = blockwise.quantize_blocks(w, 4, 0, 32)
    np.testing.assert_array_equal(many.codes, one.codes)
    np.testing.assert_array_equal(many.scale, one.scale)
    np.testing.assert_array_equal(many.zero_point, one.zero_point)
    assert many.squared_error == one.squared_error and many.squared_norm == one.squared_norm


def test_gathered_tables_get_6_bits_by_default():
    """With block_size, a table that is only gathered gets at least gather_min_bit_num bits (default 6): below 8
    bits in blocks of 64 (weight.RAISED_BLOCK), 6-bit codes packed 4 in 3 bytes; at 8 bits one scale per row;
    MatMul weights keep bit_num."""
    table = _weights(300, 256)
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["e"], name="gather", axis=0),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 48])],
                              [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(_weights(256, 48), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"ids": RNG.integers(0, 300, (2, 5)).astype(np.int64)}
    errors = {}
    for extra in ("", "gather_min_bit_num=0\n", "gather_min_bit_num=8\n"):
        result = convert(model, config(extra=extra))
        records = {q.tensor: q for q in result.quantized}
        inits = {t.name: t for t in result.model.graph.initializer}
        errors[extra] = records["embed"].relative_error
        assert records["w"].bits == 4 and records["w"].storage == "DequantizeLinear int4 block 32"
        stored, scale = inits["embed_quantized"], inits["embed_scale"]
        if extra == "":
            assert records["embed"].bits == 6
            assert records["embed"].storage == "DequantizeLinear int6 block 64 of the gathered rows (4 codes in 3 bytes)"
            assert (stored.data_type, tuple(stored.dims)) == (TensorProto.UINT8, (300, 192))
            assert tuple(scale.dims) == (300, 4) and scale.data_type == TensorProto.FLOAT16
        elif extra.endswith("8\n"):
            assert records["embed"].bits == 8
            assert records["embed"].storage == "DequantizeLinear int8 block 256 of the gathered rows"
            assert (stored.data_type, tuple(scale.dims)) == (TensorProto.INT8, (300, 1))
        else:
            assert records["embed"].bits == 4 and tuple(scale.dims) == (300, 8)
        # the decoded rows are the table's blocks dequantized, bit for bit
        bits, block = records["embed"].bits, {"": 64, "gather_min_bit_num=0\n": 32}.get(extra, 256)
        want = quantize_blocks(table, bits, 1, block, scale_grid=float16_grid).dequantized()[feeds["ids"]]
        np.testing.assert_array_equal(run(with_outputs(result.model, ["e"]), feeds)[1], want)
    assert errors["gather_min_bit_num=8\n"] < errors[""] < errors["gather_min_bit_num=0\n"]


def _block_errors(q, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """float64 squared error of each block of `q` against w (blocks along q.axis), weighted along that axis."""
    d = np.square(q.dequantized().astype(np.float64) - w)
    d = np.moveaxis(d, q.axis, 0)
    if importance is not None:
        d = d * importance.reshape(-1, *([1] * (d.ndim - 1)))
    starts = np.arange(0, d.shape[0], q.block)
    return np.add.reduceat(d, starts, axis=0)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["gauss", "t2", "t4", "outliers", "positive", "constant", "sparse"]),
       bits=st.sampled_from([2, 3, 4, 8]), block=st.sampled_from([16, 32, 64]), axis=st.sampled_from([0, 1]),
       rows=st.integers(1, 150), cols=st.integers(1, 40), seed=st.integers(0, 2 ** 16), weighted=st.booleans())
def test_block_search_is_never_worse_than_round_to_nearest(kind, bits, block, axis, rows, cols, seed, weighted):
    """Block by block, on Gaussian, heavy-tailed (Student t, outliers), one-signed, constant and sparse weights;
    with element weights (importance) the weighted error is never worse than round to nearest's."""
    rng = np.random.default_rng(seed)
    shape = (rows, cols)
    w = {"gauss": lambda: rng.standard_normal(shape),
         "t2": lambda: rng.standard_t(2, shape),
         "t4": lambda: rng.standard_t(4, shape),
         "outliers": lambda: rng.standard_normal(shape) * np.where(rng.random(shape) < 0.01, 20.0, 1.0),
         "positive": lambda: rng.random(shape) + 0.5,
         "constant": lambda: np.full(shape, rng.standard_normal()),
         "sparse": lambda: rng.standard_normal(shape) * (rng.random(shape) < 0.1)}[kind]()
    w = (w * 0.02).astype(np.float32)
    h = (rng.random(shape[axis]) ** 4).astype(np.float32) if weighted else None  # a few channels matter most
    rtn = quantize_blocks(w, bits, axis, block, search=False)
    searched = quantize_blocks(w, bits, axis, block, importance=h)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert searched.codes.min() >= qmin and searched.codes.max() <= qmax
    assert np.all(searched.scale > 0) and searched.zero_point.min() >= qmin and searched.zero_point.max() <= qmax
    if h is None:
        assert searched.squared_error <= rtn.squared_error  # the search's own measure: never worse, exactly
    # the float64 error of the dequantized weights, block by block (float32 rounding of the measure aside)
    ours, theirs = _block_errors(searched, w, h), _block_errors(rtn, w, h)
    np.testing.assert_array_less(ours, theirs * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_block_search_gains_on_heavy_tailed_weights(axis):
    """The clip search and least-squares scales gain at least 4% of squared error on Student t(3) weights."""
    w = (np.random.default_rng(5).standard_t(3, (256, 96)) * 0.02).astype(np.float32)
    rtn, searched = (quantize_blocks(w, 4, axis, 32, search=s) for s in (False, True))
    assert searched.squared_error < 0.96 * rtn.squared_error


def test_block_search_is_the_same_on_any_number_of_threads_along_both_axes(monkeypatch):
    """Row blocks (axis 1, searched transposed) and column tiles (a wide weight) split the same on any thread
    count, and a second run gives the same bytes."""
    from ptqlite import blockwise

    rng = np.random.default_rng(11)
    monkeypatch.setattr(blockwise, "_CHUNK", 1 << 12)  # several chunks and column tiles on a small weight
    for w, axis in ((rng.standard_t(3, (300, 520)).astype(np.float32), 0),
                    (rng.standard_t(3, (520, 300)).astype(np.float32), 1)):
        results = []
        for threads in (1, 3, 1):
            monkeypatch.setattr(blockwise, "_THREADS", threads)
            results.append(blockwise.quantize_blocks(w, 4, axis, 32))
        for other in results[1:]:
            for field in ("codes", "scale", "zero_point"):
                np.testing.assert_array_equal(getattr(other, field), getattr(results[0], field))
            assert other.squared_error == results[0].squared_error
            assert other.squared_norm == results[0].squared_norm


def test_block_scale_grid_gives_the_error_of_the_stored_scale():
    """With scales rounded to a grid (float16 here), the codes and the measured error are those of the rounded
    scale: dequantizing with the stored scale reproduces the error."""
    w = _weights(128, 48)
    as_half = lambda s: s.astype(np.float16).astype(np.float32)
    for search in (False, True):
        q = quantize_blocks(w, 4, 0, 32, search=search, scale_grid=as_half)
        np.testing.assert_array_equal(q.scale, as_half(q.scale))
        direct = float(np.sum((q.dequantized().astype(np.float64) - w) ** 2))
        assert q.squared_error == pytest.approx(direct, rel=1e-4)


def test_block_importance_of_ones_is_the_plain_search():
    w = _weights(100, 24)
    plain = quantize_blocks(w, 4, 0, 32)
    ones = quantize_blocks(w, 4, 0, 32, importance=np.ones(100, np.float32))
    for field in ("codes", "scale", "zero_point"):
        np.testing.assert_array_equal(getattr(ones, field), getattr(plain, field))
    assert ones.squared_error == plain.squared_error


@pytest.mark.parametrize("axis", [0, 1])
def test_block_importance_lowers_the_output_error_of_the_layer(axis):
    """Activations with a few loud input channels (as transformers have): weighting the search by each input
    channel's mean square gives a smaller output error x @ (w - dequantized) than the plain search, and never a
    larger weighted error than round to nearest."""
    rng = np.random.default_rng(2)
    k, n = 256, 64
    x = rng.standard_normal((512, k)).astype(np.float32) * np.where(rng.random(k) < 0.05, 12.0, 1.0)
    w = (rng.standard_t(4, (k, n)) * 0.02).astype(np.float32)
    h = np.mean(np.square(x), axis=0)
    layout = w if axis == 0 else w.T.copy()  # axis 1: a Gemm transB weight [n, k]

    def output_error(q):
        d = q.dequantized() if axis == 0 else q.dequantized().T
        return float(np.sum(np.square(x @ (d.astype(np.float64) - w))))

    plain = quantize_blocks(layout, 4, axis, 32)
    weighted = quantize_blocks(layout, 4, axis, 32, importance=h)
    rtn = quantize_blocks(layout, 4, axis, 32, search=False)
    assert output_error(weighted) < 0.9 * output_error(plain)
    per_row = h[:, None] if axis == 0 else h[None, :]
    weighted_error = {name: float(np.sum(per_row * np.square(q.dequantized().astype(np.float64) - layout)))
                      for name, q in (("weighted", weighted), ("rtn", rtn))}
    assert weighted_error["weighted"] <= weighted_error["rtn"] * (1 + 1e-6)
    direct = float(np.sum(np.square(weighted.dequantized().astype(np.float64) - layout)))
    assert weighted.squared_error == pytest.approx(direct, rel=1e-4)  # the plain error is reported


# ---------------------------------------------------------------- default strategy (packed block codes)

@pytest.mark.parametrize("bits", [2, 3, 4, 8, 11, 16])
def test_default_block_weights_equal_on_the_fly_bit_for_bit(tmp_path, bits):
    """The default strategy with block_size stores the codes and scales ON_THE_FLY chooses, and its decoder
    (folded at load) rebuilds exactly what the block-wise DequantizeLinear computes, the gathered rows too."""
    model = block_model()
    packed = convert(model, default_config(bits))
    on_the_fly = convert(model, default_config(bits, extra="dequant_strategy=ON_THE_FLY\n"))
    storage = {q.tensor: q.storage for q in packed.quantized}
    assert storage == {"embed": "packed block 32, gathered rows decoded", "mm1": "packed block 32",
                       "mm2": "packed block 32", "fc": "packed block 32", "conv": "packed"}
    assert not [n for n in packed.model.graph.node if n.op_type in ("DequantizeLinear", "BitShift")]
    got = dict(zip(PROBES, run(with_outputs(packed.model, PROBES), BLOCK_FEEDS)[2:]))
    want = dict(zip(PROBES, run(with_outputs(on_the_fly.model, PROBES), BLOCK_FEEDS)[2:]))
    for name in PROBES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name, axis in BLOCK_WEIGHTS.items():  # and numpy's (codes - zero point) * scale of the same search
        w = numpy_helper.to_array({t.name: t for t in model.graph.initializer}[name])
        np.testing.assert_array_equal(got[name], quantize_blocks(w, bits, axis, 32, scale_grid=float16_grid).dequantized(), err_msg=name)
    # folded at load: the optimized graph holds the float weights and no unpacking (only the rows' decoding)
    optimized = tmp_path / "opt.onnx"
    session(packed.model, optimized_path=optimized)
    opt = onnx.load(optimized)
    assert not {"Range", "Floor", "Mod", "Concat", "Div"} & {n.op_type for n in opt.graph.node}
    float_weights = {tuple(t.dims) for t in opt.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert {(64, 80), (80, 96)} <= float_weights
    # the table stays integer in memory: its rows are gathered as codes
    assert [t.data_type for t in opt.graph.initializer if tuple(t.dims) == (50, 64)] == [
        TensorProto.UINT16 if bits > 8 else TensorProto.UINT8]


def test_default_block_table_of_any_width_decodes_its_gathered_rows():
    """A row width that is not a multiple of the block (70 = 2 x 32 + 6): the last block is partial."""
    model = block_model(width=70)
    result = convert(model, default_config(4))
    table = numpy_helper.to_array(model.graph.initializer[0])
    rows = run(with_outputs(result.model, ["e"]), BLOCK_FEEDS)[2]
    np.testing.assert_array_equal(rows, quantize_blocks(table, 4, 1, 32, scale_grid=float16_grid).dequantized()[BLOCK_FEEDS["ids"]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_default_block_file_is_bit_num_over_32_plus_scales(bits):
    """Codes at bit_num, one float16 scale and a bit_num zero code per 32 weights: (bits + 0.5) / 32 of float,
    plus bits / 1024 for the zero codes, and at most 2 KB of graph (the decoder's nodes and shared constants)."""
    w = numpy_helper.from_array(_weights(512, 256), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = convert(model, default_config(bits)).model
    expected = ((bits + 0.5) / 32 + bits / 1024) * model.ByteSize()
    assert expected <= out.ByteSize() < expected + 2048, out.ByteSize() / model.ByteSize()
    # the same codes as ON_THE_FLY, which stores int4 (bits <= 4) or int8
    otf = convert(model, default_config(bits, extra="dequant_strategy=ON_THE_FLY\n")).model
    assert out.ByteSize() < otf.ByteSize() or bits in (4, 8)


def test_default_block_keeps_the_model_opset_and_needs_no_opset_21():
    model = matmul_model(opset=13)
    out = convert(model, default_config(4)).model
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [14]
    # the same weights as ON_THE_FLY decodes (which raises the opset to 21): the outputs agree to float rounding
    on_the_fly = convert(model, default_config(4, extra="dequant_strategy=ON_THE_FLY\n")).model
    fused_off = {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}  # no MatMulNBits kernel (int8 activations) for ON_THE_FLY
    np.testing.assert_allclose(session(out).run(None, FEEDS)[0], session(on_the_fly, **fused_off).run(None, FEEDS)[0],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_on_the_fly_block_table_of_any_width_decodes_its_gathered_rows(bits):
    """ON_THE_FLY, a table at bit_num whose row width is not a multiple of the block (70 = 2 x 32 + 6): the
    gathered rows reshaped to [rows, 3, 32] failed (the verification gate refused the output); the last block's
    codes are padded with its zero code and the decoded rows cut back to 70."""
    model = block_model(width=70)
    result = convert(model, default_config(bits, extra="dequant_strategy=ON_THE_FLY\n"))
    table = numpy_helper.to_array(model.graph.initializer[0])
    rows = run(with_outputs(result.model, ["e"]), BLOCK_FEEDS)[2]
    want = quantize_blocks(table, bits, 1, 32, scale_grid=float16_grid).dequantized()[BLOCK_FEEDS["ids"]]
    np.testing.assert_array_equal(rows, want)


@pytest.mark.parametrize("bits", [5, 6, 7])
@pytest.mark.parametrize("width", [37, 64, 130])
def test_raised_table_rows_of_any_width_unpack_to_the_dequantized_rows(width, bits):
    """ON_THE_FLY, a table raised to gather_min_bit_num (5, 6, 7): blocks of 64, or one block of the whole row
    when it is shorter (37: not a multiple of a group's codes, so each row is padded to whole groups of bytes and
    the padding codes cut after unpacking; 130: a partial last block). The gathered rows equal the table's blocks
    dequantized, and the file stores `bits` bits a code (whole groups of bytes a row: 6 bits 4 codes in 3)."""
    table = _weights(300, width)
    graph = helper.make_graph([helper.make_node("Gather", ["embed", "ids"], ["e"], name="gather", axis=0)], "emb",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "embed")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert(model, config(extra=f"gather_min_bit_num={bits}\n"))
    record = {q.tensor: q for q in result.quantized}["embed"]
    block = min(width, 64)
    count, size = code_groups(bits)
    assert record.bits == bits
    assert record.storage == (f"DequantizeLinear int{bits} block {block} of the gathered rows "
                              f"({count} codes in {size} bytes)")
    stored = {t.name: t for t in result.model.graph.initializer}["embed_quantized"]
    padded = -(-width // block) * block
    assert (stored.data_type, tuple(stored.dims)) == (TensorProto.UINT8, (300, -(-padded // count) * size))
    ids = RNG.integers(0, 300, (3, 4)).astype(np.int64)
    want = quantize_blocks(table, bits, 1, block, scale_grid=float16_grid).dequantized()[ids]
    np.testing.assert_array_equal(run(result.model, {"ids": ids})[0], want)
    np.testing.assert_array_equal(ReferenceEvaluator(result.model).run(None, {"ids": ids})[0], want)


def test_float16_grid_is_numpys_float16_rounding():
    """The bit-level rounding of float16_grid gives numpy's float16 conversion, ties and carries included, and the
    subnormal range (numpy's own conversion there) too."""
    rng = np.random.default_rng(3)
    normal = np.float32(2.0 ** -14)
    values = [rng.random(100_000).astype(np.float32) * 0.05 + normal, (rng.random(1000) * 65504).astype(np.float32)]
    # float32 values exactly halfway between two float16 values (ties to even), and just either side of them
    halves = (np.arange(1, 4096, dtype=np.uint32) << np.uint32(13)) + np.uint32(0x1000) + np.uint32(0x38800000)
    values += [halves.view(np.float32), (halves + 1).view(np.float32), (halves - 1).view(np.float32),
               np.array([normal, 65504.0, 65519.0, 70000.0, 2.0 ** -20, 1e-9], np.float32)]
    for v in values:
        expected = np.clip(v, 2.0 ** -24, 65504.0).astype(np.float16).astype(np.float32)
        assert np.array_equal(float16_grid(v).view(np.uint32), expected.view(np.uint32))

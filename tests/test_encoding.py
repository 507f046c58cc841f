"""Encoded weight storage: every form decodes in onnxruntime to exactly the numpy reconstruction, and the
decoder is folded away when the session loads."""

import numpy as np
import onnx
import pytest
from helpers import run, session
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from ptqlite import encoding
from ptqlite.encoding import (
    MIN_OPSET,
    SPLIT_OPSET,
    Builder,
    SharedConstants,
    SplitPlan,
    build_decoder,
    packed_bytes,
    plan_split,
    split_codes,
    split_entries,
    split_type,
)
from ptqlite.model import GraphIndex
from ptqlite.passes.mixed_bit import zigzag


def _model_with_decoder(codes, bits, scale, offset, zero, opset=MIN_OPSET, **kwargs):
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(np.shape(codes)))])
    index = GraphIndex(graph)
    shared = SharedConstants(index, opset)
    decoder = build_decoder(index, shared, "w", codes, bits, scale, offset, zero, **kwargs)
    graph.node.extend(shared.nodes_used_by(decoder.nodes) + decoder.nodes)
    graph.initializer.extend(shared.used_by(decoder.nodes) + decoder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model, decoder


def _expected(codes, scale, offset):
    # float32 all the way, in the decoder's order (Mul, then Add)
    return codes.astype(np.float32) * scale.astype(np.float32) + offset.astype(np.float32)


@pytest.mark.parametrize("shape", [(6, 5, 3), (3, 5, 7)])  # an even axis, none
@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("form", ["packed", "indexed", "sparse"])
def test_each_form_decodes_exactly(bits, form, shape):
    rng = np.random.default_rng(bits)
    zero = rng.integers(0, 1 << bits, size=(shape[0], 1, 1))
    codes = rng.integers(0, 1 << bits, size=shape)
    if form == "indexed":  # few distinct values, so an index is narrower than the codes
        table = rng.integers(0, 1 << bits, size=max(1, (1 << bits) // 4))
        codes = table[rng.integers(0, table.size, size=shape)]
        if bits < 3:
            pytest.skip("an index cannot be narrower than 1 or 2 bit codes")
    if form == "sparse":  # most codes on the channel zero point
        codes = np.where(rng.random(shape) < 0.8, zero, codes)
    scale = rng.uniform(0.01, 0.1, size=(shape[0], 1, 1))
    offset = rng.uniform(-1, 1, size=(shape[0], 1, 1))
    model, decoder = _model_with_decoder(codes, bits, scale, offset, zero, forms=(form,))
    assert decoder.encoding == form
    np.testing.assert_array_equal(run(model, {})[0], _expected(codes, scale, offset))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 9, 12, 16])
@pytest.mark.parametrize("form", ["packed", "indexed", "sparse", "plain"])
def test_narrow_code_types_store_the_same_decoder_as_int64(bits, form):
    """Codes arrive uint16 (WEIGHT_QUANT), int16 (mixed bit) or uint8: every form stores the bytes, nodes and
    values it stores for the same codes in int64 (COUNT_CHUNK made small, so the chunked counts and lookups
    join several chunks)."""
    if form == "plain" and bits not in (8, 16):
        pytest.skip("enable_encode=false stores only 8 and 16 bits")
    rng = np.random.default_rng(bits)
    shape = (9, 7, 5)
    zero = rng.integers(0, 1 << bits, size=(shape[0], 1, 1))
    codes = rng.integers(0, 1 << bits, size=shape)
    if form == "indexed":
        codes = rng.choice(rng.integers(0, 1 << bits, size=3), size=shape)
    if form == "sparse":
        codes = np.where(rng.random(shape) < 0.8, zero, codes)
    codes[0, 0, 0] = (1 << bits) - 1  # the top code: nothing may wrap in a narrow type
    scale, offset = rng.uniform(0.01, 0.1, size=(shape[0], 1, 1)), rng.uniform(-1, 1, size=(shape[0], 1, 1))
    kwargs = {"encode": False} if form == "plain" else {"forms": (form,)}
    wide, _ = _model_with_decoder(codes, bits, scale, offset, zero, **kwargs)
    types = [np.uint16, np.int32] + ([np.int16] if bits < 16 else []) + ([np.uint8] if bits <= 8 else [])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoding, "COUNT_CHUNK", 64)
        for dtype in types:
            narrow, _ = _model_with_decoder(codes.astype(dtype), bits, scale, offset, zero, **kwargs)
            assert narrow.SerializeToString() == wide.SerializeToString(), dtype
    if form != "plain":
        np.testing.assert_array_equal(run(wide, {})[0], _expected(codes, scale, offset))


@pytest.mark.parametrize("form", ["packed", "indexed"])
def test_uint16_codes_are_encoded_without_a_wide_copy(form):
    """A weight's 2^23 uint16 codes (16 MB): encoding them allocates well under the 64 MB one int64 copy takes
    (what remains is per chunk: pack_bits' unpacked bits of PACK_CHUNK codes)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    table = np.arange(256) if form == "packed" else np.array([3, 90, 200])
    codes = rng.choice(table, size=(1 << 13, 1 << 10)).astype(np.uint16)
    ones = np.ones((codes.shape[0], 1))
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(codes.shape))])
    index = GraphIndex(graph)
    tracemalloc.start()
    try:
        decoder = build_decoder(index, SharedConstants(index, MIN_OPSET), "w", codes, 8, ones, ones, ones,
                                forms=(form,))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoder.encoding == form
    assert peak < 32 << 20, peak


@pytest.mark.parametrize("bits", [8, 16])
def test_unencoded_storage_is_signed_integers(bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << bits, size=(4, 7))
    scale, offset = np.full((4, 1), 0.5), np.full((4, 1), -3.0)
    model, decoder = _model_with_decoder(codes, bits, scale, offset, np.zeros((4, 1), np.int64), encode=False)
    assert decoder.encoding == f"int{bits}"
    stored = [t for t in decoder.initializers if t.data_type in (TensorProto.INT8, TensorProto.INT16)]
    assert len(stored) == 1 and list(stored[0].dims) == [4, 7]
    np.testing.assert_allclose(run(model, {})[0], _expected(codes, scale, offset), rtol=1e-6, atol=1e-5)


def test_smallest_form_wins_and_sizes_follow_bits():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 8, size=(64, 64))
    one = np.ones((64, 1))
    _, dense = _model_with_decoder(codes, 3, one, one * 0, one * 0)
    assert dense.encoding == "packed"
    assert dense.stored_bytes < 64 * 64 * 3 / 8 + 64 * 8 + 64
    sparse_codes = np.where(rng.random((64, 64)) < 0.95, 4, codes)
    _, sparse = _model_with_decoder(sparse_codes, 3, one, one * 0, one * 4)
    assert sparse.encoding == "sparse" and sparse.stored_bytes < dense.stored_bytes


def test_decoder_is_folded_at_load(tmp_path):
    """After the session loads, the graph is the plain float graph: no decode op runs per inference."""
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 8, size=(16, 32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])])
    index = GraphIndex(graph)
    shared = SharedConstants(index)
    decoder = build_decoder(index, shared, "w", codes, 3, np.full((1, 32), 0.1), np.full((1, 32), -0.4), 0)
    nodes = shared.nodes_used_by(decoder.nodes) + list(decoder.nodes) + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(shared.used_by(decoder.nodes) + decoder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    optimized = tmp_path / "optimized.onnx"
    sess = session(model, optimized_path=optimized)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ (codes * 0.1 - 0.4).astype(np.float32), rtol=1e-5,
                               atol=1e-5)
    assert [n.op_type for n in onnx.load(optimized).graph.node] == ["MatMul"]


@pytest.mark.parametrize("bits", [3, 5, 6, 7, 9, 11, 15])
def test_odd_widths_stay_integer_until_the_final_cast(bits):
    """ONNX Runtime keeps every folded tensor until folding ends: odd widths must not weigh bits in float."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(13, 11))  # 143 codes: not a multiple of 8, the padding is cut
    scale, offset = rng.uniform(0.01, 0.1, size=(13, 1)), rng.uniform(-1, 1, size=(13, 1))
    model, decoder = _model_with_decoder(codes, bits, scale, offset, np.zeros((13, 1), np.int64),
                                         forms=("packed",))
    ops = [n.op_type for n in decoder.nodes]
    float_casts = [n for n in decoder.nodes if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT]
    assert "MatMul" not in ops and len(float_casts) == 1 and ops[-3:] == ["Cast", "Mul", "Add"]
    np.testing.assert_array_equal(run(model, {})[0], _expected(codes, scale, offset))
    # Same bytes as the bit-packed stream, up to the padding of the last row of 8 codes.
    assert decoder.stored_bytes <= -(-codes.size * bits // 8) + bits + 2 * 13 * 4 + 8


# ---------------------------------------------------------------- split codes

def split_join(low: np.ndarray, gaps: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Reference decoder (numpy) of the split form: what the graph of split_codes computes."""
    z = np.asarray(low, dtype=np.int64).copy()
    np.add.at(z, np.cumsum(gaps), np.asarray(values, dtype=np.int64) << k)
    return z


_split_values = st.lists(st.integers(0, 40), min_size=1, max_size=300).flatmap(
    lambda base: st.lists(st.sampled_from([0, 0, 0, 300, 70000]), min_size=len(base), max_size=len(base)).map(
        lambda bump: np.array(base, np.int64) + np.array(bump, np.int64)))


@settings(max_examples=150, deadline=None)
@given(z=_split_values, k=st.integers(0, 17), gap_bits=st.integers(1, 9), value_bits=st.integers(1, 9))
def test_split_entries_round_trip_at_any_widths(z, k, gap_bits, value_bits):
    """Fillers and extra entries make every gap and value fit its width, and the entries add back to z."""
    gaps, values = split_entries(z >> k, gap_bits, value_bits)
    assert gaps.min(initial=0) >= 0 and gaps.max(initial=0) < 1 << gap_bits
    assert values.min(initial=0) >= 0 and values.max(initial=0) < 1 << value_bits
    np.testing.assert_array_equal(split_join(z & ((1 << k) - 1), gaps, values, k), z)


@settings(max_examples=60, deadline=None)
@given(z=_split_values)
def test_split_plan_is_the_smallest_and_its_size_is_exact(z):
    plan = plan_split(z)
    gaps, values = split_entries(z >> plan.k, plan.gap_bits, plan.value_bits)
    low = packed_bytes(z.size, plan.k) if plan.k else 0
    entries = packed_bytes(gaps.size, plan.gap_bits) + packed_bytes(values.size, plan.value_bits) if gaps.size else 0
    assert plan.stored_bytes == low + entries
    # never larger than the plain packed zigzag values (k = their width, no entries)
    assert plan.stored_bytes <= packed_bytes(z.size, int(z.max()).bit_length() or 1)


def _split_model(z, plan):
    graph = helper.make_graph([], "g", [], [])
    index = GraphIndex(graph)
    shared = SharedConstants(index, SPLIT_OPSET + 1)
    b = Builder(index, shared, "split")
    out = split_codes(b, z, plan)
    stored = sum(len(t.raw_data) for t in b.decoder.initializers)
    graph.node.extend(shared.nodes_used_by(b.decoder.nodes) + b.decoder.nodes)
    graph.initializer.extend(shared.used_by(b.decoder.nodes) + b.decoder.initializers)
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(split_type(int(z.max()))[0]))
    graph.output.append(helper.make_tensor_value_info(out, dtype, [z.size]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", SPLIT_OPSET + 1)])
    onnx.checker.check_model(model)
    return model, stored


@pytest.mark.parametrize("k, gap_bits, value_bits", [(0, 3, 2), (3, 2, 1), (5, 4, 3), (8, 8, 8), (9, 1, 5),
                                                     (None, 0, 0)])
@pytest.mark.parametrize("top", [200, 3000, 100000])
def test_split_codes_decode_exactly_in_onnxruntime(tmp_path, k, gap_bits, value_bits, top):
    """Every k (odd, 8, above 8), narrow widths that need fillers and extra entries, uint8/uint16/int32 values;
    the stored bytes are the plan's, and the decoder folds to a constant."""
    rng = np.random.default_rng(top)
    z = zigzag(np.round(rng.laplace(0, 6, size=1003)).astype(np.int64))
    z[rng.integers(0, z.size, 5)] = rng.integers(0, top, 5)
    plan = plan_split(z) if k is None else SplitPlan(k, gap_bits, value_bits, 0)
    model, stored = _split_model(z, plan)
    out = session(model, tmp_path / "o.onnx").run(None, {})[0]
    assert out.dtype == split_type(int(z.max()))[0]
    np.testing.assert_array_equal(out.astype(np.int64), z)
    if k is None:
        assert stored == plan.stored_bytes
        assert stored < 0.8 * packed_bytes(z.size, int(z.max()).bit_length())
    assert not onnx.load(str(tmp_path / "o.onnx")).graph.node  # folded: only the constant output is left


def test_shared_values_are_built_once_and_names_compacted_around_the_models_own():
    """A shared value's nodes exist once and come with the shared nodes they read; compact() renames only
    the generated names, shortest first, skipping names the model already uses."""
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3])])
    index = GraphIndex(graph)
    shared = SharedConstants(index, SPLIT_OPSET)
    for _ in range(50):  # names spent by candidates that are never emitted
        shared.name()

    def ramp(b: Builder) -> str:
        return b.node("Range", [b.shared.get(np.array(0, np.float32)), b.shared.get(np.array(3, np.float32)),
                                b.shared.get(np.array(1, np.float32))])

    def doubled(b: Builder) -> str:
        return b.node("Add", [b.shared.value(("ramp",), ramp), b.shared.value(("ramp",), ramp)])

    assert shared.value(("doubled",), doubled) == shared.value(("doubled",), doubled)
    assert [n.op_type for n in shared.nodes] == ["Range", "Add"]
    nodes = [helper.make_node("Mul", [shared.value(("doubled",), doubled), shared.get(np.array(2, np.float32))],
                              ["a"])]
    nodes = shared.nodes_used_by(nodes) + nodes
    inits = shared.used_by(nodes)
    assert len(nodes) == 3 and len(inits) == 4
    shared.compact(nodes, inits)
    names = {n for node in nodes for n in [*node.input, *node.output]} | {t.name for t in inits}
    assert names == {"a", "b", "c", "d", "e", "f", "g"}  # "a" stays the model's output
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    out = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", SPLIT_OPSET)]), {})[0]
    np.testing.assert_array_equal(out, [0, 4, 8])


def test_forms_that_cannot_pay_are_refused_before_their_large_arrays():
    """Reproduction: on a dense 8-bit weight (MiniLM's embedding table) the indexed form sorted an int64 copy and
    made its int64 inverse, and the sparse form an int64 copy of the zero codes and every position, before
    finding that neither could pay: the fixed-bit conversion's peak (806 MB on MiniLM). Both are refused first."""
    import tracemalloc

    codes = np.random.default_rng(0).integers(0, 256, (1024, 512)).astype(np.int64)  # every code used, dense
    zero = np.full((1024, 1), 128, np.int64)
    scale, offset = np.full((1024, 1), 0.01, np.float32), np.zeros((1024, 1), np.float32)
    tracemalloc.start()
    try:
        _, decoder = _model_with_decoder(codes, 8, scale, offset, zero)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.encoding == "packed"
    # the packed form's bytes and its TensorProto (about 2 bytes a code), not an int64 copy (8 bytes a code)
    assert peak < 4 * codes.size, peak

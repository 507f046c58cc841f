"""Conversion memory: the mixed-bit search works on a large weight a block of rows at a time (bit-identical to the
whole weight at once), the pass holds no float64 copy of a large weight, and the gate never holds the float and
the quantized ONNX Runtime sessions together."""

from __future__ import annotations

import sys
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import record_gate_sessions, run_cli
from onnx import TensorProto, helper, numpy_helper

import ptqlite.verify as verify_module
from ptqlite import qmath
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.encoding import SharedConstants, plan_split
from ptqlite.model import GraphIndex
from ptqlite.passes import mixed_bit
from ptqlite.passes.mixed_bit import (
    channel_errors,
    codes_for,
    quantize_layer,
    rice_parameter,
    search_step,
    zigzag,
    zigzag32,
)
from ptqlite.plan import WeightSpec

MIXED = ("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=0\nmin_quant_weight_size=0\n"
         "min_quant_weight_channel=0\n[mixed_bit_weight_quant_param]\ninit_scale=0.02\n")


def _table(rows: int, width: int, seed: int = 3) -> np.ndarray:
    """An embedding-like table: rows of different scales, some all zero."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, width)) * np.exp(rng.uniform(-2, 2, (rows, 1))) * 0.05
    w[::37] = 0.0
    return w.astype(np.float32)


def _embedding_model(rows: int, width: int) -> onnx.ModelProto:
    table = numpy_helper.from_array(_table(rows, width), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, width])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _old_channel_errors(w, step, axis):
    """The search's error as it was computed before the blocks: on the whole weight in float64."""
    axes = qmath.reduce_axes(w.ndim, axis)
    w64 = w.astype(np.float64)
    energy = np.sum(w64 * w64, axis=axes, keepdims=True)
    q = qmath.round_half_away(w64 / step)
    err = np.sum((w64 - q.astype(np.float32) * step.astype(np.float32)) ** 2, axis=axes, keepdims=True)
    ratio = np.sqrt(err / np.where(energy > 0, energy, 1.0))
    return np.where(energy > 0, ratio, (err > 0).astype(np.float64))


@pytest.mark.parametrize("chunk", [64, 1000, 1 << 30])
def test_search_by_blocks_of_rows_equals_the_whole_weight(monkeypatch, chunk):
    w = _table(300, 16)
    whole = {}
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", 1 << 30)
    for axis, error_axis in ((0, None), (None, 0), (None, None)):
        whole[axis, error_axis] = search_step(w, 0.02, axis, error_axis)
    step0 = whole[0, None][0]
    reference = _old_channel_errors(w, step0, 0)
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", chunk)
    assert len(mixed_bit.row_blocks(w, 0)) == (1 if chunk > w.size else -(-300 // max(1, chunk // 16)))
    for (axis, error_axis), (step, met) in whole.items():
        blocked, blocked_met = search_step(w, 0.02, axis, error_axis)
        assert np.array_equal(blocked, step) and np.array_equal(blocked_met, met)
    # the error per row is bit-identical to the float64 computation over the whole weight
    assert np.array_equal(channel_errors(w, step0, 0), reference)
    # the codes too, whether the step is per row or one for the tensor
    for step in (step0, whole[None, 0][0]):
        assert np.array_equal(codes_for(w, step), qmath.round_half_away(w.astype(np.float64) / step))


def test_a_layer_quantized_by_blocks_is_stored_the_same(monkeypatch):
    w = _table(400, 24)
    spec = WeightSpec("table", "Gather", ("embed",), w.shape, axis=0)

    def layer():
        index = GraphIndex(helper.make_graph([], "g", [], []))
        return quantize_layer(index, SharedConstants(index, 17), spec, w, 0.02)

    monkeypatch.setattr(mixed_bit, "RICE_MARGIN", 0.999)  # the split form (the one with a decoder to compare)
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", 1 << 30)
    monkeypatch.setattr(qmath, "PACK_CHUNK", 1 << 30)
    whole = layer()
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", 200)
    monkeypatch.setattr(qmath, "PACK_CHUNK", 64)
    blocked = layer()
    assert (blocked.measure, blocked.encoding, blocked.stored_bytes) == (whole.measure, whole.encoding,
                                                                        whole.stored_bytes)
    assert np.array_equal(blocked.step, whole.step) and np.array_equal(blocked.q, whole.q)
    # the error adds the blocks' sums in another order than one sum over the weight: equal to rounding
    assert blocked.relative_error == pytest.approx(whole.relative_error, rel=1e-12)
    assert [t.SerializeToString() for t in blocked.decoder.initializers] == \
           [t.SerializeToString() for t in whole.decoder.initializers]


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 11, 16])
def test_packing_by_chunks_gives_the_same_bytes(monkeypatch, bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, 1003)
    monkeypatch.setattr(qmath, "PACK_CHUNK", 1 << 30)
    whole = qmath.pack_bits(codes, bits)
    monkeypatch.setattr(qmath, "PACK_CHUNK", 16)
    assert np.array_equal(qmath.pack_bits(codes, bits), whole)
    assert np.array_equal(qmath.unpack_bits(whole, bits, codes.size), codes)


def test_int32_codes_give_the_same_sizes_and_plans():
    q = np.round(np.random.default_rng(5).laplace(0, 9, 5000)).astype(np.int64)
    assert np.array_equal(zigzag32(q), zigzag(q))
    assert rice_parameter(zigzag32(q)) == rice_parameter(zigzag(q))
    assert plan_split(zigzag32(q)) == plan_split(zigzag(q))


def test_relative_error_in_place_equals_the_formula():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((50, 7)).astype(np.float32)
    w_hat = (w + rng.standard_normal(w.shape) * 0.01).astype(np.float32)
    w64 = w.astype(np.float64)
    expected = float(np.sqrt(np.sum((w64 - w_hat) ** 2) / np.sum(w64 ** 2)))
    assert qmath.relative_error(w, w_hat) == expected
    assert qmath.relative_error(np.zeros(3, np.float32), np.zeros(3, np.float32)) == 0.0


@pytest.mark.parametrize("axis, error_axis", [(0, None), (None, 0)])
def test_the_step_search_holds_no_float64_copy_of_a_large_weight(monkeypatch, axis, error_axis):
    # Before the blocks, the search held the table in float64 twice (the weight and its rounded copy) beside
    # its float32 decode: 6.3x the table's float32 bytes in numpy arrays at once (measured on this table).
    w = _table(4096, 256)  # 1M values, 4 MB; the search works on a quarter of it at a time
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", w.size // 4)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        search_step(w, 0.02, axis, error_axis)
        codes_for(w, np.full((1, 1), 1e-3))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # a block's float64 copy, its rounded codes and decode (0.25 x (2 + 2 + 1)), the int32 codes (1x)
    assert peak < 2.5 * w.nbytes, f"peak {peak / w.nbytes:.2f}x the weight"


def test_the_pass_quantizes_a_large_table_as_before(monkeypatch):
    model = _embedding_model(4096, 256)
    config = parse_config(MIXED)
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", 1 << 30)
    monkeypatch.setattr(qmath, "PACK_CHUNK", 1 << 30)
    whole = convert(model, config, validate=False, verify=False, progress=False).model
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", 1 << 16)
    monkeypatch.setattr(qmath, "PACK_CHUNK", 1 << 12)
    blocked = convert(model, config, validate=False, verify=False, progress=False).model
    assert blocked.SerializeToString(deterministic=True) == whole.SerializeToString(deterministic=True)


def test_the_gate_never_holds_both_sessions(monkeypatch):
    model = _embedding_model(64, 16)
    live: list[weakref.ref] = []
    most = [0]
    real = verify_module.cpu_session

    def counting(*args, **kwargs):
        import gc

        gc.collect()
        alive = [r for r in live if r() is not None]
        session = real(*args, **kwargs)
        live[:] = alive + [weakref.ref(session)]
        most[0] = max(most[0], len(live))
        return session

    monkeypatch.setattr(verify_module, "cpu_session", counting)
    result = convert(model, parse_config(MIXED), progress=False)
    assert result.verification is not None and result.verification.outputs
    assert result.verification.outputs[0].min > 0.99
    assert most[0] == 1


def test_the_cli_gate_loads_the_float_model_from_the_checks_copy_and_scores_the_same(tmp_path, capsys, monkeypatch):
    """The gate's float side is the input checks' copy (validate.validate_with_copy: the weights in a data file the
    session maps), removed afterwards; the scores are those of a conversion in memory (Python API)."""

    model = tmp_path / "embed.onnx"
    onnx.save(_embedding_model(64, 16), model)
    config = tmp_path / "mixed.cfg"
    config.write_text(MIXED)
    loaded = record_gate_sessions(monkeypatch)
    code, out, _ = run_cli(["convert", "--fmk=ONNX", f"--modelFile={model}", f"--outputFile={tmp_path / 'q'}",
                            f"--configFile={config}"], capsys)
    assert code == 0
    assert Path(loaded[0]).name == "model.onnx" and loaded[1:] == ["in memory"]  # the float side first
    assert not Path(loaded[0]).parent.exists()
    in_memory = convert(onnx.load(model), parse_config(MIXED), progress=False).verification.outputs[0]
    assert f"cosine mean {in_memory.mean:.6f}, min {in_memory.min:.6f}" in out


def test_the_cli_without_the_gate_converts_the_loaded_model_itself(tmp_path, capsys, monkeypatch):
    """--verify=off: nothing reads the loaded float model after the pass, so the pass works on it instead of a
    copy (one copy of the weights less at the conversion's peak), and the output is the same."""
    convert_module = sys.modules["ptqlite.convert"]  # the package's `convert` is the function

    model = tmp_path / "embed.onnx"
    onnx.save(_embedding_model(64, 16), model)
    config = tmp_path / "mixed.cfg"
    config.write_text(MIXED)
    copies = []
    real_copy = convert_module._copy
    monkeypatch.setattr(convert_module, "_copy", lambda m: copies.append(len(m.graph.initializer)) or real_copy(m))
    code, _, _ = run_cli(["convert", "--fmk=ONNX", f"--modelFile={model}", f"--outputFile={tmp_path / 'q'}",
                          f"--configFile={config}", "--verify=off"], capsys)
    assert code == 0
    # only the output's own copy at the end (a decoder graph: more initializers than the model's one table)
    assert len(copies) == 1 and copies[0] > 1
    expected = convert(onnx.load(model), parse_config(MIXED), progress=False, verify=False).model
    assert onnx.load(tmp_path / "q.onnx").SerializeToString(deterministic=True) == \
        expected.SerializeToString(deterministic=True)


def test_in_place_conversion_gives_the_same_output_and_only_where_asked():
    config = parse_config(MIXED)
    given = _embedding_model(128, 16)
    copied = convert(given, config, progress=False, verify=False).model
    assert given.graph.initializer[0].name == "table"  # untouched without in_place
    in_place = convert(given, config, progress=False, verify=False, in_place=True).model
    assert in_place.SerializeToString(deterministic=True) == copied.SerializeToString(deterministic=True)
    assert "table" not in {t.name for t in given.graph.initializer}  # the pass worked on it
    # with the gate in convert() the float model is still needed, so in_place is ignored
    kept = _embedding_model(128, 16)
    convert(kept, config, progress=False, in_place=True)
    assert kept.graph.initializer[0].name == "table"


def _gather_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    graph = helper.make_graph(
        nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])],
        [numpy_helper.from_array(rng.normal(0, 1, (50, 16)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_MODES = {
    "full": "",  # helpers.full_config(bias_correction=True): its calibrate_path names no file (samples are given)
    "dynamic": "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n",
    "weight": "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
              "min_quant_weight_channel=0\n",
    "mixed": MIXED,
}


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_a_conversion_leaves_no_reference_cycle_holding_the_model(mode):
    # A closure that calls itself (a recursive graph walk) is a reference cycle; through what it captured it kept
    # a whole rewritten model alive until Python's cycle collector happened to run (on MiniLM's FULL_QUANT: 330 MB
    # held through the verification gate, docs/results.md "Conversion peak memory").
    import gc

    from helpers import full_config

    model = _gather_matmul_model()
    calib = [{"ids": np.random.default_rng(i).integers(0, 50, (1, 6))} for i in range(4)]
    gc.collect()
    gc.disable()
    try:
        config = full_config(bias_correction=True) if mode == "full" else parse_config(_MODES[mode])
        result = convert(model, config, samples=calib, progress=False)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        held = sorted({type(o).__name__ for o in gc.garbage
                       if isinstance(o, onnx.ModelProto | onnx.GraphProto | onnx.NodeProto | onnx.TensorProto)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert result.verification is not None and result.verification.outputs
    assert held == [], f"{mode}: reference cycles held {held}"


@pytest.mark.parametrize("chunk", [7, 160, 1 << 30])
def test_table_codes_by_rows_equal_the_whole_table(monkeypatch, chunk):
    table = _table(300, 16)
    params = qmath.symmetric_params(table, 8, 0, narrow=True)
    whole = qmath.quantize(table, params)
    monkeypatch.setattr(qmath, "ROW_CHUNK", chunk)
    codes, error = qmath.quantize_rows(table, params, np.int8)
    assert codes.dtype == np.int8 and np.array_equal(codes, whole)
    expected = qmath.relative_error(table, qmath.dequantize(whole, params))
    assert error == pytest.approx(expected, rel=1e-12)
    per_tensor = qmath.symmetric_params(table, 8, None, narrow=True)
    codes, _ = qmath.quantize_rows(table, per_tensor, np.int8)
    assert np.array_equal(codes, qmath.quantize(table, per_tensor))


def test_initializers_are_removed_in_place_and_the_others_keep_their_order():
    from ptqlite.model import remove_initializers

    graph = helper.make_graph([], "g", [], [], [numpy_helper.from_array(np.full(3, i, np.float32), f"t{i}")
                                                for i in range(6)])
    kept = graph.initializer[4]
    remove_initializers(graph, {"t1", "t3", "t5"})
    assert [t.name for t in graph.initializer] == ["t0", "t2", "t4"]
    # the kept tensors are the graph's own messages still, not copies (a copy of every weight was the waste)
    kept.name = "renamed"
    assert graph.initializer[2].name == "renamed"


@pytest.mark.parametrize("chunk", [7, 1000])
def test_the_split_plan_by_chunks_equals_the_whole_weight(monkeypatch, chunk):
    from ptqlite import encoding

    rng = np.random.default_rng(4)
    for density in (0.9, 0.01):
        q = np.round(rng.laplace(0, 9, 20011)) * (rng.random(20011) < density)
        for z in (zigzag32(q.astype(np.int64)), zigzag(q.astype(np.int64))):
            monkeypatch.setattr(encoding, "SPLIT_CHUNK", 1 << 30)
            whole = plan_split(z)
            monkeypatch.setattr(encoding, "SPLIT_CHUNK", chunk)
            assert plan_split(z) == whole


def test_with_input_shapes_a_given_up_model_gives_the_same_output_and_gate_from_files(tmp_path, monkeypatch):
    # With --inputShape the CLI lets the pass work on its loaded model and the gate read the float model from
    # files (the fixed-shape one staged before the pass, the model's own at the other shapes): the same output
    # bytes and the same scores as a conversion on a copy with the float model held in memory.
    model = _gather_matmul_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "embed.onnx"
    onnx.save(model, path)
    config = parse_config(_MODES["weight"])
    shapes = {"ids": [1, 6]}
    loaded = record_gate_sessions(monkeypatch)
    copied = convert(onnx.load(path), config, model_path=path, input_shapes=shapes, progress=False)
    assert loaded == ["in memory"] * 3
    loaded.clear()
    given = onnx.load(path)
    result = convert(given, config, model_path=path, input_shapes=shapes, progress=False, in_place=True)
    assert result.model.SerializeToString(deterministic=True) == copied.model.SerializeToString(deterministic=True)
    staged, output, original = loaded
    assert staged != str(path) and staged.endswith(".onnx") and output == "in memory" and original == str(path)
    assert not (tmp_path / staged).exists()  # the staged float model is removed afterwards
    assert given.SerializeToString() != path.read_bytes()  # the pass worked on it, not on a copy
    for check, expected in zip(result.verification.outputs, copied.verification.outputs, strict=True):
        assert (check.name, check.mean, check.min) == (expected.name, expected.mean, expected.min)
    assert result.verification.other_shapes == copied.verification.other_shapes == "ids:2,6"
    assert result.verification.shape_problem == copied.verification.shape_problem == ""


@pytest.mark.parametrize("shape", [(300, 40), (1001, 7), (64, 513)])
def test_column_sums_by_blocks_of_rows_equal_the_whole_weight(monkeypatch, shape):
    """A MatMul weight's channels are its columns: the search sums them over blocks of rows with the running
    sums carried, and must find the same errors, steps and codes, bit for bit, as over the whole weight."""
    rng = np.random.default_rng(shape[0])
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", 1 << 30)
    whole = {key: search_step(w, 0.02, *key) for key in ((1, None), (None, 1))}
    step = whole[1, None][0]
    errors = channel_errors(w, step, 1)
    assert np.array_equal(errors, _old_channel_errors(w, step, 1))
    monkeypatch.setattr(mixed_bit, "SEARCH_CHUNK", 97)  # blocks of a few rows, a partial one last
    assert len(mixed_bit.row_blocks(w, 0)) > 3
    assert np.array_equal(channel_errors(w, step, 1), errors)
    for key, (whole_step, whole_met) in whole.items():
        blocked, met = search_step(w, 0.02, *key)
        assert np.array_equal(blocked, whole_step) and np.array_equal(met, whole_met)


_UNTIMED = {  # _MODES with latency-aware planning off: its timing decides by noise on a model this small
    "full": "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n[data_preprocess_param]\n"
            "calibrate_path=x:/nonexistent\ncalibrate_size=1\ninput_type=BIN\n[full_quant_param]\n"
            "bias_correction=true\nlatency_aware=false\n",
    "dynamic": _MODES["dynamic"] + "[dynamic_quant_param]\nlatency_aware=false\n",
    "weight": _MODES["weight"],
    "mixed": _MODES["mixed"],
}


@pytest.mark.parametrize("mode", sorted(_UNTIMED))
def test_in_place_works_on_the_given_model_in_every_mode_with_the_same_output(mode):
    """The CLI gives up its loaded model in every mode (its gate runs from the input checks' copy): the pass works
    on the model itself and writes the bytes that a conversion on a copy writes."""
    config = parse_config(_UNTIMED[mode])
    calib = [{"ids": np.random.default_rng(i).integers(0, 50, (1, 6))} for i in range(4)]
    original = _gather_matmul_model().SerializeToString()
    kept = _gather_matmul_model()
    copied = convert(kept, config, samples=calib, progress=False, verify=False).model
    assert kept.SerializeToString() == original
    given = _gather_matmul_model()
    result = convert(given, config, samples=calib, progress=False, verify=False, in_place=True)
    assert result.quantized and given.SerializeToString() != original  # the pass worked on it
    assert result.model.SerializeToString(deterministic=True) == copied.SerializeToString(deterministic=True)

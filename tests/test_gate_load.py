"""The gate's rule for the output's session: loadmem.predict_load's bytes (the output's tensors plus every value
ONNX Runtime's constant folding materialises at load) and verify.LOAD_RESERVE must fit in the memory available,
else the output is not loaded, written unverified, and the summary and a warning say so (docs/spec.md,
"Verification"; docs/results.md, "The gate's load rule for the output")."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from helpers import record_gate_sessions
from onnx import TensorProto, helper, numpy_helper
from test_stream import CONFIGS, _ids, convert_cli, decoder, save_external, work  # noqa: F401  (work: a fixture)

from ptqlite import loadmem
from ptqlite import verify as verify_module
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.runtime import cpu_session

ROWS, COLS = 64, 32


def folding_model() -> onnx.ModelProto:
    """x @ (Cast(u8 codes) * scale + offset) with its weight reshaped from a flat table by a shape that a Concat
    of constants computes; a DequantizeLinear weight (kept by onnxruntime for its fusions), a node fed by the
    graph input and an If (not folded), and Shape of a static input (folded, counted as nothing)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(0, 255, ROWS * COLS, dtype=np.uint8), "codes"),
        numpy_helper.from_array(np.array([ROWS], np.int64), "rows"),
        numpy_helper.from_array(np.array([COLS], np.int64), "cols"),
        numpy_helper.from_array(rng.random(COLS, dtype=np.float32), "scale"),
        numpy_helper.from_array(rng.random(COLS, dtype=np.float32), "offset"),
        numpy_helper.from_array(rng.integers(-127, 127, (COLS, COLS), dtype=np.int8), "q"),
        numpy_helper.from_array(np.float32(0.01), "q_scale"),
        numpy_helper.from_array(np.array(True), "flag"),
    ]
    then = helper.make_graph([helper.make_node("Identity", ["scale"], ["branch"])], "then", [],
                             [helper.make_tensor_value_info("branch", TensorProto.FLOAT, [COLS])])
    nodes = [
        helper.make_node("Concat", ["rows", "cols"], ["shape"], axis=0),       # 16 bytes
        helper.make_node("Reshape", ["codes", "shape"], ["codes2d"]),           # 2048 bytes
        helper.make_node("Cast", ["codes2d"], ["float_codes"], to=TensorProto.FLOAT),  # 8192
        helper.make_node("Mul", ["float_codes", "scale"], ["scaled"]),          # 8192
        helper.make_node("Add", ["scaled", "offset"], ["weight"]),              # 8192
        helper.make_node("MatMul", ["x", "weight"], ["h"]),                     # reads the input: not folded
        helper.make_node("DequantizeLinear", ["q", "q_scale"], ["dq"]),         # kept for fusion
        helper.make_node("MatMul", ["h", "dq"], ["h2"]),
        helper.make_node("If", ["flag"], ["picked"], then_branch=then, else_branch=then),  # has subgraphs
        helper.make_node("Mul", ["h2", "picked"], ["h3"]),
        helper.make_node("Shape", ["x"], ["x_shape"]),                          # static: folded
        helper.make_node("Reshape", ["h3", "x_shape"], ["y"], name="y"),
    ]
    graph = helper.make_graph(nodes, "folding", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, ROWS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, COLS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# The Concat (2 int64), the Reshape of the codes (uint8), the float Cast, Mul and Add chain, and in each branch of
# the If the Identity of the outer constant (onnxruntime folds body nodes on their own): no other node folds.
FOLDED = 2 * 8 + ROWS * COLS + 3 * ROWS * COLS * 4 + 2 * COLS * 4
TENSORS = ROWS * COLS + 2 * 8 + 2 * COLS * 4 + COLS * COLS + 4 + 1


def test_the_predictor_counts_the_foldable_chain_and_nothing_else():
    model = folding_model()
    onnx.checker.check_model(model, full_check=True)
    cpu_session(model, "for the test")  # the model loads as written
    estimate = loadmem.predict_load(model)
    assert estimate.initializers == estimate.inline == TENSORS
    assert estimate.folded == FOLDED
    # the Reshape to the computed shape, and so the Cast, Mul and Add after it, are not inferred: each is sized
    # as its largest input's values in its own type, the same bytes
    assert estimate.largest == ROWS * COLS * 4 and estimate.unsized == 4
    assert estimate.fused == 0  # a per-tensor DequantizeLinear: no MatMulNBits
    assert estimate.total == (int(TENSORS * loadmem.INLINE_FACTOR + FOLDED * loadmem.FOLD_FACTOR) + ROWS * COLS * 4
                              + loadmem.SESSION_OVERHEAD)


def test_the_predictor_reads_no_external_data(tmp_path):
    """External tensors count by dims and type: the data file is never opened (it is removed here)."""
    path = save_external(folding_model(), tmp_path / "m.onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert [t.name for t in external] == ["codes", "q"]
    (tmp_path / "m.onnx.data").unlink()
    estimate = loadmem.predict_load(str(path))
    assert estimate.initializers == TENSORS and estimate.inline == TENSORS - ROWS * COLS - COLS * COLS
    assert estimate.folded == FOLDED


def test_a_value_shape_inference_cannot_size_counts_as_its_largest_input():
    model = folding_model()
    # a Reshape of 32 values to a shape sliced from a large constant: not inferred, sized as the 32 values
    model.graph.initializer.append(numpy_helper.from_array(np.full(2000, 1, np.int64), "big"))
    model.graph.node.insert(0, helper.make_node("Slice", ["big", "zero", "two"], ["sliced"]))
    model.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero"),
                                    numpy_helper.from_array(np.array([2], np.int64), "two")])
    model.graph.node.insert(1, helper.make_node("Reshape", ["scale", "sliced"], ["odd"]))
    estimate = loadmem.predict_load(model)
    assert estimate.folded == FOLDED + 2 * 8 + COLS * 4 and estimate.unsized == 5


def _mapped_output(tmp_path):
    return save_external(decoder(), tmp_path / "float.onnx"), save_external(decoder(), tmp_path / "out.onnx")


def test_the_gate_does_not_load_an_output_predicted_not_to_fit_and_says_why(tmp_path, monkeypatch):
    """Reproduction: an output whose session needs more memory than is available was loaded anyway (the 3 GB
    decoder's mixed-bit output passed 15 GB in the gate); now no session is made for it, and the result says
    it was not verified, with the memory it needs and the memory available."""
    float_path, out_path = _mapped_output(tmp_path)
    need = loadmem.predict_load(str(out_path)).total + verify_module.LOAD_RESERVE
    monkeypatch.setattr(verify_module, "available_memory", lambda: need - 1)
    loaded = record_gate_sessions(monkeypatch)
    checked = verify_module.verify(str(float_path), str(out_path), _ids(), "2 given samples", 0.9)
    assert loaded == []  # the output was never loaded, nor the float model, which it would be compared with
    assert checked.outputs == [] and checked.ran_alone == 0
    tensors = loadmem.predict_load(str(out_path)).initializers
    assert checked.not_loaded == (f"loading it in ONNX Runtime would need about {need / 1e9:.1f} GB of memory "
                                  f"(its tensors {tensors / 1e9:.2f} GB) and {(need - 1) / 1e9:.1f} GB is available")


def test_the_gate_compares_when_the_prediction_fits(tmp_path, monkeypatch):
    float_path, out_path = _mapped_output(tmp_path)
    need = loadmem.predict_load(str(out_path)).total + verify_module.LOAD_RESERVE
    monkeypatch.setattr(verify_module, "available_memory", lambda: need)
    loaded = record_gate_sessions(monkeypatch)
    checked = verify_module.verify(str(float_path), str(out_path), _ids(), "2 given samples", 0.9)
    assert loaded == [str(float_path), str(out_path)]
    assert not checked.not_loaded and checked.outputs[0].min == pytest.approx(1.0)


def test_the_memory_is_asked_again_just_before_the_output_loads(tmp_path, monkeypatch):
    """Reproduction of the bug class at the last moment: the memory fits before the float model runs and not
    after it (the float session's pages, other processes); the output's session is still not made."""
    float_path, out_path = _mapped_output(tmp_path)
    need = loadmem.predict_load(str(out_path)).total + verify_module.LOAD_RESERVE
    answers = iter([need, need - 1])
    monkeypatch.setattr(verify_module, "available_memory", lambda: next(answers, need - 1))
    monkeypatch.setattr(verify_module, "too_large_to_compare", lambda plan: "")
    loaded = record_gate_sessions(monkeypatch)
    checked = verify_module.verify(str(float_path), str(out_path), _ids(), "2 given samples", 0.9)
    assert loaded == [str(float_path)] and checked.outputs == []
    assert checked.not_loaded.endswith(f"and {(need - 1) / 1e9:.1f} GB is available")


def test_an_output_that_ran_alone_is_not_loaded_either_when_it_does_not_fit(tmp_path, monkeypatch):
    """The float model too large to run (its own rule) and the output too large to load: neither session."""
    from ptqlite import stream

    float_path, out_path = _mapped_output(tmp_path)
    monkeypatch.setattr(stream, "WHOLE_LOAD_BYTES", 0)
    need = loadmem.predict_load(str(out_path)).total + verify_module.LOAD_RESERVE
    answers = iter([need])  # the first ask fits the output; then 100 MB, for the float model and the output
    monkeypatch.setattr(verify_module, "available_memory", lambda: next(answers, 100 << 20))
    loaded = record_gate_sessions(monkeypatch)
    checked = verify_module.verify(str(float_path), str(out_path), _ids(), "2 given samples", 0.9)
    assert loaded == [] and checked.ran_alone == 0
    assert checked.skipped.startswith("the float model takes ")
    assert checked.not_loaded.startswith("loading it in ONNX Runtime would need about ")


def test_a_folding_output_of_the_api_is_written_unverified_with_a_warning(monkeypatch, caplog):
    """An 8-bit default-strategy output decodes its weights by constant folding at load: with too little memory
    for that, convert() returns it with the warning instead of loading it."""
    config = parse_config(CONFIGS["default_8bit"].replace("bit_num=8", "bit_num=4"))
    quantized = convert(decoder(), config, verify=False).model
    estimate = loadmem.predict_load(quantized)
    assert estimate.folded > 0  # the decoders fold at load
    # too little even for a session without constant folding (which needs less: the next tests)
    unfolded = loadmem.predict_unfolded(quantized)
    assert unfolded < estimate.total
    monkeypatch.setattr(verify_module, "available_memory", lambda: unfolded + verify_module.LOAD_RESERVE - 1)
    loaded = record_gate_sessions(monkeypatch)
    result = convert(decoder(), config)
    assert loaded == []
    assert result.verification.not_loaded and result.verification.outputs == []
    assert result.warnings == [verify_module.not_loaded_message(result.verification)]
    assert "NOT verified" in result.warnings[0] and "would need about" in result.warnings[0]
    assert "NOT verified" in caplog.text


def test_the_cli_writes_the_output_says_not_verified_and_exits_0(work, capsys, monkeypatch, caplog):  # noqa: F811
    """The convention of outputs the gate cannot check (--verify=off, a float model not compared): the output is
    written and the exit code is 0; here the summary's line and a warning on stderr (also with --quiet) say it
    was NOT verified and why."""
    monkeypatch.setattr(verify_module, "available_memory", lambda: 1 << 20)
    monkeypatch.setattr(verify_module, "too_large_to_compare", lambda plan: "")  # the output's rule alone
    code, out, _ = convert_cli(work, "mixed_bit", capsys)
    assert code == 0
    assert (work / "out" / "mixed_bit.onnx").is_file()
    assert "NOT verified: the gate did not load the output, since loading it in ONNX Runtime would need about" in out
    assert "cosine" not in out
    assert "plus 0.00 GB of values that ONNX Runtime's constant folding computes from them at load" in out
    assert "the output was written but NOT verified" in caplog.text
    caplog.clear()
    code, out, _ = convert_cli(work, "mixed_bit", capsys, "--quiet", "--verifyFloor=0.9")
    assert code == 0 and out == "" and "the output was written but NOT verified" in caplog.text


def test_the_float_models_rule_counts_what_its_folding_makes(tmp_path, monkeypatch):
    """The float model keeps its own rule (FloatPlan: its mapped weights stay file pages), plus the bytes its
    constant folding makes: float16 weights behind a Cast fold to a float32 copy at load."""
    from ptqlite import stream

    half = decoder()
    for tensor in list(half.graph.initializer):
        if tensor.name == "lm_head":
            value = numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(value, "lm_head16"))
            half.graph.node.insert(0, helper.make_node("Cast", ["lm_head16"], ["lm_head"], to=TensorProto.FLOAT))
            expected = value.size * 4
    path = save_external(half, tmp_path / "half.onnx")
    assert verify_module.float_plan(str(path)).folded == 0  # under WHOLE_LOAD_BYTES: not asked
    monkeypatch.setattr(stream, "WHOLE_LOAD_BYTES", 0)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime: the plan is read again
    plan = verify_module.float_plan(str(path))
    assert plan.folded == expected
    assert verify_module.compare_memory(plan) == verify_module.compare_memory(
        verify_module.FloatPlan(plan.size, plan.mapped, plan.held)) + expected


def test_a_block_wise_dequantize_of_a_matmul_weight_counts_the_fused_copy():
    """onnxruntime fuses DequantizeLinear(block_size) + MatMul into MatMulNBits, which makes its own copy of the
    codes, float32 scales and zero points while the originals are held; a per-tensor one is not counted."""
    k, n, block = 64, 8, 32
    rng = np.random.default_rng(0)
    codes = helper.make_tensor("codes", TensorProto.INT4, [k, n], rng.integers(-8, 8, k * n).tolist())
    zero = helper.make_tensor("zero", TensorProto.INT4, [k // block, n], [0] * (k // block * n))
    scales = numpy_helper.from_array(rng.random((k // block, n)).astype(np.float16), "scales16")
    nodes = [helper.make_node("Cast", ["scales16"], ["scales"], to=TensorProto.FLOAT),
             helper.make_node("DequantizeLinear", ["codes", "scales", "zero"], ["w"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [codes, zero, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    cpu_session(model, "for the test")
    estimate = loadmem.predict_load(model)
    assert estimate.folded == k // block * n * 4  # the Cast of the scales
    assert estimate.fused == k * n // 2 + 4 * (k // block * n) + k // block * n // 2
    assert estimate.initializers == k * n // 2 + k // block * n // 2 + k // block * n * 2


def _spy_folding(monkeypatch) -> list[bool]:
    """constant_folding of every session the gate makes for the output (the float model's are not recorded)."""
    seen: list[bool] = []
    real = verify_module.cpu_session

    def spy(model, purpose, **kwargs):
        seen.append(kwargs.get("constant_folding", True))
        return real(model, purpose, **kwargs)

    monkeypatch.setattr(verify_module, "cpu_session", spy)
    return seen


def test_an_output_whose_folding_does_not_fit_is_compared_without_constant_folding(monkeypatch, caplog):
    """Reproduction (issue 11: a mixed-bit output over 2 GB decodes to several times its float model at load):
    where the default load does not fit but the decoded values alone do, the gate compares the output in a
    session without constant folding (the same kernels: the same values), and says why, with a warning."""
    config = parse_config(CONFIGS["default_8bit"].replace("bit_num=8", "bit_num=4"))
    quantized = convert(decoder(), config, verify=False).model
    estimate, unfolded = loadmem.predict_load(quantized), loadmem.predict_unfolded(quantized)
    room = unfolded + verify_module.LOAD_RESERVE
    assert room < estimate.total + verify_module.LOAD_RESERVE
    reference = convert(decoder(), config)  # with the memory the machine has: the default session
    assert not reference.verification.unfolded
    monkeypatch.setattr(verify_module, "available_memory", lambda: room)
    seen = _spy_folding(monkeypatch)
    result = convert(decoder(), config)
    assert seen[-1] is False  # the output's session: without constant folding
    checked = result.verification
    assert not checked.not_loaded and checked.unfolded.startswith("loading it in ONNX Runtime would need about")
    assert checked.outputs[0].mean == pytest.approx(reference.verification.outputs[0].mean, abs=1e-6)
    assert result.warnings[0] == verify_module.unfolded_message(checked)  # (then the 4-bit caution)
    assert "without constant folding" in caplog.text


def test_a_session_without_constant_folding_computes_the_same_outputs():
    """Property of the fallback: the decoders run at every run compute what folding computes at load."""
    config = parse_config(CONFIGS["mixed_bit"])
    quantized = convert(decoder(), config, verify=False).model
    feeds = {"ids": _ids()[0]["ids"]}
    folded = cpu_session(quantized, "for the test").run(None, feeds)
    unfolded = cpu_session(quantized, "for the test", constant_folding=False).run(None, feeds)
    for a, b in zip(folded, unfolded, strict=True):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert loadmem.predict_unfolded(quantized) < loadmem.predict_load(quantized).total


def test_the_cli_says_the_output_was_compared_without_constant_folding(work, capsys, monkeypatch):  # noqa: F811
    why = "loading it in ONNX Runtime would need about 9.9 GB of memory (its tensors 2.00 GB) and 5.0 GB is available"
    monkeypatch.setattr(verify_module, "too_large_to_load", lambda model: why)
    monkeypatch.setattr(verify_module, "too_large_to_run_unfolded", lambda model: False)
    code, out, _ = convert_cli(work, "mixed_bit", capsys)
    assert code == 0 and "cosine mean" in out
    assert f"  note: in a session without constant folding, since {why}" in out

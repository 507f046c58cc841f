"""auto_tune in a streaming conversion (and on a model over the one-file limit): each init_scale it tries is
evaluated on a temp file whose weights ONNX Runtime maps (autotune.MappedCandidate), written a weight at a time from
the input's memory map. It chooses what the in-memory search chooses, computes what the output computes, and
leaves no temp file behind, also on a failure."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_stream import CONFIGS, assert_same_tensors, decoder, save_external

from ptqlite import cli, stream
from ptqlite import model as model_module
from ptqlite.autotune import MappedCandidate
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.passes import mixed_bit
from ptqlite.runtime import cosine_similarity

SEQ, SAMPLES, VOCAB = 8, 3, 256


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """A decoder with a fixed sequence length in external data, BIN calibration samples of its ids, a mixed-bit
    auto_tune config, and a temp folder of its own (to see what is left in it)."""
    model = decoder(vocab=VOCAB)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = SEQ
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = SEQ
    (tmp_path / "in").mkdir()
    save_external(model, tmp_path / "in" / "model.onnx")
    (tmp_path / "out").mkdir()
    (tmp_path / "cal").mkdir()
    rng = np.random.default_rng(3)
    for i in range(SAMPLES):
        rng.integers(0, VOCAB, (1, SEQ)).astype(np.int64).tofile(tmp_path / "cal" / f"{i}.bin")
    config = (CONFIGS["mixed_bit"] + "auto_tune=true\n[data_preprocess_param]\n"
              f"calibrate_path=ids:{tmp_path / 'cal'}\ncalibrate_size={SAMPLES}\ninput_type=BIN\n")
    (tmp_path / "tune.cfg").write_text(config)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path


def searches(monkeypatch) -> list:
    """The TuneResult of every auto_tune search, as they finish (full-precision history)."""
    found = []
    real = mixed_bit.search_scale
    monkeypatch.setattr(mixed_bit, "search_scale", lambda evaluate, start: found.append(real(evaluate, start))
                        or found[-1])
    return found


def candidates(monkeypatch) -> list:
    made = []
    real = MappedCandidate.__init__

    def recording(self, *args):
        real(self, *args)
        made.append(self.folder)

    monkeypatch.setattr(MappedCandidate, "__init__", recording)
    return made


def left_in_temp(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "tmp").iterdir() if p.name.startswith("ptqlite-tune-"))


def convert_cli(work: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["--fmk=ONNX", f"--modelFile={work / 'in' / 'model.onnx'}",
                     f"--configFile={work / 'tune.cfg'}", f"--outputFile={work / 'out' / 'tuned'}", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_streamed_auto_tune_chooses_and_writes_what_the_in_memory_one_does(tuned, capsys, monkeypatch):
    config = parse_config((tuned / "tune.cfg").read_text())
    found, made = searches(monkeypatch), candidates(monkeypatch)
    expected = convert(onnx.load(str(tuned / "in" / "model.onnx")), config, verify=False)
    assert not made  # in memory: the substituted copies, as before
    streamed = []
    real = stream.StagedOutput.finish
    monkeypatch.setattr(stream.StagedOutput, "finish", lambda self, *a: streamed.append(1) or real(self, *a))
    code, out, err = convert_cli(tuned, capsys)
    assert code == 0, err
    assert streamed and len(made) == 1, "auto_tune did not stream"
    assert "not streamed" not in out and "ONNX Runtime mapped" in out
    in_memory, on_file = found
    assert on_file.init_scale == in_memory.init_scale
    assert [s for s, _ in on_file.history] == [s for s, _ in in_memory.history]
    # the mapped session runs without prepacking: the same values up to float rounding
    np.testing.assert_allclose([c for _, c in on_file.history], [c for _, c in in_memory.history], atol=1e-6)
    assert_same_tensors(onnx.load(str(tuned / "out" / "tuned.onnx")), expected.model)
    assert left_in_temp(tuned) == [] and not made[0].exists()


def test_each_evaluation_computes_what_the_output_at_that_init_scale_computes(tuned, capsys, monkeypatch):
    """The cosine auto_tune measured at an init_scale is the one of the real mixed-bit output at that init_scale
    (its decoders folded by ONNX Runtime), on the same samples."""
    found = searches(monkeypatch)
    code, _, err = convert_cli(tuned, capsys, "--verify=off")
    assert code == 0, err
    feeds = [{"ids": np.fromfile(tuned / "cal" / f"{i}.bin", np.int64).reshape(1, SEQ)} for i in range(SAMPLES)]
    source = onnx.load(str(tuned / "in" / "model.onnx"))
    floats = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"])
    for scale, measured in found[0].history[:3]:
        config = parse_config(CONFIGS["mixed_bit"].replace("init_scale=0.02", f"init_scale={scale!r}"))
        output = convert(onnx.load(str(tuned / "in" / "model.onnx")), config, verify=False).model
        session = ort.InferenceSession(output.SerializeToString(), providers=["CPUExecutionProvider"])
        real = np.mean([cosine_similarity(floats.run(None, f)[0], session.run(None, f)[0]) for f in feeds])
        assert abs(real - measured) < 1e-6, (scale, real, measured)


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_a_failure_while_tuning_leaves_no_temp_file_and_no_output(tuned, capsys, monkeypatch, fault):
    calls = []
    real = mixed_bit.quantize_layer

    def fail_later(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:  # in the second evaluation: the candidate's data file holds decoded weights
            assert len(left_in_temp(tuned)) == 1
            raise fault("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(mixed_bit, "quantize_layer", fail_later)
    if fault is KeyboardInterrupt:
        code, _, err = convert_cli(tuned, capsys)
        assert code == 130, err
    else:
        with pytest.raises(RuntimeError):
            convert_cli(tuned, capsys)
    assert len(calls) == 20
    assert left_in_temp(tuned) == []
    assert list((tuned / "out").iterdir()) == []


def test_a_model_over_the_one_file_limit_is_tuned_from_a_mapped_file(tuned, monkeypatch):
    """An in-memory model too large for one ONNX file (the limit lowered to a few KB here) cannot be given to ONNX
    Runtime as bytes: auto_tune maps it from a file, and chooses the init_scale it chooses in memory."""
    config = parse_config((tuned / "tune.cfg").read_text())
    found, made = searches(monkeypatch), candidates(monkeypatch)
    expected = convert(onnx.load(str(tuned / "in" / "model.onnx")), config, verify=False)
    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 4096)
    got = convert(onnx.load(str(tuned / "in" / "model.onnx")), config, verify=False)
    assert len(made) == 1 and left_in_temp(tuned) == []
    assert found[1].init_scale == found[0].init_scale
    assert [s for s, _ in found[1].history] == [s for s, _ in found[0].history]
    assert_same_tensors(got.model, expected.model)


def test_mapped_candidate_rewrites_weights_in_place_and_maps_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)  # not rewritten: 128 bytes, stays inline
    table = rng.standard_normal((300, 32)).astype(np.float32)  # not rewritten: moved to the data file
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "bias"], ["a"]),
         helper.make_node("Gather", ["table", "i"], ["g"]), helper.make_node("Add", ["a", "g"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (bias, "bias"), (table, "table"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": rng.standard_normal((1, 64)).astype(np.float32), "i": np.array([7])}
    with MappedCandidate(model, {"w"}) as candidate:
        stored = onnx.load(str(candidate.path), load_external_data=False)
        assert {t.name for t in stored.graph.initializer if stream.is_external(t)} == {"w", "table"}
        assert all(int(e.value) % 4096 == 0 for t in stored.graph.initializer for e in t.external_data
                   if e.key == "offset")

        def run():
            session = ort.InferenceSession(str(candidate.path), providers=["CPUExecutionProvider"])
            return session.run(None, feed)[0]

        np.testing.assert_allclose(run(), feed["x"] @ w + bias + table[7:8], rtol=1e-5, atol=1e-5)
        candidate.write("w", 2 * w)
        np.testing.assert_allclose(run(), feed["x"] @ (2 * w) + bias + table[7:8], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="shape"):
            candidate.write("w", w.T)
        folder = candidate.folder
    assert not folder.exists()
    assert len(model.graph.initializer[0].raw_data) == w.nbytes  # the caller's model is not touched


def test_a_temp_directory_without_room_is_one_sentence(tuned, capsys, monkeypatch):
    import errno

    real = MappedCandidate._put
    calls = []

    def full(self, values):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, values)

    monkeypatch.setattr(MappedCandidate, "_put", full)
    code, _, err = convert_cli(tuned, capsys)
    assert code == 2
    assert "could not write auto_tune's temp copy of the model" in err and "free some space" in err
    assert "Traceback" not in err and "TMPDIR" in err
    assert left_in_temp(tuned) == [] and list((tuned / "out").iterdir()) == []

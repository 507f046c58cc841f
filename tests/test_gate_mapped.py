"""The gate's float session on models whose weights are in external data: without prepacking, so the weights stay
memory-mapped file pages, and the memory rule that lets it compare a float model larger than the memory available
(docs/spec.md, "Verification"; docs/results.md, "The gate's float model mapped")."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from test_stream import _ids, _negated, decoder, save_external

from ptqlite import stream
from ptqlite import verify as verify_module
from ptqlite.runtime import cpu_session


def save_at_offsets(model: onnx.ModelProto, path: Path, skew: int) -> Path:
    """`model` with every initializer of 1 KB or more in `path`.data, each at a page boundary plus `skew` bytes
    (0: page-aligned, as onnx and ptqlite write; else unaligned), smaller ones inline."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with open(path.with_name(path.name + ".data"), "wb") as data:
        for tensor in copy.graph.initializer:
            raw = numpy_helper.to_array(tensor).tobytes()
            if len(raw) < 1024:
                continue
            offset = data.tell() + (-data.tell() % 4096) + skew
            data.write(b"\0" * (offset - data.tell()))
            data.write(raw)
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", path.name + ".data"), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save(copy, path)
    return path


def record_prepacking(monkeypatch) -> list[tuple[str, bool]]:
    """(source, prepacking) of each session the gate makes."""
    made: list[tuple[str, bool]] = []
    real = verify_module.cpu_session

    def recording(source, *args, **kwargs):
        made.append((source if isinstance(source, str) else "in memory", kwargs.get("prepacking", True)))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(verify_module, "cpu_session", recording)
    return made


def external_total(path: Path) -> int:
    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(stream.external_bytes(t) for t in graph.initializer if stream.is_external(t))


@pytest.mark.parametrize("skew", [0, 4, 100])
def test_the_plan_counts_external_tensors_as_mapped_at_aligned_and_unaligned_offsets(tmp_path, skew):
    """onnxruntime maps a data file from the page below a tensor's offset (measured on 1.32 at page + 1, 2, 8 and
    100 bytes: no allocated copy), so an unaligned tensor is read in place too on POSIX."""
    path = save_at_offsets(decoder(), tmp_path / "float.onnx", skew)
    graph = onnx.load(str(path), load_external_data=False).graph
    offsets = [int(e.value) for t in graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == skew for o in offsets)
    plan = verify_module.float_plan(str(path))
    assert plan.size == sum(p.stat().st_size for p in tmp_path.glob("float.onnx*"))
    assert plan.mapped == external_total(path) > 0.85 * plan.size
    assert plan.held == 0
    assert plan.prepacking is (os.name != "posix" and skew != 0)
    assert plan.allocated == plan.size - plan.mapped


def test_a_large_inline_tensor_or_no_external_data_keeps_prepacking(tmp_path):
    path = save_at_offsets(decoder(), tmp_path / "float.onnx", 0)
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((64, 64), np.float32), "extra"))  # 16 KB inline
    onnx.save(model, tmp_path / "mixed.onnx")
    mixed = verify_module.float_plan(str(tmp_path / "mixed.onnx"))
    assert mixed.held == 64 * 64 * 4 and mixed.prepacking and mixed.allocated == mixed.size
    onnx.save(decoder(), tmp_path / "inline.onnx")
    inline = verify_module.float_plan(str(tmp_path / "inline.onnx"))
    assert inline.mapped == 0 and inline.prepacking and inline.allocated == inline.size
    assert verify_module.float_plan(decoder()).prepacking  # in memory, under 2 GB: serialised whole


@pytest.mark.parametrize("skew", [0, 4])
def test_the_gate_runs_a_mapped_float_model_without_prepacking_and_the_output_with_the_defaults(tmp_path, monkeypatch,
                                                                                               skew):
    float_path = save_at_offsets(decoder(), tmp_path / "float.onnx", skew)
    broken_path = save_external(_negated(decoder()), tmp_path / "broken.onnx")
    made = record_prepacking(monkeypatch)
    checked = verify_module.verify(str(float_path), str(broken_path), _ids(), "2 given samples", 0.9)
    assert made == [(str(float_path), False), (str(broken_path), True)]
    assert checked.outputs[0].collapsed and checked.outputs[0].min < 0.1
    made.clear()
    onnx.save(decoder(), tmp_path / "inline.onnx")
    verify_module.verify(str(tmp_path / "inline.onnx"), str(broken_path), _ids(), "2 given samples", 0.9)
    assert made == [(str(tmp_path / "inline.onnx"), True), (str(broken_path), True)]


@pytest.mark.parametrize("skew", [0, 4])
def test_the_mapped_float_session_gives_the_prepacked_sessions_outputs_and_cosines(tmp_path, monkeypatch, skew):
    """Without prepacking the MatMul kernels pack each weight per run instead of once: the sums may round in
    another order (a few float32 ulps), and the gate's cosines are the same to 1e-6."""
    float_path = save_at_offsets(decoder(layers=3, hidden=128, ffn=384), tmp_path / "float.onnx", skew)
    quant = save_external(_negated(decoder(layers=3, hidden=128, ffn=384)), tmp_path / "broken.onnx")
    noisy = decoder(layers=3, hidden=128, ffn=384)
    rng = np.random.default_rng(1)
    for tensor in noisy.graph.initializer:
        values = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(values + 0.05 * rng.standard_normal(values.shape).astype(np.float32)
                                                * values.std(), tensor.name))
    near = save_external(noisy, tmp_path / "near.onnx")
    feeds = _ids()
    mapped = cpu_session(str(float_path), "for the test", prepacking=False)
    packed = cpu_session(str(float_path), "for the test")
    for sample in feeds:
        a, b = mapped.run(None, sample)[0], packed.run(None, sample)[0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    del mapped, packed
    results = {}
    for prepacking in (False, True):
        monkeypatch.setattr(verify_module, "float_plan", lambda model, p=prepacking: verify_module.FloatPlan(
            1, 0 if p else 1, 0))
        results[prepacking] = [verify_module.verify(str(float_path), str(q), feeds, "2 given samples", 0.9)
                               for q in (near, quant)]
    for mapped_check, packed_check in zip(results[False], results[True], strict=True):
        (m,), (p,) = mapped_check.outputs, packed_check.outputs
        assert (m.mean, m.min, m.collapsed) == pytest.approx((p.mean, p.min, p.collapsed), abs=1e-6)
        assert m.slice_min == p.slice_min or m.slice_min == pytest.approx(p.slice_min, abs=1e-6)
    assert results[False][0].outputs[0].min > 0.99 and results[False][1].outputs[0].min < 0.1


def test_a_mapped_float_model_larger_than_the_memory_available_is_compared(tmp_path, monkeypatch):
    """Reproduction: a float model over stream.WHOLE_LOAD_BYTES was compared only when 1.5x its bytes fitted in the
    memory available, though a session without prepacking allocates almost none of its mapped weights. Now the
    rule counts the mapped bytes at MAPPED_FACTOR: with less memory than the model (beyond the reserve) the mapped
    model is compared, and the same model with its weights inline is not, with the summary's sentence."""
    mapped_path = save_at_offsets(decoder(), tmp_path / "float.onnx", 0)
    onnx.save(decoder(), tmp_path / "inline.onnx")
    size = verify_module.float_plan(str(mapped_path)).size
    monkeypatch.setattr(stream, "WHOLE_LOAD_BYTES", 0)
    monkeypatch.setattr(verify_module, "available_memory", lambda: verify_module.COMPARE_RESERVE + size // 2)
    # the float model's rule alone: the output's own (tests/test_gate_load.py) would not load it in this memory
    monkeypatch.setattr(verify_module, "too_large_to_load", lambda model: "")
    checked = verify_module.verify(str(mapped_path), str(mapped_path), _ids(), "2 given samples", 0.9)
    assert not checked.skipped and checked.outputs[0].min == pytest.approx(1.0)
    inline = verify_module.verify(str(tmp_path / "inline.onnx"), str(mapped_path), _ids(), "2 given samples", 0.9)
    inline_size = (tmp_path / "inline.onnx").stat().st_size
    need = (inline_size * verify_module.COMPARE_FACTOR + verify_module.COMPARE_RESERVE) / 1e9
    assert inline.outputs == [] and inline.ran_alone == 2
    assert inline.skipped == (f"the float model takes {inline_size / 1e9:.2f} GB with its external data; running "
                              f"it would need about {need:.1f} GB of memory and 0.5 GB is available")


def test_the_memory_rule_counts_allocated_bytes_whole_and_mapped_ones_at_the_mapped_factor():
    plan = verify_module.FloatPlan(size=10 << 30, mapped=(10 << 30) - (1 << 20))
    assert verify_module.compare_memory(plan) == int(
        (1 << 20) * verify_module.COMPARE_FACTOR + ((10 << 30) - (1 << 20)) * verify_module.MAPPED_FACTOR
    ) + verify_module.COMPARE_RESERVE
    prepacked = verify_module.FloatPlan(size=10 << 30, mapped=(10 << 30) - (1 << 20), held=4096)
    assert verify_module.compare_memory(prepacked) == int((10 << 30) * verify_module.COMPARE_FACTOR) + (
        verify_module.COMPARE_RESERVE)


def test_an_in_memory_model_over_2_gb_is_planned_as_save_model_writes_it(tmp_path, monkeypatch):
    """An in-memory float model over 2 GB goes to a temp folder with its initializers of 1 KB or more in a
    page-aligned data file: the plan counts them as mapped before it is written, and the session made from the
    written file runs without prepacking."""
    import tempfile

    from ptqlite import model as model_module

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = decoder()
    plan = verify_module.float_plan(model)
    large = sum(n for n in (numpy_helper.to_array(t).nbytes for t in model.graph.initializer) if n >= 1024)
    assert plan.mapped == large and plan.held == 0 and not plan.prepacking
    monkeypatch.setattr(verify_module, "available_memory", lambda: 1 << 40)
    made = record_prepacking(monkeypatch)
    checked = verify_module.verify(model, _negated(decoder()), _ids(), "2 given samples", 0.9)
    assert checked.outputs[0].collapsed
    assert [p for _, p in made] == [False, True]


def test_a_file_is_read_once_for_its_plan_while_unchanged(tmp_path, monkeypatch):
    """The gate asks for a float file's plan before and while it loads it (and the run at other shapes again): an
    inline model is parsed whole each time, so the plan is read once until the file changes."""
    path = tmp_path / "m.onnx"
    onnx.save(decoder(), path)
    loads = []
    real = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    first = verify_module.float_plan(str(path))
    assert verify_module.float_plan(str(path)) == first and len(loads) == 1
    assert first.size == path.stat().st_size and first.prepacking
    save_external(decoder(), path)  # rewritten with its weights in a data file: read again
    again = verify_module.float_plan(str(path))
    assert len(loads) == 2 and again.mapped > 0 and again.size > path.stat().st_size

"""Streaming conversion (stream.py): a model with external data is converted without loading its weights; the
output equals the in-memory conversion's, the input files are never touched, nothing is left behind on a
failure, and the conversion's peak memory does not grow with the number of layers."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import record_gate_sessions
from onnx import TensorProto, helper, numpy_helper

from ptqlite import cli, stream
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.passes import weight as weight_pass
from ptqlite.paths import TEMP_TAG

ROOT = Path(__file__).resolve().parents[1]
_COMMON = "[common_quant_param]\nquant_type={mode}\nbit_num={bits}\nmin_quant_weight_size=0\nmin_quant_weight_channel=0\n"
CONFIGS = {
    "on_the_fly_block32": _COMMON.format(mode="WEIGHT_QUANT", bits=4)
    + "[weight_quant_param]\ndequant_strategy=ON_THE_FLY\nblock_size=32\n",
    "on_the_fly_int4": _COMMON.format(mode="WEIGHT_QUANT", bits=4) + "[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n",
    "default_8bit": _COMMON.format(mode="WEIGHT_QUANT", bits=8),
    "default_block32": _COMMON.format(mode="WEIGHT_QUANT", bits=4) + "[weight_quant_param]\nblock_size=32\n",
    "default_4bit": _COMMON.format(mode="WEIGHT_QUANT", bits=4),
    "dynamic_alwc": _COMMON.format(mode="DYNAMIC_QUANT", bits=8) + "[dynamic_quant_param]\nquant_strategy=ALWC\n",
    "dynamic_acwl": _COMMON.format(mode="DYNAMIC_QUANT", bits=8) + "[dynamic_quant_param]\nquant_strategy=ACWL\n",
    "mixed_bit": _COMMON.format(mode="WEIGHT_QUANT", bits=0) + "[mixed_bit_weight_quant_param]\ninit_scale=0.02\n",
}


def decoder(layers: int = 2, hidden: int = 64, ffn: int = 128, vocab: int = 256, seed: int = 0) -> onnx.ModelProto:
    """Embedding Gather, per layer an RMSNorm-like scale and q/o and gate/up/down MatMuls with residuals, lm_head."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, rows, cols):
        inits.append(numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32),
                                             name))
        return name

    def node(op, inputs, out):
        nodes.append(helper.make_node(op, inputs, [out], name=out))
        return out

    h = node("Gather", [w("embed", vocab, hidden), "ids"], "h0")
    for i in range(layers):
        inits.append(numpy_helper.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), f"g{i}"))
        x = node("Mul", [h, f"g{i}"], f"l{i}.norm")
        a = node("MatMul", [node("MatMul", [x, w(f"l{i}.q", hidden, hidden)], f"l{i}.q.out"),
                            w(f"l{i}.o", hidden, hidden)], f"l{i}.o.out")
        h = node("Add", [h, a], f"l{i}.res1")
        gate = node("MatMul", [h, w(f"l{i}.gate", hidden, ffn)], f"l{i}.gate.out")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"l{i}.sig")], f"l{i}.silu")
        up = node("MatMul", [h, w(f"l{i}.up", hidden, ffn)], f"l{i}.up.out")
        down = node("MatMul", [node("Mul", [silu, up], f"l{i}.swiglu"), w(f"l{i}.down", ffn, hidden)], f"l{i}.down.out")
        h = node("Add", [h, down], f"l{i}.res2")
    node("MatMul", [h, w("lm_head", hidden, vocab)], "logits")
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def graph_only(model: onnx.ModelProto) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.initializer[:]
    return copy.SerializeToString(deterministic=True)


@pytest.fixture
def work(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    save_external(decoder(), src / "model.onnx")
    (tmp_path / "out").mkdir()
    return tmp_path


def convert_cli(work: Path, name: str, capsys, *extra: str) -> tuple[int, str, str]:
    config = work / f"{name}.cfg"
    config.write_text(CONFIGS[name])
    code = cli.main(["--fmk=ONNX", f"--modelFile={work / 'in' / 'model.onnx'}", f"--configFile={config}",
                     f"--outputFile={work / 'out' / name}", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_output_equals_the_in_memory_conversion(work, capsys, name, monkeypatch):
    streamed = []
    real = stream.StagedOutput.finish
    monkeypatch.setattr(stream.StagedOutput, "finish", lambda self, *a: streamed.append(1) or real(self, *a))
    before = {p.name: sha(p) for p in (work / "in").iterdir()}
    code, out, err = convert_cli(work, name, capsys)
    assert code == 0, err
    assert streamed, "the CLI did not stream a model with external data"
    assert {p.name: sha(p) for p in (work / "in").iterdir()} == before  # the input files are unchanged
    target = work / "out" / f"{name}.onnx"
    assert sorted(p.name for p in (work / "out").iterdir()) == [target.name, target.name + ".data"]
    got = onnx.load(str(target))  # with its external data
    # the same conversion in memory, from the model loaded whole
    expected = convert(onnx.load(str(work / "in" / "model.onnx")), parse_config(CONFIGS[name]), verify=False).model
    assert_same_tensors(got, expected)
    assert "cosine" in out  # the gate compared it with the float model (small enough to load whole)


def assert_same_tensors(got: onnx.ModelProto, expected: onnx.ModelProto) -> None:
    assert graph_only(got) == graph_only(expected)
    assert [t.name for t in got.graph.initializer] == [t.name for t in expected.graph.initializer]
    for a, b in zip(got.graph.initializer, expected.graph.initializer, strict=True):
        assert tensor_bytes(a) == tensor_bytes(b), a.name


def test_mixed_bit_with_shared_decoders_cut_by_size_streams_like_in_memory(work, capsys, monkeypatch):
    """Mixed bit streams (its layers' codes are made again from the input's memory map for the shared decoders,
    each decoder's data goes to the output's data file as it is built); with the shared decoders cut at a few
    layers' values (GROUP_VALUES lowered) the output is still the in-memory conversion's, tensor for tensor, and
    has more shared decoders than with one group per form."""
    from ptqlite.passes import mixed_bit

    streamed = []
    real = stream.StagedOutput.finish
    monkeypatch.setattr(stream.StagedOutput, "finish", lambda self, *a: streamed.append(1) or real(self, *a))
    config = parse_config(CONFIGS["mixed_bit"])
    whole = convert(onnx.load(str(work / "in" / "model.onnx")), config, verify=False).model
    monkeypatch.setattr(mixed_bit, "GROUP_VALUES", 20000)  # the tiny decoder's layers: 4096 to 16384 values
    code, out, err = convert_cli(work, "mixed_bit", capsys)
    assert code == 0, err
    assert streamed and "cosine" in out
    got = onnx.load(str(work / "out" / "mixed_bit.onnx"))
    assert_same_tensors(got, convert(onnx.load(str(work / "in" / "model.onnx")), config, verify=False).model)

    def splits(model):
        return sum(node.op_type == "Split" for node in model.graph.node)

    assert splits(got) > splits(whole) >= 1


def test_bounded_groups_cut_in_order_and_keep_a_large_layer_alone(monkeypatch):
    from types import SimpleNamespace

    from ptqlite.passes import mixed_bit

    monkeypatch.setattr(mixed_bit, "GROUP_VALUES", 100)
    layers = [SimpleNamespace(name=n, size=size) for n, size in zip("abcdef", (40, 50, 20, 300, 10, 100))]
    runs = mixed_bit.bounded_groups(layers)
    assert [[layer.name for layer in run] for run in runs] == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]


def test_a_conversion_that_cannot_stream_a_model_with_external_data_says_why(work, capsys):
    """--fp16=on rewrites every float weight, so the model is loaded whole: the summary says so and why (as it
    would for FULL_QUANT, debug reports or --inputShape). Mixed bit's auto_tune streams."""
    from ptqlite.convert import streaming_refusal

    tuned = parse_config(CONFIGS["mixed_bit"] + "auto_tune=true\n")
    assert streaming_refusal(tuned, None, "m.onnx") == ""
    assert streaming_refusal(parse_config(CONFIGS["mixed_bit"]), None, "m.onnx") == ""
    assert "FULL_QUANT runs the float model in memory" in streaming_refusal(
        parse_config(_COMMON.format(mode="FULL_QUANT", bits=8) + "[data_preprocess_param]\ncalibrate_path=ids:d\n"
                     "calibrate_size=1\ninput_type=BIN\n"), None, "m.onnx")
    code, out, err = convert_cli(work, "mixed_bit", capsys, "--fp16=on", "--verify=off")
    assert code == 0, err
    assert ("not streamed: --fp16=on rewrites every float weight, so the model was loaded whole with its "
            "external data") in out
    code, out, err = convert_cli(work, "default_8bit", capsys, "--verify=off")
    assert code == 0 and "not streamed" not in out


def test_streamed_output_runs_like_the_in_memory_one(work, capsys):
    import onnxruntime as ort

    code, _, err = convert_cli(work, "on_the_fly_block32", capsys)
    assert code == 0, err
    expected = convert(onnx.load(str(work / "in" / "model.onnx")), parse_config(CONFIGS["on_the_fly_block32"]),
                       verify=False).model
    feed = {"ids": np.array([[1, 7, 200, 3]], np.int64)}
    got = ort.InferenceSession(str(work / "out" / "on_the_fly_block32.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, feed)[0]
    want = ort.InferenceSession(expected.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_failure_during_a_streaming_conversion_leaves_no_file(work, capsys, monkeypatch, fault):
    calls = []
    real = weight_pass.quantize_blocks

    def fail_later(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the output's data file already holds the first weights
            assert any(TEMP_TAG in p.name for p in (work / "out").iterdir())
            raise fault("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(weight_pass, "quantize_blocks", fail_later)
    before = {p.name: sha(p) for p in (work / "in").iterdir()}
    if fault is KeyboardInterrupt:
        code, _, err = convert_cli(work, "on_the_fly_block32", capsys)
        assert code == 130, err
    else:
        with pytest.raises(RuntimeError):
            convert_cli(work, "on_the_fly_block32", capsys)
    assert list((work / "out").iterdir()) == []
    assert {p.name: sha(p) for p in (work / "in").iterdir()} == before


def test_a_collapse_refused_by_the_floor_leaves_no_file(work, capsys):
    code, _, err = convert_cli(work, "on_the_fly_int4", capsys, "--verifyFloor=1")
    assert code == 1, err
    assert list((work / "out").iterdir()) == []


def test_nan_in_external_data_is_refused_by_tensor(tmp_path, capsys):
    model = decoder()
    for tensor in model.graph.initializer:
        if tensor.name == "l1.up":
            values = numpy_helper.to_array(tensor).copy()
            values[3, 5] = np.nan
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    save_external(model, tmp_path / "model.onnx")
    (tmp_path / "w.cfg").write_text(CONFIGS["default_8bit"])
    code = cli.main(["--fmk=ONNX", f"--modelFile={tmp_path / 'model.onnx'}", f"--configFile={tmp_path / 'w.cfg'}",
                     f"--outputFile={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "weight 'l1.up' has 1 NaN value(s) of 8192" in err
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.data").exists()


def test_output_data_file_that_is_the_input_data_is_refused(tmp_path, capsys):
    save_external(decoder(), tmp_path / "model.onnx")
    (tmp_path / "w.cfg").write_text(CONFIGS["default_8bit"])
    os.rename(tmp_path / "model.onnx.data", tmp_path / "out.onnx.data")
    onnx_model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    for tensor in onnx_model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "out.onnx.data"
    onnx.save(onnx_model, tmp_path / "model.onnx")
    digest = sha(tmp_path / "out.onnx.data")
    code = cli.main(["--fmk=ONNX", f"--modelFile={tmp_path / 'model.onnx'}", f"--configFile={tmp_path / 'w.cfg'}",
                     f"--outputFile={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "is the input model's external data" in err
    assert sha(tmp_path / "out.onnx.data") == digest


# The child's own peak (VmHWM starts afresh at exec; ru_maxrss would carry the test process's). The ONNX Runtime
# load of the input is turned off: it holds the whole model by design, and only runs up to stream.WHOLE_LOAD_BYTES.
_PEAK = """import sys
from ptqlite import cli, stream
stream.WHOLE_LOAD_BYTES = 0
code = cli.main(["--fmk=ONNX", "--modelFile=" + sys.argv[1], "--configFile=" + sys.argv[2],
                 "--outputFile=" + sys.argv[3], "--verify=off", "--quiet"])
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
sys.exit(code)
"""


def peaks_by_layers(tmp_path: Path, config_text: str, script: str, layer_counts: tuple[int, ...]
                    ) -> tuple[dict[int, int], dict[int, int]]:
    """Peak RSS of one streamed CLI conversion per layer count (a child process running `script`, --verify=off)
    and the size of each decoder's data file."""
    config = tmp_path / "run.cfg"
    config.write_text(config_text)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    peaks, sizes = {}, {}
    for layers in layer_counts:
        folder = tmp_path / str(layers)
        folder.mkdir()
        path = save_external(decoder(layers, hidden=384, ffn=1024, vocab=512), folder / "model.onnx")
        sizes[layers] = (folder / "model.onnx.data").stat().st_size
        done = subprocess.run([sys.executable, "-c", script, str(path), str(config), str(folder / "out")],
                              capture_output=True, text=True, env=env, timeout=600, check=False)
        assert done.returncode == 0, done.stderr
        assert (folder / "out.onnx.data").exists()  # it streamed
        peaks[layers] = int(done.stdout.split()[-1]) * 1024
    return peaks, sizes


def test_streaming_peak_memory_does_not_grow_with_the_layers(tmp_path):
    """Peak RSS of the conversion (a child process, --verify=off: the gate's session is the output's runtime
    memory) on 2 and 24 layers of the same width: the larger model has 130 MB more weights; the peaks differ by
    far less (the whole model loaded would add all of it)."""
    peaks, sizes = peaks_by_layers(tmp_path, CONFIGS["on_the_fly_block32"], _PEAK, (2, 24))
    grown = sizes[24] - sizes[2]
    assert grown > 120e6
    assert peaks[24] - peaks[2] < 0.2 * grown, (peaks, sizes)


_MIXED_PEAK = _PEAK.replace("stream.WHOLE_LOAD_BYTES = 0", "stream.WHOLE_LOAD_BYTES = 0\n"
                            "from ptqlite.passes import mixed_bit\nmixed_bit.GROUP_VALUES = 1 << 20")


def test_mixed_bit_streaming_peak_does_not_hold_every_weight(tmp_path):
    """Mixed bit streamed, 2 and 12 layers of the same width (child processes, --verify=off): the larger model has
    about 60 MB more weights, the peaks differ by far less. Before, the pass loaded the model whole and held every
    layer's codes (half the float model again) until the graph was written. Shared decoders are cut at 2^20
    values here (GROUP_VALUES, 2^25 by default: below that a group may hold the model's codes)."""
    peaks, sizes = peaks_by_layers(tmp_path, CONFIGS["mixed_bit"], _MIXED_PEAK, (2, 12))
    grown = sizes[12] - sizes[2]
    assert grown > 55e6
    assert peaks[12] - peaks[2] < 0.2 * grown, (peaks, sizes)


def test_streaming_searches_blocks_plainly_even_with_calibration_samples(work):
    """A streaming conversion does not run the float model: activation_weighted is not used, and a note says so."""
    from ptqlite.convert import discard_output
    from ptqlite.model import load_model

    path = work / "in" / "model.onnx"
    samples = [{"ids": np.arange(8, dtype=np.int64)[None] + i} for i in range(4)]
    result = convert(load_model(path, lazy=True), parse_config(CONFIGS["on_the_fly_block32"]), model_path=path,
                     stream_to=work / "out" / "streamed.onnx", verify=False, samples=samples)
    discard_output(result)
    assert "activation-weighted block search not used: a streaming conversion does not run the float model" in (
        result.notes)
    assert not any(p.name.startswith("streamed") for p in (work / "out").iterdir())


# ---------------------------------------------------------------- the gate on models over the size limits
# (stream.WHOLE_LOAD_BYTES, the 2 GB limit and the memory available lowered or faked on tiny models)


def _negated(model: onnx.ModelProto) -> onnx.ModelProto:
    """A broken "output": every weight negated (logits cosine about 0 against the float model)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    return copy


def _ids() -> list[dict[str, np.ndarray]]:
    return [{"ids": (np.arange(8, dtype=np.int64)[None] * (i + 3)) % 256} for i in range(2)]


def test_a_broken_output_of_a_float_file_over_the_whole_load_limit_collapses(tmp_path, monkeypatch):
    """Reproduction: above stream.WHOLE_LOAD_BYTES the gate only ran the output once, so an output whose logits
    are unrelated to the float ones passed. With the memory available for the float model, both run from their files and it
    collapses."""
    from ptqlite import verify as verify_module

    float_path = save_external(decoder(), tmp_path / "float.onnx")
    broken_path = save_external(_negated(decoder()), tmp_path / "broken.onnx")
    monkeypatch.setattr(stream, "WHOLE_LOAD_BYTES", 0)
    monkeypatch.setattr(verify_module, "available_memory", lambda: 1 << 40)
    checked = verify_module.verify(str(float_path), str(broken_path), _ids(), "2 given samples", 0.9)
    assert not checked.skipped
    assert [(o.name, o.collapsed) for o in checked.outputs] == [("logits", True)]
    assert checked.outputs[0].min < 0.1
    good = verify_module.verify(str(float_path), str(float_path), _ids(), "2 given samples", 0.9)
    assert good.outputs[0].min == pytest.approx(1.0) and not good.collapsed


def test_a_broken_output_of_an_in_memory_model_over_2_gb_collapses(tmp_path, monkeypatch):
    """Reproduction: an in-memory float model over 2 GB was only loaded ("not compared") and an in-memory output
    over 2 GB not even loaded. Both now go to a temp folder with external data, run from there, and the folder is
    removed."""
    import tempfile

    from ptqlite import model as model_module
    from ptqlite import verify as verify_module

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 1000)  # the decoder's 200 KB count as "over 2 GB"
    monkeypatch.setattr(verify_module, "available_memory", lambda: 1 << 40)
    loaded = record_gate_sessions(monkeypatch)
    checked = verify_module.verify(decoder(), _negated(decoder()), _ids(), "2 given samples", 0.9)
    assert not checked.skipped and checked.outputs[0].collapsed
    assert len(loaded) == 2 and all(s.endswith("model.onnx") and "ptqlite-verify-" in s for s in loaded)
    assert list(tmp_path.iterdir()) == []  # the temp folders are gone


def test_a_float_model_too_large_for_memory_is_not_run_and_the_output_must_be_finite(tmp_path, monkeypatch):
    from ptqlite import verify as verify_module

    float_path = save_external(decoder(), tmp_path / "float.onnx")
    nan = decoder()
    nan.graph.node.append(helper.make_node("Sqrt", ["logits"], ["root"], name="root"))  # NaN where logits < 0
    nan.graph.output[0].name = "root"
    nan_path = save_external(nan, tmp_path / "nan.onnx")
    monkeypatch.setattr(stream, "WHOLE_LOAD_BYTES", 0)
    monkeypatch.setattr(verify_module, "available_memory", lambda: 100 << 20)
    # the float model's rule alone: the output's own (tests/test_gate_load.py) would not load it in this memory
    monkeypatch.setattr(verify_module, "too_large_to_load", lambda model: "")
    loaded: list[str] = []
    real = verify_module.cpu_session
    monkeypatch.setattr(verify_module, "cpu_session", lambda s, *a, **k: loaded.append(s) or real(s, *a, **k))
    size = sum(p.stat().st_size for p in tmp_path.glob("float.onnx*"))
    checked = verify_module.verify(str(float_path), str(float_path), _ids(), "2 given samples", 0.9)
    assert loaded == [str(float_path)]  # once, as the output: the float side is not run
    assert checked.outputs == [] and checked.ran_alone == 2 and checked.non_finite == {}
    plan = verify_module.float_plan(str(float_path))  # its weights mapped: the session would allocate little
    assert plan.size == size and not plan.prepacking
    need = verify_module.compare_memory(plan) / 1e9
    assert checked.skipped == (f"the float model takes {size / 1e9:.2f} GB with its external data "
                               f"({plan.mapped / 1e9:.2f} GB of it mapped from its data files); running it "
                               f"would need about {need:.1f} GB of memory and 0.1 GB is available")
    broken = verify_module.verify(str(float_path), str(nan_path), _ids(), "2 given samples", 0.9)
    assert broken.non_finite == {"root": 2}


def test_the_cli_gate_of_a_streaming_conversion_compares_when_memory_allows_and_says_why_not(work, capsys,
                                                                                            monkeypatch):
    from ptqlite import verify as verify_module

    monkeypatch.setattr(stream, "WHOLE_LOAD_BYTES", 0)
    monkeypatch.setattr(verify_module, "available_memory", lambda: 1 << 40)
    code, out, _ = convert_cli(work, "default_8bit", capsys)
    assert code == 0
    assert "verified in ONNX Runtime against the float model on 2 synthetic inputs:" in out
    assert re.search(r"output 'logits': cosine mean 0\.99\d+, min 0\.99\d+", out), out
    monkeypatch.setattr(verify_module, "available_memory", lambda: 0)
    # the float model's rule alone: the output's own (tests/test_gate_load.py) would not load it in this memory
    monkeypatch.setattr(verify_module, "too_large_to_load", lambda model: "")
    code, out, _ = convert_cli(work, "default_8bit", capsys)
    assert code == 0
    assert ("verified that ONNX Runtime loads the output and runs it on 2 synthetic inputs (every output finite); "
            "not compared with the float model: the float model takes ") in out


def test_nan_from_an_output_that_ran_alone_is_a_warning_or_with_a_floor_an_error(work, capsys, monkeypatch, caplog):
    from ptqlite import verify as verify_module

    monkeypatch.setattr(stream, "WHOLE_LOAD_BYTES", 0)
    monkeypatch.setattr(verify_module, "available_memory", lambda: 0)
    # the float model's rule alone: the output's own (tests/test_gate_load.py) would not load it in this memory
    monkeypatch.setattr(verify_module, "too_large_to_load", lambda model: "")
    real = weight_pass.run

    def nan_pass(model, config, **options):
        result = real(model, config, **options)
        result.model.graph.node.append(helper.make_node("Log", ["logits"], ["logits_log"], name="log"))
        result.model.graph.output[0].name = "logits_log"  # NaN where the logits are negative
        return result

    monkeypatch.setattr(sys.modules["ptqlite.convert"], "pass_for", lambda config: nan_pass)
    code, out, _ = convert_cli(work, "default_8bit", capsys)
    assert code == 0
    assert "(output 'logits_log' has NaN/Inf on 2 of 2 sample(s)); not compared with the float model" in out
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("the quantized model's output has NaN/Inf on the 2 synthetic inputs: 'logits_log' on 2 "
                            "of 2 sample(s) (not compared with the float model: the float model takes ") for m in messages)
    code, _, err = convert_cli(work, "default_8bit", capsys, "--verifyFloor=0.9")
    assert code == 1 and "has NaN/Inf on the 2 synthetic inputs" in err
    assert not [p for p in (work / "out").iterdir() if p.name.startswith(".")]


def test_heap_temporaries_sets_glibc_thresholds_and_is_a_no_op_without_glibc(monkeypatch):
    """The pass's temporaries up to 32 MB come from glibc's heap (mmap threshold 32 MB, trim threshold twice that);
    without glibc nothing is called. convert() sets them before the pass."""
    from ptqlite import stream

    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(stream, "_LIBC", FakeLibc())
    stream.heap_temporaries()
    stream.trim_heap()
    assert calls == [(-3, 32 << 20), (-1, 64 << 20), ("trim", 0)]
    monkeypatch.setattr(stream, "_LIBC", False)  # looked up, not found
    stream.heap_temporaries()
    stream.trim_heap()
    assert len(calls) == 3


def test_streamed_int4_blocks_keep_codes_scales_zero_points_in_that_order(work, capsys, monkeypatch):
    """The int4 block codes and zero points go to the data file from their packed arrays when they are made
    (stream.raw_tensor), the scales between them: the data file holds each weight's three tensors in the order
    spill writes a pass's tensors (codes, scales, zero points), as before that shortcut."""
    monkeypatch.setattr(stream, "MIN_BYTES", 1)  # the small model's scales and zero points to the data file too
    code, _, err = convert_cli(work, "on_the_fly_block32", capsys, "--verify=off")
    assert code == 0, err
    graph = onnx.load(str(work / "out" / "on_the_fly_block32.onnx"), load_external_data=False).graph
    offsets = {t.name: int(next(e.value for e in t.external_data if e.key == "offset"))
               for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    cast_from = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}  # float16 scales
    checked = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in offsets:
            names = [cast_from.get(name, name) for name in node.input]
            placed = [offsets[name] for name in names if name in offsets]
            assert placed == sorted(placed), node.name
            checked += len(placed) == 3
    assert checked, "no weight with its three tensors in the data file"

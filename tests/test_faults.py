"""Faults around a conversion: interrupts, odd or unwritable paths, full disks, outputs over 2 GB. Each is one
line with exit 2 (130 / 143 for Ctrl-C / SIGTERM) and leaves no temp file or half-written report behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqlite import cli, report
from ptqlite import model as model_module
from ptqlite.model import save_model, stored_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"


def tiny() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), f"W{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["a"], name="mm0"),
             helper.make_node("MatMul", ["a", "W1"], ["b"], name="mm1"),
             helper.make_node("MatMul", ["b", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def work(tmp_path):
    """model.onnx, w8.cfg and an empty folder out/."""
    onnx.save(tiny(), tmp_path / "model.onnx")
    (tmp_path / "w8.cfg").write_text(CONFIG)
    (tmp_path / "out").mkdir()
    return tmp_path


def convert_cli(work: Path, output: str, capsys, config: Path | None = None, model: Path | None = None):
    code = cli.main(["--fmk=ONNX", f"--modelFile={model or work / 'model.onnx'}", f"--outputFile={output}",
                     f"--configFile={config or work / 'w8.cfg'}"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("ptqlite: error: "), err
    return err.removeprefix("ptqlite: error: ").rstrip("\n")


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- interrupts


def _interrupt_after_half(exc: type[BaseException]):
    real = model_module.write_file

    def write(path, data):
        real(path, data[: len(data) // 2])  # a half-written temp file is on disk when the interrupt comes
        raise exc

    return write


def test_ctrl_c_during_the_write_leaves_no_file(work, capsys, monkeypatch):
    monkeypatch.setattr(model_module, "write_file", _interrupt_after_half(KeyboardInterrupt))
    code, _, err = convert_cli(work, str(work / "out" / "m"), capsys)
    assert code == 130
    assert err == "ptqlite: interrupted; nothing was written\n"
    assert listing(work / "out") == []


def test_sigterm_during_the_write_leaves_no_file(work):
    """A real process: SIGTERM arrives while the temp file is half written (sent by the writer itself, so the
    timing is exact); the handler raises, the cleanup runs, exit 143."""
    script = ("import os, signal, sys\n"
              "from ptqlite import cli, model\n"
              "real = model.write_file\n"
              "def write(path, data):\n"
              "    real(path, data[: len(data) // 2])\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    real(path, data)\n"
              "model.write_file = write\n"
              f"sys.exit(cli.main(['--fmk=ONNX', '--modelFile={work / 'model.onnx'}', "
              f"'--outputFile={work / 'out' / 'm'}', '--configFile={work / 'w8.cfg'}']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stderr == "ptqlite: terminated; nothing was written\n"
    assert listing(work / "out") == []


def test_stale_temp_files_of_dead_processes_are_removed(work, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)
    out = work / "out"
    (out / f".m.onnx.ptqlite-tmp-{dead}").write_bytes(b"left by a killed run")
    (out / f".m.onnx.ptqlite-tmp-{os.getppid()}").write_bytes(b"a live process is still writing this")
    assert convert_cli(work, str(out / "m"), capsys)[0] == 0
    assert listing(out) == [f".m.onnx.ptqlite-tmp-{os.getppid()}", "m.onnx"]


# ---------------------------------------------------------------- output paths


def test_empty_output_file_is_one_line(work, capsys):
    code, _, err = convert_cli(work, "", capsys)
    assert code == 2
    assert error_line(err) == ("--outputFile is empty; expected the output model's path, e.g. "
                               "--outputFile=out/model.onnx")


def test_output_under_a_regular_file_is_one_line_before_converting(work, capsys):
    (work / "notes.txt").write_text("a file, not a folder")
    code, _, err = convert_cli(work, str(work / "notes.txt" / "sub" / "m"), capsys)
    assert code == 2
    assert error_line(err) == (f"--outputFile={work / 'notes.txt' / 'sub' / 'm.onnx'}: {work / 'notes.txt'} is "
                               "a file, not a folder")
    assert listing(work) == ["model.onnx", "notes.txt", "out", "w8.cfg"]


def test_read_only_output_folder_is_one_line(work, capsys, monkeypatch):
    """The checks ask the file system (os.access, statvfs): a read-only mount answers as simulated here (the
    tests run as root, for whom chmod alone does not make a folder read-only)."""
    out = work / "out"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == out else real_access(path, mode))

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    code, _, err = convert_cli(work, str(out / "m"), capsys)
    assert code == 2
    assert error_line(err) == f"--outputFile={out / 'm.onnx'}: cannot write in {out} (read-only file system)"
    assert listing(out) == []


@pytest.mark.parametrize("failure", [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")])
def test_write_errors_are_one_line_and_leave_nothing(work, capsys, monkeypatch, failure):
    real = model_module.write_file

    def write(path, data):
        real(path, data[:100])
        raise OSError(*failure)

    monkeypatch.setattr(model_module, "write_file", write)
    code, _, err = convert_cli(work, str(work / "out" / "m"), capsys)
    assert code == 2
    hint = "; free some space and run again" if failure[0] == errno.ENOSPC else ""
    assert error_line(err) == f"{work / 'out' / 'm.onnx'}: could not write the output model ({failure[1]}{hint})"
    assert listing(work / "out") == []


def test_dev_null_converts_and_writes_nothing(work, capsys):
    existed = os.path.exists("/dev/null.onnx")
    code, out, err = convert_cli(work, os.devnull, capsys)
    try:
        assert code == 0, err
        assert out.startswith(f"WEIGHT_QUANT: {work / 'model.onnx'} -> /dev/null (nothing written)\n")
        assert "\noutput size " in out
        assert os.path.exists("/dev/null.onnx") == existed
    finally:
        if not existed and os.path.isfile("/dev/null.onnx"):
            os.remove("/dev/null.onnx")  # what the old behaviour wrote


def test_a_fifo_or_device_as_output_is_refused(work, capsys):
    fifo = work / "out" / "pipe"
    os.mkfifo(fifo)
    code, _, err = convert_cli(work, str(fifo), capsys)
    assert code == 2
    assert error_line(err) == (f"--outputFile={fifo}: is a FIFO (named pipe); expected a file path (or /dev/null "
                               "to write nothing)")
    assert listing(work / "out") == ["pipe"]


def _feed_fifo_later(fifo: Path, text: str, stop: threading.Event) -> threading.Thread:
    """Unblocks a reader that opened the FIFO (the behaviour this guards against), so a failing test fails
    instead of hanging."""

    def feed():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet
                time.sleep(0.05)
                continue
            os.write(fd, text.encode())
            os.close(fd)
            return

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("flag", ["--configFile", "--modelFile"])
def test_a_fifo_as_input_is_refused_without_reading_it(work, capsys, flag):
    fifo = work / "pipe"
    os.mkfifo(fifo)
    stop = threading.Event()
    feeder = _feed_fifo_later(fifo, CONFIG, stop)
    kind = {"--configFile": "config", "--modelFile": "model"}[flag]
    try:
        code, _, err = convert_cli(work, str(work / "out" / "m"), capsys, **{kind: fifo})
    finally:
        stop.set()
        feeder.join()
    assert code == 2
    assert error_line(err) == f"{flag}={fifo}: is a FIFO (named pipe), not a regular file"


# ---------------------------------------------------------------- debug reports


def _debug_config(work: Path, folder: str) -> Path:
    config = work / "debug.cfg"
    config.write_text(CONFIG + f"debug_info_save_path={folder}\n")
    return config


def test_reports_appear_only_with_the_model(work, capsys, monkeypatch):
    debug = work / "debug"
    config = _debug_config(work, str(debug))
    assert convert_cli(work, str(work / "out" / "m"), capsys, config=config)[0] == 0
    assert "report.html" in listing(debug) and listing(work / "out") == ["m.onnx"]
    assert not [p for p in work.iterdir() if ".ptqlite-tmp-" in p.name]

    # the model cannot be written: the reports of this run do not appear, the earlier ones stay as they were
    (debug / "round_0.csv").write_text("earlier run")
    monkeypatch.setattr(model_module, "write_file", _interrupt_after_half(OSError(errno.ENOSPC, "No space left")))
    code, _, err = convert_cli(work, str(work / "out" / "n"), capsys, config=config)
    assert code == 2 and "could not write the output model (No space left" in error_line(err)
    assert (debug / "round_0.csv").read_text() == "earlier run"
    assert listing(work) == ["debug", "debug.cfg", "model.onnx", "out", "w8.cfg"]
    assert listing(work / "out") == ["m.onnx"]


def test_a_full_disk_while_writing_reports_leaves_no_report_folder(work, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "_write_html", full)
    config = _debug_config(work, str(work / "reports" / "run1"))
    code, _, err = convert_cli(work, str(work / "out" / "m"), capsys, config=config)
    assert code == 2
    assert error_line(err) == (f"{work / 'reports' / 'run1'}: could not write the debug reports (No space left on "
                               "device; free some space and run again)")
    assert listing(work) == ["debug.cfg", "model.onnx", "out", "w8.cfg"] and listing(work / "out") == []


@pytest.mark.parametrize("value, problem", [
    ("dbg\0x", "the path contains a NUL byte"),
    ("d" * 300, "the name 'dddddddddddddddddddddddddddddddddddddddd...' is 300 bytes long; at most 229 are allowed"),
])
def test_unusable_debug_path_is_one_line(work, capsys, value, problem):
    config = _debug_config(work, value)
    code, _, err = convert_cli(work, str(work / "out" / "m"), capsys, config=config)
    assert code == 2
    assert error_line(err) == f"{config}:5: [common_quant_param] debug_info_save_path={value}: {problem}"
    assert listing(work / "out") == []


# ---------------------------------------------------------------- calibration folders


def test_a_symlink_loop_in_a_calibration_folder_is_one_line(work, capsys):
    folder = work / "calib"
    folder.mkdir()
    np.zeros(32, "<f4").tofile(folder / "a.bin")
    os.symlink(folder / "loop2", folder / "loop1")
    os.symlink(folder / "loop1", folder / "loop2")
    config = work / "full.cfg"
    config.write_text("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n[data_preprocess_param]\n"
                      f"calibrate_path=x:{folder}\ncalibrate_size=1\ninput_type=BIN\n")
    code, _, err = convert_cli(work, str(work / "out" / "m"), capsys, config=config)
    assert code == 2
    assert error_line(err) == (f"{folder / 'loop1'}: calibration file cannot be read (Too many levels of symbolic "
                               "links); fix or remove it")
    os.symlink(work / "calib_b", work / "calib_a")  # the folder itself a loop
    os.symlink(work / "calib_a", work / "calib_b")
    config.write_text(config.read_text().replace(str(folder), str(work / "calib_a")))
    code, _, err = convert_cli(work, str(work / "out" / "m"), capsys, config=config)
    assert code == 2
    assert error_line(err).endswith(f"calibrate_path: directory '{work / 'calib_a'}' for input 'x' is a broken "
                                    f"symlink or a symlink loop (looked in {work / 'calib_a'})")


# ---------------------------------------------------------------- outputs over 2 GB


def test_large_outputs_use_external_data_decided_from_tensor_sizes(work, monkeypatch):
    """The 2 GB rule on a small model: the threshold is lowered instead of writing 2 GB."""
    model = tiny()
    before = model.SerializeToString(deterministic=True)
    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 10_000)  # the tensors hold 12 288 bytes
    path = save_model(model, work / "out" / "big.onnx")
    assert listing(work / "out") == ["big.onnx", "big.onnx.data"]
    assert model.SerializeToString(deterministic=True) == before  # the caller's model is unchanged
    assert (work / "out" / "big.onnx").stat().st_size < 1000
    assert stored_bytes(path) == (work / "out" / "big.onnx").stat().st_size + (work / "out" / "big.onnx.data").stat().st_size
    x = np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)
    external = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    inline = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(external, inline)
    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 13_000)
    save_model(model, work / "out" / "small.onnx")
    assert (work / "out" / "small.onnx").read_bytes() == before


def test_summary_sizes_include_external_data(work, capsys, monkeypatch):
    monkeypatch.setattr(model_module, "EXTERNAL_DATA_THRESHOLD", 1000)
    code, out, _ = convert_cli(work, str(work / "out" / "m"), capsys)
    assert code == 0
    total = stored_bytes(work / "out" / "m.onnx")
    assert (work / "out" / "m.onnx.data").exists() and total > (work / "out" / "m.onnx").stat().st_size
    assert out.splitlines()[-1].startswith(f"file size {(work / 'model.onnx').stat().st_size / 1e6:.2f} MB -> "
                                           f"{total / 1e6:.2f} MB")


# ---------------------------------------------------------------- nothing to quantize


def test_dynamic_quant_on_a_conv_only_model_says_why(tmp_path, capsys, caplog):
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "conv.onnx")
    config = tmp_path / "dyn.cfg"
    config.write_text("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n")
    code = cli.main(["--fmk=ONNX", f"--modelFile={tmp_path / 'conv.onnx'}", f"--outputFile={tmp_path / 'q'}",
                     f"--configFile={config}", "--quiet"])
    assert code == 0 and capsys.readouterr().out == ""
    # a warning (stderr through logging, "ptqlite: WARNING: ..." on the command line), not an error
    assert warnings(caplog) == [("DYNAMIC_QUANT quantizes MatMul/Gemm/Gather weights; this model has none: try "
                                "FULL_QUANT or WEIGHT_QUANT")]
    assert (tmp_path / "q.onnx").exists()


def test_weight_quant_with_every_weight_skipped_says_so(work, capsys, caplog):
    config = work / "big.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_size=65535\n")
    assert convert_cli(work, str(work / "out" / "m"), capsys, config=config)[0] == 0
    assert warnings(caplog) == [("WEIGHT_QUANT quantized nothing: all 3 candidate weight(s) were skipped (reasons in "
                                "the summary); the output equals the float model")]


def test_a_mode_that_quantizes_something_warns_nothing(work, capsys, caplog):
    assert convert_cli(work, str(work / "out" / "m"), capsys)[0] == 0
    assert warnings(caplog) == []


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ptqlite.convert" and r.levelname == "WARNING"]

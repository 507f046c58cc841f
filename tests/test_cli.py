"""The converter_lite-style command line: exit codes, one-line errors, nothing written on failure, determinism."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from helpers import INVALID, cli_workspace, one_error_line
from helpers import run_cli as run

from ptqlite.config import parse_config
from ptqlite.convert import pass_for
from ptqlite.passes import dynamic, full, mixed_bit, weight

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "resnet20_cifar10.onnx"
WEIGHT_CFG = "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=4\nmin_quant_weight_channel=0\n"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def work(tmp_path):
    return cli_workspace(tmp_path, WEIGHT_CFG, "w4.cfg")


def flags(model, config, output, *extra: str) -> list[str]:
    return ["--fmk=ONNX", f"--modelFile={model}", f"--outputFile={output}", f"--configFile={config}", *extra]






# ---------------------------------------------------------------- bad config values


@pytest.mark.parametrize("section, key, value, expected", INVALID, ids=[f"{k}={v}" for _, k, v, _ in INVALID])
def test_bad_config_value_exits_2_names_key_and_range_and_writes_nothing(work, capsys, section, key, value, expected):
    model, config, out = work
    head = "" if key == "quant_type" else "quant_type=WEIGHT_QUANT\n"
    extra = "" if section == "common_quant_param" else f"[{section}]\n"
    config.write_text(f"[common_quant_param]\n{head}{extra}{key}={value}\n")
    line = 4 if extra else 2 + bool(head)
    code, stdout, err = run(flags(model, config, out / "m.onnx"), capsys)
    assert code == 2
    assert stdout == ""
    assert one_error_line(err) == f"{config}:{line}: [{section}] {key}={value}: {expected}"
    assert list(out.iterdir()) == []


def test_cross_key_rule_through_the_cli(work, capsys):
    model, config, out = work
    config.write_text("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=4\n")
    code, _, err = run(flags(model, config, out / "m"), capsys)
    assert code == 2
    assert one_error_line(err) == f"{config}:3: [common_quant_param] bit_num=4: expected 8 for quant_type=FULL_QUANT"
    assert list(out.iterdir()) == []


def test_missing_config_file(work, capsys):
    model, config, out = work
    code, _, err = run(flags(model, config.with_name("absent.cfg"), out / "m"), capsys)
    assert code == 2
    assert one_error_line(err) == f"{config.with_name('absent.cfg')}: config file not found"
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- flags


def test_unknown_fmk_lists_the_supported_ones(work, capsys):
    model, config, out = work
    code, _, err = run(["--fmk=KERAS", *flags(model, config, out / "m")[1:]], capsys)
    assert code == 2
    assert one_error_line(err) == "--fmk=KERAS: expected one of ONNX, PYTORCH, TF, TFLITE"
    assert list(out.iterdir()) == []


def test_missing_model_file(work, capsys):
    _, config, out = work
    missing = out.parent / "nowhere.onnx"
    code, _, err = run(flags(missing, config, out / "m"), capsys)
    assert code == 2
    assert one_error_line(err) == f"{missing}: model file not found"
    assert list(out.iterdir()) == []


def test_missing_required_flag(work, capsys):
    model, _, out = work
    code, _, err = run(["--fmk=ONNX", f"--modelFile={model}", f"--outputFile={out / 'm'}"], capsys)
    assert code == 2
    assert "--configFile" in one_error_line(err)


@pytest.mark.parametrize("shape, message", [
    ("input:1,3,x,32", "--inputShape part 'input:1,3,x,32': expected name:d1,d2,... with positive integers"),
    ("1,3,32,32", "--inputShape part '1,3,32,32': expected name:d1,d2,... with positive integers"),
    ("input:1,0,32,32", "--inputShape part 'input:1,0,32,32': expected name:d1,d2,... with positive integers"),
    ("input:", "--inputShape part 'input:': expected name:d1,d2,... with positive integers"),
    (";", "--inputShape=';': expected name:d1,d2,...[;name2:...]"),
])
def test_input_shape_parsing_errors(work, capsys, shape, message):
    model, config, out = work
    code, _, err = run(flags(model, config, out / "m", f"--inputShape={shape}"), capsys)
    assert code == 2
    assert one_error_line(err) == message
    assert list(out.iterdir()) == []


def test_input_shape_names_must_exist_and_match_rank(work, capsys):
    model, config, out = work
    code, _, err = run(flags(model, config, out / "m", "--inputShape=image:1,3,32,32"), capsys)
    assert code == 2
    assert one_error_line(err) == f"--inputShape: {model} has no input 'image'; its inputs are input"
    code, _, err = run(flags(model, config, out / "m", "--inputShape=input:1,3,32"), capsys)
    assert code == 2
    assert one_error_line(err) == "--inputShape: input 'input' has rank 4, got 3 dims"
    assert list(out.iterdir()) == []


def test_input_shape_fixes_calibration_but_the_output_keeps_the_model_shapes(work, capsys):
    model, config, out = work
    code, _, _ = run(flags(model, config, out / "m", "--inputShape=input:2,3,32,32"), capsys)
    assert code == 0
    session = ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["N", 3, 32, 32]
    assert session.get_outputs()[0].shape == ["N", 10]


def test_bad_input_data_format(work, capsys):
    model, config, out = work
    code, _, err = run(flags(model, config, out / "m", "--inputDataFormat=NC"), capsys)
    assert code == 2
    assert "--inputDataFormat" in one_error_line(err) and "NHWC" in err


# ---------------------------------------------------------------- output file


@pytest.mark.parametrize("given, written", [("m", "m.onnx"), ("m.onnx", "m.onnx"), ("m.ONNX", "m.ONNX"),
                                            ("m.v2", "m.v2.onnx"), ("sub/dir/m", "sub/dir/m.onnx")])
def test_output_name_gets_onnx_suffix(work, capsys, given, written):
    model, config, out = work
    code, stdout, _ = run(flags(model, config, out / given, "--quiet"), capsys)
    assert code == 0 and stdout == ""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [written]


@pytest.mark.parametrize("spelling", ["same", "no_suffix", "dotdot"])
def test_output_equal_to_input_is_refused(work, capsys, spelling):
    model, config, out = work
    before = digest(model)
    output = {"same": model, "no_suffix": model.with_suffix(""), "dotdot": out / ".." / model.name}[spelling]
    code, _, err = run(flags(model, config, output), capsys)
    assert code == 2
    assert one_error_line(err) == f"--outputFile={output}: would overwrite the input model; choose another path"
    assert digest(model) == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx", "out", "w4.cfg"]


def test_conversion_leaves_input_identical_and_is_deterministic(work, capsys):
    model, config, out = work
    before = digest(model)
    assert run(flags(model, config, out / "a"), capsys)[0] == 0
    assert run(["convert", *flags(model, config, out / "b")], capsys)[0] == 0
    assert digest(model) == before
    assert (out / "a.onnx").read_bytes() == (out / "b.onnx").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "b.onnx"]  # no temp files left
    # The output is a standard model that plain onnxruntime loads.
    session = ort.InferenceSession(str(out / "a.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input"


def test_success_prints_a_summary(work, capsys):
    model, config, out = work
    code, stdout, _ = run(flags(model, config, out / "m"), capsys)
    assert code == 0
    assert stdout.startswith(f"WEIGHT_QUANT: {model} -> {out / 'm.onnx'}\n")
    assert "quantized " in stdout and "file size" in stdout
    assert (out / "m.onnx").stat().st_size < model.stat().st_size * 0.3  # 4-bit weights, packed


def test_output_path_that_is_a_folder_exits_2_before_converting(work, capsys):
    model, config, out = work
    (out / "m.onnx").mkdir()  # a folder where the output file should go: a path problem (exit 2), found up front
    code, _, err = run(flags(model, config, out / "m.onnx"), capsys)
    assert code == 2
    assert one_error_line(err) == f"--outputFile={out / 'm.onnx'}: is a folder; expected a file path"
    assert [p.name for p in out.iterdir()] == ["m.onnx"] and (out / "m.onnx").is_dir()


# ---------------------------------------------------------------- as a real process


def _process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(list(args), check=False, capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_console_script_bad_config(work):
    model, config, out = work
    script = Path(sys.executable).with_name("ptqlite")
    if not script.exists():
        pytest.skip(f"console script {script} is not installed")
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nmin_quant_weight_size=70000\n")
    proc = _process(str(script), *flags(model, config, out / "m"), cwd=out)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (f"ptqlite: error: {config}:3: [common_quant_param] min_quant_weight_size=70000: "
                           "expected an integer in [0, 65535]\n")
    assert list(out.iterdir()) == []


def test_module_entry_point_converts_with_relative_paths(work):
    out = work[2]
    proc = _process(sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", "--modelFile=../model.onnx",
                    "--outputFile=rel", "--configFile=../w4.cfg", "--quiet", cwd=out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert [p.name for p in out.iterdir()] == ["rel.onnx"]


def test_missing_model_with_existing_output(work, capsys):
    _, config, out = work
    (out / "m.onnx").write_bytes(b"old")
    missing = out.parent / "nowhere.onnx"
    code, _, err = run(flags(missing, config, out / "m.onnx"), capsys)
    assert code == 2
    assert one_error_line(err) == f"{missing}: model file not found"
    assert (out / "m.onnx").read_bytes() == b"old"


def test_no_arguments_prints_the_subcommands(capsys):
    from ptqlite.cli import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "convert" in err and "benchmark" in err and "analyze" in err


@pytest.mark.parametrize("text, module", [
    ("quant_type=WEIGHT_QUANT\nbit_num=4", weight),
    ("quant_type=WEIGHT_QUANT\nbit_num=0", mixed_bit),
    ("quant_type=FULL_QUANT\n[data_preprocess_param]\ncalibrate_path=x:calib\ncalibrate_size=1\ninput_type=BIN", full),
    ("quant_type=DYNAMIC_QUANT", dynamic),
])
def test_each_quant_mode_runs_its_pass(text, module):
    assert pass_for(parse_config(f"[common_quant_param]\n{text}\n")) is module.run


# ---------------------------------------------------------------- flags in any position, --version, unknown flags


@pytest.mark.parametrize("position", ["before", "after", "bare"])
@pytest.mark.parametrize("flag, level", [("-v", "INFO"), ("--verbose", "INFO"), ("-vv", "DEBUG")])
def test_verbose_in_any_position(work, capsys, caplog, position, flag, level):
    model, config, out = work
    argv = flags(model, config, out / "m")
    argv = {"before": [flag, "convert", *argv], "after": ["convert", *argv, flag], "bare": [*argv, flag]}[position]
    with caplog.at_level("DEBUG", logger="ptqlite"):
        code, stdout, _ = run(argv, capsys)
    assert code == 0 and "quantized" in stdout
    assert (out / "m.onnx").is_file()
    assert any(r.levelname == "INFO" for r in caplog.records)  # what each stage decided
    assert any(r.levelname == "DEBUG" for r in caplog.records) == (level == "DEBUG")


def test_version(capsys):
    import ptqlite

    code, stdout, err = run(["--version"], capsys)
    assert code == 0 and err == ""
    assert stdout == f"ptqlite {ptqlite.__version__}\n"
    assert run(["convert", "--version"], capsys)[1] == stdout


@pytest.mark.parametrize("bad, message", [
    ("--modelfile=x", "unknown flag --modelfile for ptqlite convert; did you mean --modelFile?"),
    ("--OUTPUTFILE=x", "unknown flag --OUTPUTFILE for ptqlite convert; did you mean --outputFile?"),
    ("--confgFile=x", "unknown flag --confgFile for ptqlite convert; did you mean --configFile?"),
    ("--modelFiles", "unknown flag --modelFiles for ptqlite convert; did you mean --modelFile?"),
])
def test_unknown_or_miscased_flag_is_named_with_a_suggestion(work, capsys, bad, message):
    model, config, out = work
    argv = [a for a in flags(model, config, out / "m") if not a.lower().startswith(bad.split("=")[0].lower())]
    for command in (["convert"], []):  # with and without the subcommand
        code, stdout, err = run([*command, *argv, bad], capsys)
        assert code == 2 and stdout == ""
        assert one_error_line(err) == message  # not "the following arguments are required"
    assert list(out.iterdir()) == []


def test_unknown_flag_without_a_near_one_lists_the_flags(work, capsys):
    model = work[0]
    code, _, err = run(["benchmark", f"--modelFile={model}", "--xyz=3"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("unknown flag --xyz for ptqlite benchmark; expected one of --help, --verbose, --modelFile,")


def test_unknown_subcommand_suggests_the_near_one(capsys):
    code, _, err = run(["analyse", "--fmk=ONNX"], capsys)
    assert code == 2
    assert one_error_line(err) == "unknown subcommand 'analyse'; did you mean analyze?"


def test_python_dash_m_ptqlite(work):
    proc = _process(sys.executable, "-m", "ptqlite", "--version", cwd=work[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ptqlite ")

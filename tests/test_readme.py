"""Every command and code block of README.md, run as it is written, from the root of the source tree.

bash blocks: each command line (backslash continuations joined) runs in a shell with `ptqlite` on PATH (this
interpreter, with this tree's src/ first). `make demo` and `make test` run their recipe as make prints it
(`make -n`), except the two steps that would reach outside this test: creating .venv and installing into it with
pip (the packages are the ones this interpreter already has), and, for `make test`, running this test suite
inside itself. ini blocks: the config converts the bundled model. python blocks: executed as a script. A block
in any other language fails the test, so a new kind of block cannot go unchecked.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import onnx
import pytest
from helpers import RESNET20, ROOT

README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text())]


def commands(text: str) -> list[str]:
    """The command lines of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [shlex.join(words) for words in lines if words]


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory):
    """PATH with a `ptqlite` that runs this tree's source with this interpreter."""
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "ptqlite"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m ptqlite "$@"\n')
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    (ROOT / "out").mkdir(exist_ok=True)
    return env


def _run(command: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"README command failed: {command}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


def _make(target: str, env: dict[str, str]) -> None:
    """The recipe of `make target` as make prints it, without the steps that create and fill .venv."""
    # Under `make test` this runs as a sub-make: without the parent's variables and with --no-print-directory,
    # make prints only the recipe (no "make[1]: Entering directory" lines).
    quiet = {k: v for k, v in env.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    recipe = _run(f"make -n --no-print-directory {target}", quiet).stdout.splitlines()
    assert recipe, f"make {target} has an empty recipe"
    python = shlex.quote(sys.executable)
    for line in recipe:
        if " -m venv " in line or " -m pip " in line or line.startswith("touch "):
            continue  # .venv: this interpreter already has the packages pip would install
        line = line.replace(".venv/bin/python", python)
        if " -m pytest" in line:
            assert target == "test"  # this test suite, already running
            continue
        _run(line, env)


def test_every_block_has_a_known_language():
    assert {language for language, _ in blocks()} <= {"bash", "ini", "python"}
    assert len(blocks()) >= 5


def test_bash_blocks_run_as_shown(shell_env):
    ran = []
    for language, text in blocks():
        if language != "bash":
            continue
        for command in commands(text):
            words = shlex.split(command)
            if words[0] == "make":
                _make(words[1], shell_env)
            else:
                _run(command, shell_env)
            ran.append(words[:2])
    assert ["make", "demo"] in ran and ["ptqlite", "convert"] in ran and ["ptqlite", "analyze"] in ran
    assert (ROOT / "out" / "resnet20_4bit.onnx").is_file()


def test_ini_block_converts_the_bundled_model(tmp_path, capsys, caplog):
    from ptqlite.cli import main

    (ini,) = [text for language, text in blocks() if language == "ini"]
    config = tmp_path / "readme.cfg"
    config.write_text(ini)
    code = main(["--fmk=ONNX", f"--modelFile={RESNET20}", f"--outputFile={tmp_path / 'm'}", f"--configFile={config}"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "skip_quant_node lists '/conv1/Conv'" in stdout  # the node it names exists
    assert "no node is named" not in caplog.text


def test_python_blocks_run_as_shown(monkeypatch):
    monkeypatch.chdir(ROOT)
    (ROOT / "out").mkdir(exist_ok=True)
    python = [text for language, text in blocks() if language == "python"]
    assert python
    for number, code in enumerate(python):
        namespace: dict = {}
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)  # noqa: S102 -- the README's own
        if "full" in namespace:  # the Python API example
            assert isinstance(namespace["full"], onnx.ModelProto) and len(namespace["result"].quantized) > 10
            assert (ROOT / "out" / "resnet20_full_quant.onnx").is_file()

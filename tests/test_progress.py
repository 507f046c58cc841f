"""Progress bars (k/n, ETA) on every long step, shown when asked (Python API progress=True) or on a terminal, and
nothing on stderr otherwise."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import conv_model
from helpers import run_cli as run

import ptqlite

MIXED = {"common_quant_param": {"quant_type": "WEIGHT_QUANT", "bit_num": 0, "min_quant_weight_channel": 0},
         "mixed_bit_weight_quant_param": {"auto_tune": True}}


def _images(count=4):
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32) for _ in range(count)]


def bars(err: str) -> dict[str, int | None]:
    """The tqdm bars drawn on stderr: description -> n of their 'k/n', None for a count without a total (k
    depends on how fast the steps run: a bar redraws at most every 0.1 s, and goes away when its step ends)."""
    found: dict[str, int | None] = {}
    for line in err.split("\r"):
        match = re.match(r"([a-z_ -]+): .*?(\d+)(?:/(\d+))?[a-z]* \[", line)
        if match:
            found[match.group(1)] = int(match.group(3)) if match.group(3) else None
    return found


def test_mixed_bit_search_and_auto_tune_show_bars(capsys, tmp_path):
    config = {**MIXED, "common_quant_param": {**MIXED["common_quant_param"],
                                              "debug_info_save_path": str(tmp_path / "reports")}}
    result = ptqlite.convert(conv_model(), config, calibration=_images(), progress=True)
    err = capsys.readouterr().err
    shown = bars(err)
    assert shown["mixed-bit search"] == len(result.quantized) > 0  # k of n layers
    assert shown["auto_tune"] == 16  # at most 8 coarse and 8 fine evaluations
    assert "debug reports" in shown  # rounds counted (the in-memory samples have no length)
    assert "<?" in err  # the ETA field before the first step (then an estimate such as <00:01)


def test_full_quant_calibration_and_reports_show_bars(capsys, tmp_path):
    config = {"common_quant_param": {"quant_type": "FULL_QUANT", "debug_info_save_path": str(tmp_path / "r")}}
    ptqlite.convert(conv_model(), config, calibration=_images(), progress=True)
    shown = bars(capsys.readouterr().err)
    assert "calibration" in shown and "debug reports" in shown  # counts: in-memory samples have no length


@pytest.mark.parametrize("progress", [None, False])
def test_no_bars_off_a_terminal_or_when_off(capsys, tmp_path, progress):
    config = {**MIXED, "common_quant_param": {**MIXED["common_quant_param"],
                                              "debug_info_save_path": str(tmp_path / "reports")}}
    ptqlite.convert(conv_model(), config, calibration=_images(), progress=progress)
    assert capsys.readouterr().err == ""  # stderr is captured here, not a terminal


def test_cli_off_a_terminal_prints_no_bars(capsys, tmp_path):
    model = tmp_path / "m.onnx"
    import onnx

    onnx.save(conv_model(), model)
    config = tmp_path / "mixed.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=0\nmin_quant_weight_channel=0\n"
                      "[mixed_bit_weight_quant_param]\nauto_tune=true\n")
    code, _, err = run(["--fmk=ONNX", f"--modelFile={model}", f"--outputFile={tmp_path / 'q'}",
                        f"--configFile={config}"], capsys)
    assert code == 0 and err == ""


# ---------------------------------------------------------------- -v: what each stage decided


@pytest.mark.parametrize("config, expected", [
    ({"common_quant_param": {"quant_type": "WEIGHT_QUANT", "bit_num": 4, "min_quant_weight_channel": 0}},
     ["WEIGHT_QUANT fixed 4 bit: per channel", "weight plan: 3 weights to quantize to 4 bit"]),
    ({"common_quant_param": {"quant_type": "WEIGHT_QUANT", "bit_num": 0, "min_quant_weight_channel": 0}},
     ["WEIGHT_QUANT mixed bit: init_scale 0.02", "mixed bit at init_scale 0.02: 3 layers quantized"]),
    ({"common_quant_param": {"quant_type": "FULL_QUANT"}},
     ["FULL_QUANT int8: target_device CPU, activations MAX_MIN", "graph plan: 3 of 3 weights int8",
      "calibration: 4 samples measured"]),
    ({"common_quant_param": {"quant_type": "DYNAMIC_QUANT"}},
     ["DYNAMIC_QUANT int8: quant_strategy ALWC", "DYNAMIC_QUANT weight plan (MatMul/Gemm/Gather): 1 weights to int8"]),
], ids=["fixed", "mixed", "full", "dynamic"])
def test_info_log_says_what_each_stage_decided(caplog, config, expected):
    with caplog.at_level("DEBUG", logger="ptqlite"):
        result = ptqlite.convert(conv_model(), config, calibration=_images(), progress=False)
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    for line in expected:
        assert any(m.startswith(line) for m in info), (line, info)
    debug = [r.getMessage() for r in caplog.records if r.levelname == "DEBUG"]
    assert sum(m.startswith("quantized ") for m in debug) == len(result.quantized)  # -vv: every tensor

"""WEIGHT_QUANT storage on real models: file bytes, load-time peak RAM, and OpenVINO against ONNX Runtime.

Usage (from the repository root; needs ../shared/bench, MiniLM built by bench/minilm.py into .cache/minilm):
    .venv/bin/python bench/weight_storage.py [--rows resnet56_8 ...] [--openvino]

Each row converts its model with the config below (default strategy), saves it under .cache/weight_storage and
prints the file's bytes and the peak RSS of a child process that loads it in ONNX Runtime and runs it once
(batch 1; MiniLM sequence 128), also as a ratio to the float model's. --openvino adds the cosine of OpenVINO's
output (CPU) to ONNX Runtime's on a seeded input. Run it with PYTHONPATH=<other src> to measure another version
of the pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from measure import run_child

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.model import save_model

RESNET56 = ROOT.parent / "shared" / "bench" / "models" / "resnet56_cifar10.onnx"
MINILM = ROOT / ".cache" / "minilm" / "all-MiniLM-L6-v2.onnx"
OUT = ROOT / ".cache" / "weight_storage"
FIXED = "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num={}\nmin_quant_weight_channel=0\n"
ALL = "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num={}\nmin_quant_weight_size=0\nmin_quant_weight_channel=0\n"
MIXED = ALL.format(0) + "[mixed_bit_weight_quant_param]\ninit_scale=0.02\n"
# row -> (model, config): the configs of docs/results.md (bench/weight_quant.py, bench/mixed_bit.py, bench/minilm.py)
ROWS = {
    "resnet56_8": (RESNET56, FIXED.format(8)), "resnet56_4": (RESNET56, FIXED.format(4)),
    "resnet56_3": (RESNET56, FIXED.format(3)), "resnet56_2": (RESNET56, FIXED.format(2)),
    "resnet56_mixed_0.02": (RESNET56, MIXED),
    "minilm_8": (MINILM, ALL.format(8)), "minilm_4": (MINILM, ALL.format(4)),
}
RUN = """import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
s.run(None, {i.name: (np.ones((1, 128), np.int64) if "int64" in i.type else np.zeros((1, 3, 32, 32), np.float32))
             for i in s.get_inputs()})"""


def feeds(model: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if model == MINILM:
        ids = rng.integers(1000, 30000, size=(1, 128)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {"input": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}


def openvino_cosine(path: Path, model: Path) -> float:
    import onnxruntime as ort
    import openvino

    inputs = feeds(model)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    core = openvino.Core()
    got = np.asarray(core.compile_model(core.read_model(path), "CPU")(inputs)[0])
    a, b = expected.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--openvino", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    float_peak: dict[Path, float] = {}
    print("| row | file bytes | peak RSS MB | vs float |" + (" OpenVINO vs ONNX Runtime cosine |" if args.openvino else ""))
    print("|---|---|---|---|" + ("---|" if args.openvino else ""))
    for row in args.rows:
        model, text = ROWS[row]
        if not model.is_file():
            print(f"| {row} | missing {model} | | |")
            continue
        if model not in float_peak:
            float_peak[model] = run_child([sys.executable, "-c", RUN, str(model)]).peak_mb
        path = OUT / f"{row}.onnx"
        save_model(convert(onnx.load(model), parse_config(text, row)).model, path)
        peak = run_child([sys.executable, "-c", RUN, str(path)]).peak_mb
        line = f"| {row} | {path.stat().st_size:,} | {peak:.1f} | {peak / float_peak[model]:.3f} |"
        if args.openvino:
            try:
                line += f" {openvino_cosine(path, model):.6f} |"
            except RuntimeError as exc:  # OpenVINO rejects the model
                line += f" fails: {str(exc).strip().splitlines()[-1][:80]} |"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

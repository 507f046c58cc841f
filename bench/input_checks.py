"""What the input rules cost: validate_model against a whole WEIGHT_QUANT 8-bit conversion, on the bench models.

    PYTHONPATH=$PWD/src .venv/bin/python bench/input_checks.py [--rounds 5]

Both are timed in alternation, `--rounds` times each, and the medians are printed (the CLI runs the checks once
per conversion; analyze once per analysis).
"""

from __future__ import annotations

import argparse
import lzma
import statistics
import sys
import time
from pathlib import Path

import onnx

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.validate import validate_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench" / "models"
CONFIG = "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n"


def load(name: str) -> onnx.ModelProto | None:
    path = SHARED / name
    if not path.exists():
        return None
    if path.suffix == ".xz":
        with lzma.open(path) as handle:
            return onnx.load_from_string(handle.read())
    return onnx.load(str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = parse_config(CONFIG)
    print("| model | MB | input checks s | WEIGHT_QUANT 8 bit s (without the checks) | checks / conversion |")
    print("|---|---|---|---|---|")
    for name in ("resnet20_cifar10.onnx", "resnet56_cifar10.onnx", "mobilenet_v2_1.0_224_from_qat_tflite.onnx.xz"):
        model = load(name)
        if model is None:
            print(f"| {name} | missing from ../shared/bench | | | |")
            continue
        checks, conversions = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            validate_model(model, name)
            checks.append(time.perf_counter() - started)
            started = time.perf_counter()
            convert(model, config, validate=False, progress=False)
            conversions.append(time.perf_counter() - started)
        check, conversion = statistics.median(checks), statistics.median(conversions)
        print(f"| {name.split('.onnx')[0]} | {model.ByteSize() / 1e6:.1f} | {check:.3f} | {conversion:.3f} | "
              f"{check / conversion:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The verification gate's output cosines on ResNet20 with every bundled and bench config: the figures behind the
default floors of verify.FLOORS (docs/spec.md, "Verification").

    PYTHONPATH=src .venv/bin/python bench/verify_cosines.py [--model mobilenet_v2 --calibrate 16]

Each config runs through convert() with the bundled calibration images (examples/calib, the first
verify.VERIFY_SAMPLES of them compared) and, when it has no data section of its own, also without them (the gate's
synthetic inputs). Prints one row per config and input source: min and mean output cosine, and the time the gate takes.
`--model` picks another model of bench/full_quant.py (../shared/bench) with its calibration images.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import onnx

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.verify import FLOORS, default_floor, mode_label, verification_inputs, verify

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT / "bench"))
from datasets import cifar_data_section


def configs() -> list[tuple[str, str]]:
    paths = sorted((EXAMPLES / "configs").glob("*.cfg")) + sorted((ROOT / "bench" / "configs").glob("*.cfg"))
    return [(str(path.relative_to(ROOT)), path.read_text()) for path in paths]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", help="resnet20 (bundled) or a model of bench/full_quant.py")
    parser.add_argument("--calibrate", type=int, default=100, help="calibration images (default 100)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the bundled full_quant.cfg's calibrate_path is relative to the repository root
    logging.disable(logging.WARNING)  # a config with its own data section: the appended one is dropped, warned
    if args.model == "resnet20":
        model = onnx.load(str(EXAMPLES / "models" / "resnet20_cifar10.onnx"))
        data = cifar_data_section(args.calibrate)
        chosen = configs()
    else:
        import full_quant

        bench = full_quant.BENCHES[args.model]
        path = bench.model_path()
        model = onnx.load(str(path))
        data = "\n".join(["", "[data_preprocess_param]",
                          f"calibrate_path={full_quant.input_name(path)}:{bench.calibration_dir()}",
                          f"calibrate_size={args.calibrate}", *bench.config_lines(), ""])
        chosen = [c for c in configs() if c[0].startswith("bench/")]
    print(f"{'config':52} {'mode':24} {'inputs':22} {'min cos':>9} {'mean cos':>9} {'floor':>6} {'gate s':>7}")
    for name, body in chosen:
        variants = [("calibration", body + data)]
        if "[data_preprocess_param]" not in body:
            variants.append(("synthetic", body))
        for _, text in variants:
            config = parse_config(text, name)
            result = convert(model, config, verify=False, progress=False)
            started = time.perf_counter()  # the gate's own work, as convert() runs it
            inputs, source = verification_inputs(model, config)
            verification = verify(model, result.model, inputs, source, default_floor(config))
            gate = time.perf_counter() - started
            check = verification.outputs[0]
            print(f"{name:52} {mode_label(config):24} {source:22} {check.min:9.6f} "
                  f"{check.mean:9.6f} {FLOORS[mode_label(config)]:6.2f} {gate:7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

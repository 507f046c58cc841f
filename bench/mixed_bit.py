"""Mixed-bit weight quantization on ResNet56 (CIFAR-10 copy): file size and top-1 per init_scale, auto_tune.

Run: .venv/bin/python bench/mixed_bit.py [--limit N]
Needs ../shared/bench. Every weight is a candidate (min_quant_weight_size=0, min_quant_weight_channel=0);
auto_tune compares outputs on the 100 bundled calibration PNGs (examples/calib/input, CIFAR test images),
preprocessed by [data_preprocess_param] as the model expects. Prints a markdown table for docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from datasets import SHARED, cifar, cifar_data_section, top1

from ptqlite.autotune import OutputComparer
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.data import calibration_set
from ptqlite.model import save_model

MODEL = SHARED / "models" / "resnet56_cifar10.onnx"
OUT = ROOT / ".cache" / "bench_mixed_bit"
COMMON = """[common_quant_param]
quant_type=WEIGHT_QUANT
bit_num=0
min_quant_weight_size=0
min_quant_weight_channel=0
"""
DATA = cifar_data_section()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N CIFAR images only")
    args = parser.parse_args()
    x, y = cifar(args.limit)
    model = onnx.load(str(MODEL))
    float_size = MODEL.stat().st_size
    float_top1 = top1(str(MODEL), x, y)
    calib_config = parse_config(COMMON + DATA)
    compare = OutputComparer(model, list(calibration_set(calib_config, model, "NCHW")))
    rows = [(f"| float32 | - | {float_size / 1e6:.3f} MB | 1.000x | 32.00 | {float_top1:.2f} | - | 1.00000 "
            "| - |")]
    runs = [(f"init_scale={t}", f"[mixed_bit_weight_quant_param]\ninit_scale={t}\n")
            for t in (0.01, 0.02, 0.05)]
    runs.append(("auto_tune=true", "[mixed_bit_weight_quant_param]\nauto_tune=true\n" + DATA))
    OUT.mkdir(parents=True, exist_ok=True)
    for label, section in runs:
        config = parse_config(COMMON + section)
        started = time.perf_counter()
        result = convert(model, config, input_format="NCHW")
        seconds = time.perf_counter() - started
        path = save_model(result.model, OUT / f"{label.replace('=', '_')}.onnx")
        size = path.stat().st_size
        quantized = result.quantized
        bits = 8 * sum(q.bytes_after for q in quantized) / sum(q.bytes_before // 4 for q in quantized)
        worst = max(q.relative_error for q in quantized)
        accuracy = top1(str(path), x, y)
        tuned = next((n.split("init_scale=")[1].split()[0] for n in result.notes
                      if "auto_tune: init_scale" in n), "-")
        rows.append(f"| {label} | {tuned} | {size / 1e6:.3f} MB | {size / float_size:.3f}x | {bits:.2f} | "
                    f"{accuracy:.2f} | {accuracy - float_top1:+.2f} | {compare(result.model):.5f} | "
                    f"{worst:.4f} |")
        print(f"{label}: {seconds:.1f} s; " + "; ".join(result.notes), file=sys.stderr)
    print(f"ResNet56, {len(x)} CIFAR-10 test images\n")
    print("| config | tuned init_scale | file | x float | bits/weight (quantized data) | top-1 | vs float | "
          "output cosine (100 calib images) | worst layer rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

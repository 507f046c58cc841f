"""Default-strategy WEIGHT_QUANT latency against float, with a float-vs-float control row for the noise.

    .venv/bin/python bench/weight_quant_latency.py [--rounds 60] [--runs 10]

Converts ResNet56 at 8 and 4 bits (per-channel, every conv quantized) with the CLI, then times float, both variants
and the float model again, interleaved round by round in one process, batch 1, at 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import SHARED, cifar
from measure import latency_ratios
from weight_quant import convert


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    source = SHARED / "models" / "resnet56_cifar10.onnx"
    feed = cifar(1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = {"float": source}
        for bits in (8, 4):
            paths[f"{bits} bit"] = work / f"{bits}.onnx"
            convert(source, f"bit_num={bits}", paths[f"{bits} bit"], work)
        paths["float again (noise control)"] = source
        print("| threads | " + " | ".join(paths) + " |")
        print("|---" * (len(paths) + 1) + "|")
        for threads in (1, 2):
            ratios = latency_ratios(paths, "float", feed, threads=threads, rounds=args.rounds, runs=args.runs)
            print(f"| {threads} | " + " | ".join(f"{ratios[name]:.3f}" for name in paths) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What MiniLM FULL_QUANT through the command line costs (CPU time, peak RSS), for several source trees and
quantize_static MinMax taking turns.

    .venv/bin/python bench/minilm_cost.py --cache .cache/minilm --src src /path/to/other/src [--repeat 3]
                                          [--calibrate 20] [--no-ort]

Each conversion is its own child process: ptqlite's CLI exactly as bench/full_quant_minilm.py runs it (BIN files,
`--inputShape`, MAX_MIN per-channel with bias correction), with PYTHONPATH set to one --src folder, and
quantize_static as that script's `--ort-child` (pre-processed, QDQ, per-channel, MinMax, the same sentences). The
runs take turns (A B ort A B ort ...) so that the load other programs put on the machine hits them alike; CPU time
is user + system of the child. Prints every run, then the median of each row, and the sha256 of each tree's
outputs (a change that promises the same bytes shows one sha per tree).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_quant_minilm
import measure

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "minilm",
                        help="bench/minilm.py's cache: all-MiniLM-L6-v2.onnx and sst2_train_tokens.npz")
    parser.add_argument("--src", nargs="+", default=[str(ROOT / "src")],
                        help="ptqlite source folders; PATH,NAME=VALUE,... also sets those variables for its runs")
    parser.add_argument("--calibrate", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-ort", action="store_true", help="leave quantize_static out of the turns")
    args = parser.parse_args(argv)
    model = full_quant_minilm.float_model(args.cache)
    if model is None:
        return 2
    work = ROOT / ".cache" / "bench" / "minilm_cost"
    work.mkdir(parents=True, exist_ok=True)
    config = full_quant_minilm.write_calibration(args.cache, work, args.calibrate)
    runs: dict[str, list[measure.ChildRun]] = {}
    shas: dict[str, set[str]] = {}
    load = [os.getloadavg()[0]]
    labels = list(args.src) + ([] if args.no_ort else ["quantize_static MinMax per-channel"])
    for round_ in range(args.repeat):
        for label in labels:
            out = work / f"out{labels.index(label)}"
            if label.startswith("quantize_static"):
                command = [sys.executable, str(ROOT / "bench" / "full_quant_minilm.py"), "--cache", str(args.cache),
                           "--calibrate", str(args.calibrate), "--ort-child", str(out) + ".onnx"]
                env = dict(os.environ)
            else:
                command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
                           f"--outputFile={out}", f"--configFile={config}",
                           f"--inputShape={full_quant_minilm.SHAPES}", "--quiet"]
                src, *variables = label.split(",")
                env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()),
                           **dict(item.split("=", 1) for item in variables))
            done = measure.run_child(command, env=env, cwd=ROOT)
            if done.returncode not in (0, 1) or not Path(f"{out}.onnx").exists():  # 1: a collapse warning only
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            sha = hashlib.sha256(Path(f"{out}.onnx").read_bytes()).hexdigest()
            shas.setdefault(label, set()).add(sha)
            runs.setdefault(label, []).append(done)
            load.append(os.getloadavg()[0])
            print(f"round {round_ + 1} {label}: CPU {done.cpu_seconds:.2f} s, peak {done.peak_mb:.0f} MB, "
                  f"wall {done.seconds:.1f} s, sha {sha[:16]}, load {load[-1]:.1f}", flush=True)
    print(f"\n`python bench/minilm_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`; load average "
          f"{min(load):.1f}-{max(load):.1f} (1 min)\n")
    print("| conversion | CPU s, each run | CPU s median | peak MB median | output sha256 |")
    print("|---|---|---:|---:|---|")
    for label in labels:
        cpu = [r.cpu_seconds for r in runs[label]]
        peak = [r.peak_mb for r in runs[label]]
        sha = ", ".join(s[:16] + "..." for s in sorted(shas[label])) if not label.startswith("quantize") else "-"
        print(f"| {label} | {' / '.join(f'{c:.1f}' for c in cpu)} | {np.median(cpu):.2f} | {np.median(peak):.0f} "
              f"| {sha} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one FULL_QUANT conversion costs (wall time, CPU time, peak RSS), for several source trees taking turns.

    .venv/bin/python bench/convert_cost.py --model mobilenet_v2 efficientnet_lite0 --src src /path/to/other/src
                                           [--config full_max_min_per_channel.cfg] [--calibrate 100] [--repeat 2]
                                           [--ort MinMax]

Each conversion is the ptqlite CLI in its own child process (as bench/full_quant.py runs it), with PYTHONPATH set to
one --src folder, so a change is measured against the code before it on the same model, images and config; the
trees take turns run by run (A B A B ...) so that the machine's load hits them alike. With --ort, onnxruntime's
quantize_static with that calibration method (bench/full_quant.py's child: pre-processed, QDQ, per-channel, u8/s8)
takes its turn after the trees in every round, and each tree's medians are also given as ratios to its medians.
Prints the median of each column per tree and model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_quant
import measure

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(full_quant.BENCHES), default=["mobilenet_v2"])
    parser.add_argument("--src", nargs="+", type=Path, default=[ROOT / "src"], help="ptqlite source folders")
    parser.add_argument("--config", default="full_max_min_per_channel.cfg", help="a config of bench/configs")
    parser.add_argument("--calibrate", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--ort", help="also run quantize_static with this CalibrationMethod (e.g. MinMax)")
    args = parser.parse_args(argv)
    work = ROOT / ".cache" / "bench" / "convert_cost"
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"`python bench/convert_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`; load average "
             + " ".join(f"{v:.1f}" for v in os.getloadavg()), "",
             "| model | source | wall s | CPU s | peak MB | CPU / quantize_static | peak / quantize_static |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in args.model:
        bench = full_quant.BENCHES[name]
        why = bench.missing()
        if why:
            lines.append(f"| {name} | skipped ({why}) | - | - | - |")
            continue
        model = bench.model_path()
        row = full_quant.Row("cost", "cost", "ptqlite", args.config)
        config = full_quant.write_config(bench, row, work, model, args.calibrate)
        runs: dict[Path | str, list[measure.ChildRun]] = {src: [] for src in args.src}
        ort_row = f"quantize_static {args.ort}" if args.ort else None
        if ort_row:
            runs[ort_row] = []
        for _ in range(args.repeat):
            for src in args.src:
                out = work / "out"
                command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
                           f"--outputFile={out}", f"--configFile={config}", "--quiet"]
                done = measure.run_child(command, env=dict(os.environ, PYTHONPATH=str(src.resolve())), cwd=ROOT)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return 1
                runs[src].append(done)
            if ort_row:
                command = [sys.executable, str(ROOT / "bench" / "full_quant.py"), "--ort-child", args.ort, "--model",
                           name, "--calibrate", str(args.calibrate), "--ort-output", str(work / "ort.onnx")]
                done = measure.run_child(command, cwd=ROOT)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return 1
                runs[ort_row].append(done)
        medians = {src: [float(np.median([getattr(d, key) for d in done])) for key in ("seconds", "cpu_seconds",
                                                                                        "peak_mb")]
                   for src, done in runs.items()}
        for src, (wall, cpu, peak) in medians.items():
            ratios = "| - | -" if not ort_row or src == ort_row else \
                f"| {cpu / medians[ort_row][1]:.2f} | {peak / medians[ort_row][2]:.2f}"
            lines.append(f"| {name} | {src} | {wall:.1f} | {cpu:.1f} | {peak:.0f} {ratios} |")
    lines.append("")
    lines.append("load average at the end " + " ".join(f"{v:.1f}" for v in os.getloadavg()))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Conversion cost of ON_THE_FLY 4 bit block 32 against onnxruntime's MatMulNBitsQuantizer on the same model, the
conversions taking turns: CPU time (user + sys of the converting child), wall time and peak RSS, from
`/usr/bin/time -f "%M KB %e s %U user %S sys"`. On a machine others are loading, CPU time is the figure to compare:
the wall time depends on what else runs.

Each ptqlite source tree (`--src`, repeatable: e.g. a `git archive main src` of the baseline and this checkout's
src) is run with `--verify=off` and with the verification gate (the default); the peer is bench/llm_int4.py's
MatMulNBitsQuantizer call (int4, block 32, asymmetric, onnx.load of the whole model, onnx.save of the result).

    PYTHONPATH=src python bench/convert_cpu.py --model M.onnx --config v0.cfg --work DIR --src OLD/src --src src
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_int4 import ORT_QUANTIZE

TIME = ["/usr/bin/time", "-f", "%M KB %e s %U user %S sys"]
FIGURES = re.compile(r"(\d+) KB ([\d.]+) s ([\d.]+) user ([\d.]+) sys")


def timed(command: list[str], env: dict[str, str]) -> dict:
    run = subprocess.run(TIME + command, check=False, env=env, capture_output=True, text=True)
    found = FIGURES.findall(run.stderr)
    if run.returncode or not found:
        raise SystemExit(f"{' '.join(command)} failed: {run.stderr[-2000:]}")
    peak, wall, user, system = found[-1]
    return {"peak_mb": int(peak) / 1024, "wall_s": float(wall), "user_s": float(user), "sys_s": float(system),
            "cpu_s": float(user) + float(system)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--src", type=Path, action="append", required=True, help="a ptqlite src directory")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--no-gate", action="store_true", help="only --verify=off")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}

    def record(name: str, figures: dict) -> None:
        runs.setdefault(name, []).append(figures)
        load = os.getloadavg()[0]
        print(f"{name}: {figures['cpu_s']:.1f} CPU s ({figures['user_s']:.1f} user {figures['sys_s']:.1f} sys), "
              f"{figures['wall_s']:.1f} s wall, peak {figures['peak_mb']:.0f} MB, load {load:.1f}", flush=True)

    for turn in range(args.turns):
        for i, src in enumerate(args.src):
            env = {**os.environ, "PYTHONPATH": str(src.resolve())}
            for gate in ([False] if args.no_gate else [False, True]):
                out = args.work / f"ptq{i}{'g' if gate else ''}.onnx"
                command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={args.model}",
                           f"--configFile={args.config}", f"--outputFile={out}", "--quiet"]
                record(f"ptqlite {src} {'gate' if gate else '--verify=off'}",
                       timed(command + ([] if gate else ["--verify=off"]), env))
        record("MatMulNBitsQuantizer", timed([sys.executable, "-c", ORT_QUANTIZE, str(args.model),
                                              str(args.work / "peer.onnx"), "32", "none"], dict(os.environ)))
    peer = sum(r["cpu_s"] for r in runs["MatMulNBitsQuantizer"]) / args.turns
    print("\n| conversion | CPU s (user + sys), mean | x peer's CPU | wall s, mean | peak MB |")
    print("|---|---|---|---|---|")
    for name, figures in runs.items():
        cpu = sum(r["cpu_s"] for r in figures) / len(figures)
        wall = sum(r["wall_s"] for r in figures) / len(figures)
        peak = max(r["peak_mb"] for r in figures)
        print(f"| {name} | {cpu:.1f} | {cpu / peer:.2f} | {wall:.1f} | {peak:.0f} |")
    (args.work / "convert_cpu.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()

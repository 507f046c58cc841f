"""FULL_QUANT on all-MiniLM-L6-v2 through the command line, side by side with quantize_static: latency, accuracy
and what each conversion costs.

    .venv/bin/python bench/full_quant_minilm.py [--cache .cache/minilm] [--calibrate 20] [--evaluate 200]
                                                [--rounds 20] [--out table.md]

The float model and the tokenized SST-2 sentences come from bench/minilm.py's cache (it builds them). Both
quantizers calibrate on the first --calibrate training sentences at sequence length 128:
- ptqlite: its CLI, as docs/results.md "Through the command line, static shapes" describes: one BIN file per
  sentence and input (numpy `tofile`, int64 [1, 128]), `--inputShape` fixing the shapes, FULL_QUANT MAX_MIN
  per-channel with bias correction;
- quantize_static: as bench/full_quant.py runs it (quant_pre_process, then QDQ, per-channel, uint8 activations,
  int8 weights, MinMax), fed the same token arrays.
Each quantizer runs in its own child process: wall time, CPU time (user + system) and peak RSS are its own.
Accuracy: cosine of the mean-pooled, L2-normalised sentence embeddings to float's on --evaluate sentences after
the 1500 the DYNAMIC_QUANT probe trains on (batch 1, sequence 128, padding masked out of the pooling). Latency:
median per-round time / float's, batch 1, sequence 128, 1 thread, interleaved in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("input_ids", "attention_mask", "token_type_ids")
SEQUENCE = 128
EVAL_START = 1500
SHAPES = ";".join(f"{n}:1,{SEQUENCE}" for n in NAMES)


def tokens(cache: Path) -> dict[str, np.ndarray]:
    data = np.load(cache / "sst2_train_tokens.npz")
    return {n: data[n].astype(np.int64) for n in NAMES}


def float_model(cache: Path) -> Path | None:
    """The float MiniLM in bench/minilm.py's cache, or None (after saying how to build it) where it is missing."""
    model = cache / "all-MiniLM-L6-v2.onnx"
    if not model.exists():
        print(f"{model} not found: build it with bench/minilm.py (or name its cache with --cache)", file=sys.stderr)
        return None
    return model


def write_calibration(cache: Path, work: Path, count: int) -> Path:
    """One BIN file per sentence and input under work/calib/<input>/NNN.bin; the ptqlite config that reads them."""
    data = tokens(cache)
    for name in NAMES:
        directory = work / "calib" / name
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.bin"):
            old.unlink()
        for i in range(count):
            data[name][i:i + 1, :SEQUENCE].tofile(directory / f"{i:03d}.bin")
    config = work / "fq.cfg"
    config.write_text("\n".join([
        "[common_quant_param]", "quant_type=FULL_QUANT", "bit_num=8", "",
        "[data_preprocess_param]",
        "calibrate_path=" + ",".join(f"{n}:{work / 'calib' / n}" for n in NAMES),
        f"calibrate_size={count}", "input_type=BIN", "",
        "[full_quant_param]", "activation_quant_method=MAX_MIN", "per_channel=true", "bias_correction=true", "",
    ]))
    return config


def ort_child(cache: Path, count: int, output: Path) -> int:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = tokens(cache)
    samples = [{n: data[n][i:i + 1, :SEQUENCE] for n in NAMES} for i in range(count)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.pending, None)

    prepared = output.with_suffix(".pre.onnx")
    quant_pre_process(str(cache / "all-MiniLM-L6-v2.onnx"), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()
    return 0


def embeddings(path: Path, data: dict[str, np.ndarray], rows: range) -> np.ndarray:
    session = measure.session(path, 2)
    out = []
    for i in rows:
        feed = {n: data[n][i:i + 1, :SEQUENCE] for n in NAMES}
        hidden = session.run(None, feed)[0].astype(np.float64)
        mask = feed["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append(pooled[0] / np.linalg.norm(pooled[0]))
    return np.stack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "minilm",
                        help="bench/minilm.py's cache: all-MiniLM-L6-v2.onnx and sst2_train_tokens.npz")
    parser.add_argument("--calibrate", type=int, default=20)
    parser.add_argument("--evaluate", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (each times 5 runs per model)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ort-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ort_child:
        return ort_child(args.cache, args.calibrate, args.ort_child)
    model = float_model(args.cache)
    if model is None:
        return 2
    work = ROOT / ".cache" / "bench" / "minilm_full"
    work.mkdir(parents=True, exist_ok=True)
    config = write_calibration(args.cache, work, args.calibrate)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                     os.environ.get("PYTHONPATH")])))
    runs = {
        "ptqlite FULL_QUANT MAX_MIN per-channel (CLI, --inputShape)": (
            work / "ptqlite.onnx",
            [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
             f"--outputFile={work / 'ptqlite'}", f"--configFile={config}", f"--inputShape={SHAPES}", "--quiet"]),
        "quantize_static MinMax per-channel": (
            work / "ort.onnx",
            [sys.executable, __file__, "--cache", str(args.cache), "--calibrate", str(args.calibrate),
             "--ort-child", str(work / "ort.onnx")]),
    }
    paths, costs = {"float": model}, {}
    for label, (out, command) in runs.items():
        out.unlink(missing_ok=True)
        print(f"{label} ...", file=sys.stderr, flush=True)
        done = measure.run_child(command, env=env, cwd=ROOT)
        if done.returncode != 0 or not out.exists():
            print(f"{label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        paths[label], costs[label] = out, done
    data = tokens(args.cache)
    rows = range(EVAL_START, EVAL_START + args.evaluate)
    reference = embeddings(model, data, rows)
    feed = {n: data[n][:1, :SEQUENCE] for n in NAMES}
    ratios = measure.latency_ratios(paths, "float", feed, threads=1, rounds=args.rounds, runs=5)
    lines = [f"MiniLM: calibration on {args.calibrate} sentences, cosine on {args.evaluate}; latency = median time / "
             f"float's, batch 1, sequence {SEQUENCE}, 1 thread, interleaved, {args.rounds} rounds; load average "
             + " ".join(f"{v:.1f}" for v in os.getloadavg()), "",
             "| method | cosine mean / min | size MB | latency 1T | quantize s | CPU s | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, path in paths.items():
        if label == "float":
            lines.append(f"| float | 1.0000 / 1.0000 | {measure.file_mb(path):.1f} | 1.000 | - | - | - |")
            continue
        cos = np.sum(embeddings(path, data, rows) * reference, axis=1)
        cost = costs[label]
        lines.append(f"| {label} | {cos.mean():.4f} / {cos.min():.4f} | {measure.file_mb(path):.1f} "
                     f"| {ratios[label]:.3f} | {cost.seconds:.1f} | {cost.cpu_seconds:.1f} | {cost.peak_mb:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

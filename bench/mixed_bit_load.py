"""Mixed-bit output: load peak in ONNX Runtime and conversion peak, two source trees side by side, in turns.

    PYTHONPATH=src .venv/bin/python bench/mixed_bit_load.py --before <src dir> [--rounds 2] [--folded]

<src dir> is another tree's `src` (e.g. `git archive <commit> src | tar -x -C /tmp/base`, then /tmp/base/src).
Each round converts the model with each tree through the CLI (`ptqlite convert`, its own process: peak RSS and
CPU time of the whole conversion, gate included), then loads each output in a fresh process with ONNX Runtime's
default session (constant folding on) and runs it once: the load peak, what every user of the file pays. The
outputs of both trees on the same input are compared (bit-identical where every layer decodes to the same
weights). --imagenet adds each output's top-1 on the 400 evaluation images (bench/imagenet.py, for the ImageNet
bench models: pass --model, e.g. .cache/models/mobilenet_v2_1.0_224_from_qat_tflite.onnx). --folded adds, per op
type and dtype, the bytes of every value the decoders compute from constants (what ONNX Runtime materialises
while it folds them): each such node output made a graph output of an unoptimized session.
Prints markdown tables for docs/results.md; default model MiniLM (.cache/minilm), default config
bench/configs/weight_mixed_0.02.cfg.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from measure import run_child

MODEL = ROOT / ".cache" / "minilm" / "all-MiniLM-L6-v2.onnx"
CONFIG = ROOT / "bench" / "configs" / "weight_mixed_0.02.cfg"
LOAD = """import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feed = {i.name: np.ones([d if isinstance(d, int) else 8 for d in i.shape],
                        np.int64 if "int" in i.type else np.float32) for i in s.get_inputs()}
np.save(sys.argv[2], s.run(None, feed)[0])"""


def folded_bytes(path: Path) -> collections.Counter:
    """Bytes of every node output computable from initializers alone, by (op type, dtype)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    graph = model.graph
    known = {t.name for t in graph.initializer}
    produced = {}
    for node in graph.node:
        if node.input and all(name in known or not name for name in node.input):
            for out in node.output:
                known.add(out)
                produced[out] = node.op_type
    del graph.output[:]
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in produced)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape],
                            np.int64 if "int" in i.type else np.float32) for i in session.get_inputs()}
    totals: collections.Counter = collections.Counter()
    names = list(produced)
    for start in range(0, len(names), 100):
        part = names[start:start + 100]
        for name, value in zip(part, session.run(part, feed)):
            totals[(produced[name], str(np.asarray(value).dtype))] += np.asarray(value).nbytes
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the `src` directory of the tree to compare against")
    parser.add_argument("--after", default=str(ROOT / "src"), help="the `src` directory of this tree (default)")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folded", action="store_true", help="also list the folded bytes per op and dtype")
    parser.add_argument("--imagenet", action="store_true", help="also the top-1 of each output (ImageNet models)")
    args = parser.parse_args()
    model_bytes = Path(args.model).stat().st_size
    trees = {"before": args.before, "after": args.after}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for round_ in range(1, args.rounds + 1):
            for label, src in trees.items():
                env = {**os.environ, "PYTHONPATH": src}
                target = Path(tmp) / label
                convert = run_child([sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={args.model}",
                                     f"--outputFile={target}", f"--configFile={args.config}", "--quiet"], env=env)
                if convert.returncode:
                    raise SystemExit(f"{label}: conversion failed\n{convert.stderr}")
                path = target.with_suffix(".onnx")
                load = run_child([sys.executable, "-c", LOAD, str(path), str(Path(tmp) / f"{label}.npy")])
                if load.returncode:
                    raise SystemExit(f"{label}: load failed\n{load.stderr}")
                out[label] = np.load(Path(tmp) / f"{label}.npy")
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
                rows.append((round_, label, path.stat().st_size, load.peak_mb, convert.peak_mb, convert.cpu_seconds,
                             digest))
            difference = float(np.max(np.abs(out["before"].astype(np.float64) - out["after"])))
            print(f"round {round_}: outputs bit-identical: {np.array_equal(out['before'], out['after'])} "
                  f"(largest difference {difference:.3g})", file=sys.stderr)
        load_avg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"model {Path(args.model).name} ({model_bytes / 1e6:.1f} MB), config {Path(args.config).name}, "
              f"load average after the runs {load_avg}\n")
        print("| round | tree | file bytes | load peak | load / model file | conversion peak | conversion / model "
              "file | conversion CPU s | output sha256 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for round_, label, size, load_mb, conv_mb, cpu, digest in rows:
            print(f"| {round_} | {label} | {size:,} | {load_mb:.0f} MB | {load_mb * 1e6 / model_bytes:.2f}x | "
                  f"{conv_mb:.0f} MB | {conv_mb * 1e6 / model_bytes:.2f}x | {cpu:.1f} | {digest}... |")
        if args.imagenet:
            import datasets
            import imagenet

            x, y = imagenet.evaluation()
            for label in trees:
                top1 = datasets.top1(str(Path(tmp) / f"{label}.onnx"), x, y, label_offset=imagenet.LABEL_OFFSET)
                print(f"\n{label}: top-1 {top1:.2f}% on {len(y)} images")
        if args.folded:
            for label in trees:
                totals = folded_bytes(Path(tmp) / f"{label}.onnx")
                print(f"\n{label}: folded values {sum(totals.values()) / 1e6:.1f} MB; largest by op and dtype:")
                print(", ".join(f"{op} {dtype} {size / 1e6:.1f}" for (op, dtype), size in totals.most_common(14)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

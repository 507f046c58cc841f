"""WEIGHT_QUANT fixed bit: file size, top-1, latency and memory against the float model.

    .venv/bin/python bench/weight_quant.py [--model resnet56|resnet20|mlp] [--rounds N]

Each row converts the model with the CLI (a child process), then measures: file size vs float, top-1 on the 2000
CIFAR images (ResNets), latency relative to float at 1 thread (interleaved in this process), and the peak resident
memory of a child process that loads the model and runs it once (float and each variant in separate children).
`mlp` is a synthetic 8-layer 2048-wide MatMul stack (seeded) where weights dominate memory, to show ON_THE_FLY.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import SHARED, cifar, top1
from measure import file_mb, latency_ratios, run_child

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "8 bit": "bit_num=8",
    "8 bit, enable_encode=false": "bit_num=8\nenable_encode=false",
    "4 bit": "bit_num=4",
    "3 bit": "bit_num=3",
    "2 bit": "bit_num=2",
    "8 bit ON_THE_FLY": "bit_num=8\n[weight_quant_param]\ndequant_strategy=ON_THE_FLY",
}
PEAK_RSS = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
s.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)})
"""


def mlp(path: Path, layers: int = 8, width: int = 2048) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for k in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                             f"w{k}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{k}"], [f"h{k}"], name=f"fc{k}"))
        prev = f"h{k}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def convert(model: Path, body: str, out: Path, work: Path) -> None:
    config = work / "q.cfg"
    config.write_text("[common_quant_param]\nquant_type=WEIGHT_QUANT\nmin_quant_weight_channel=0\n" + body + "\n")
    done = run_child([sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
                      f"--outputFile={out}", f"--configFile={config}", "--quiet"])
    if done.returncode:
        raise SystemExit(done.stderr)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet56", choices=["resnet56", "resnet20", "mlp"])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model == "mlp":
            source = work / "mlp.onnx"
            mlp(source)
            feed, data = np.zeros((1, 2048), np.float32), None
        else:
            source = SHARED / "models" / f"{args.model}_cifar10.onnx"
            data = cifar()
            feed = data[0][:1]
        paths = {"float": source}
        for name, body in VARIANTS.items():
            paths[name] = work / f"{len(paths)}.onnx"
            convert(source, body, paths[name], work)
        ratios = latency_ratios(paths, "float", feed, threads=1, rounds=args.rounds)
        print(f"| {args.model} | size MB | x float | top-1 | latency vs float (1 thread) | peak RSS MB | RSS vs float |")
        print("|---|---|---|---|---|---|---|")
        float_rss = None
        for name, path in paths.items():
            rss = run_child([sys.executable, "-c", PEAK_RSS, str(path)]).peak_mb
            float_rss = float_rss or rss
            accuracy = f"{top1(str(path), *data):.2f}" if data else "-"
            print(f"| {name} | {file_mb(path):.3f} | {file_mb(path) / file_mb(source):.3f} | {accuracy} | "
                  f"{ratios[name]:.3f} | {rss:.1f} | {rss / float_rss:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

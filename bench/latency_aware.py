"""Latency-aware planning on small conv chains: FULL_QUANT with latency_aware on and off, timed against float.

    .venv/bin/python bench/latency_aware.py [--sizes 12 24 48 96] [--runs 300]

The chain is 3 convs (10, 16, 32 channels) with PRelu between them (PRelu stays float on the CPU preset, so each
conv gets its own QDQ pair: the case where int8 loses to float). Prints int8/float median latency per input size
(1 thread, interleaved) for latency_aware=false and true, and what the planning kept float.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

from ptqlite.config import parse_config
from ptqlite.convert import convert

CONFIG = ("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n[data_preprocess_param]\ncalibrate_path=x:/n\n"
          "calibrate_size=8\ninput_type=BIN\n[full_quant_param]\nlatency_aware={}\n")


def chain(size: int, channels=(10, 16, 32)) -> onnx.ModelProto:
    r = np.random.default_rng(0)
    nodes, inits, prev, cin = [], [], "x", 3
    for i, co in enumerate(channels):
        inits += [nh.from_array((r.normal(size=(co, cin, 3, 3)) * 0.3).astype(np.float32), f"w{i}"),
                  nh.from_array((r.normal(size=(co,)) * 0.1).astype(np.float32), f"b{i}"),
                  nh.from_array(np.full((co, 1, 1), 0.25, np.float32), f"s{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3]),
                  helper.make_node("PRelu", [f"c{i}", f"s{i}"], [f"p{i}"], name=f"prelu{i}")]
        prev, cin = f"p{i}", co
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info(prev, T.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ratio(reference: onnx.ModelProto, model: onnx.ModelProto, feeds: dict, runs: int) -> float:
    a, b = session(reference), session(model)
    ta, tb = [], []
    for _ in range(runs):
        for s, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            s.run(None, feeds)
            times.append(time.perf_counter() - start)
    return float(np.median(tb) / np.median(ta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    print("| input | latency_aware=false: int8 / float | latency_aware=true: int8 / float | kept float |")
    print("|---|---:|---:|---|")
    for size in args.sizes:
        model = chain(size)
        r = np.random.default_rng(1)
        samples = [{"x": r.normal(size=(1, 3, size, size)).astype(np.float32)} for _ in range(8)]
        off = convert(model, parse_config(CONFIG.format("false")), samples=samples, progress=False)
        on = convert(model, parse_config(CONFIG.format("true")), samples=samples, progress=False)
        kept = sorted(t.tensor for t in on.skipped if "latency" in t.reason)
        print(f"| {size}x{size} | {ratio(model, off.model, samples[0], args.runs):.2f} | "
              f"{ratio(model, on.model, samples[0], args.runs):.2f} | {', '.join(kept) or '-'} |")


if __name__ == "__main__":
    main()

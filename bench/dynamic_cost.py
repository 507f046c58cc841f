"""DYNAMIC_QUANT's per-layer cost model against measurement: one MatMul x[1, R, K] @ W[K, N] in float, ALWC and
ACWL (latency_aware=false), timed in one process, 1 intra-op thread, interleaved run by run.

    PYTHONPATH=src .venv/bin/python bench/dynamic_cost.py [--rows 1,32,256,2048] [--k 64,256,512] [--n 8,64,256,1024]
                                                          [--budget 0.3] [--fit] [--save rows.py | --load rows.py]

For each shape it prints the measured time int8 adds to float (us, negative: int8 is faster) beside
latency.int8_net_cost's estimate (the same unit), and whether both agree on the sign. With --fit it also fits, by
least squares over the shapes, the constants the estimate uses (ns per multiply-add saved, ns per element of
run-time quantization), which is how latency.py's constants were chosen.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptqlite import latency
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.runtime import cpu_session

CONFIG = ("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
          "min_quant_weight_channel=0\n[dynamic_quant_param]\nquant_strategy={}\nlatency_aware=false\n")
# Shapes beyond this many multiply-adds take too long to time on a shared machine and decide nothing.
MAX_MACS = 2.2e8


def layer(rows: int, k: int, n: int) -> onnx.ModelProto:
    w = (np.random.default_rng(0).normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, n])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def median_us(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], budget: float) -> list[float]:
    """Median per-run time of each model (us), interleaved run by run for about `budget` seconds."""
    sessions = [cpu_session(m, "to time it", threads=1) for m in models]
    for s in sessions:
        s.run(None, feed)
    start = time.perf_counter()
    for s in sessions:
        s.run(None, feed)
    runs = int(np.clip(budget / max(time.perf_counter() - start, 1e-6), 15, 2000))
    times = [[] for _ in sessions]
    for r in range(runs):
        for i in (range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))):
            t = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append((time.perf_counter() - t) * 1e6)
    return [float(np.median(t)) for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,32,256,2048")
    parser.add_argument("--k", default="64,256,512")
    parser.add_argument("--n", default="8,64,256,1024")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per shape")
    parser.add_argument("--save", type=Path, help="also write the measured rows here (a Python literal)")
    parser.add_argument("--load", type=Path, help="fit the rows --save wrote instead of timing again")
    parser.add_argument("--fit", action="store_true", help="fit the estimate's constants to the measurements")
    args = parser.parse_args(argv)
    rows_, ks, ns = ([int(v) for v in s.split(",")] for s in (args.rows, args.k, args.n))
    shapes = [(r, k, n) for r in rows_ for k in ks for n in ns if r * k * n <= MAX_MACS]
    print(f"{platform.node()}: one MatMul [1, R, K] x [K, N], 1 thread; us per run, int8 minus float")
    print("| R | K | N | float us | ALWC +us | ALWC est | ACWL +us | ACWL est |")
    print("|---|---|---|---|---|---|---|---|")
    rows, agree, total = [], 0, 0
    if args.load:
        import ast

        rows = [tuple(row) for row in ast.literal_eval(args.load.read_text())]
        shapes = []
    for r, k, n, f, alwc, acwl in rows:
        est = [latency.int8_net_cost(s, r, k, n) / 1e3 for s in ("ALWC", "ACWL")]
        for measured, estimate in zip((alwc - f, acwl - f), est, strict=True):
            total += 1
            agree += (measured > 0) == (estimate > 0)
        print(f"| {r} | {k} | {n} | {f:.1f} | {alwc - f:+.1f} | {est[0]:+.1f} | {acwl - f:+.1f} | {est[1]:+.1f} |")
    for r, k, n in shapes:
        model = layer(r, k, n)
        quantized = [convert(layer(r, k, n), parse_config(CONFIG.format(s)), progress=False).model
                     for s in ("ALWC", "ACWL")]
        feed = {"x": np.random.default_rng(1).normal(size=(1, r, k)).astype(np.float32)}
        f, alwc, acwl = median_us([model, *quantized], feed, args.budget)
        est = [latency.int8_net_cost(s, r, k, n) / 1e3 for s in ("ALWC", "ACWL")]
        for measured, estimate in zip((alwc - f, acwl - f), est, strict=True):
            total += 1
            agree += (measured > 0) == (estimate > 0)
        rows.append((r, k, n, f, alwc, acwl))
        if args.save:
            args.save.write_text(repr(rows))
        print(f"| {r} | {k} | {n} | {f:.1f} | {alwc - f:+.1f} | {est[0]:+.1f} | {acwl - f:+.1f} | {est[1]:+.1f} |",
              flush=True)
    print(f"\nsign agreement: {agree} of {total}")
    if args.fit:
        data = np.array(rows, dtype=np.float64)
        r, k, n, f, alwc, acwl = data.T
        # int8 - float = c0 + q * R*K + o * R*N - s * R*K*N  (us): q ns per quantized input element, o per
        # output element, s per MAC saved; weighted by 1 / float time (a relative fit, so that the largest shapes
        # do not decide alone). Both run the same integer kernel: s is fitted on ALWC and kept for ACWL, whose
        # free fit trades s against o (collinear at a fixed K).
        saved = None
        for name, t in (("ALWC", alwc), ("ACWL", acwl)):
            terms = [np.ones_like(r), r * k / 1e3, r * n / 1e3] + ([-r * k * n / 1e3] if saved is None else [])
            target = (t - f) + (0 if saved is None else saved * r * k * n / 1e3)
            fitted, *_ = np.linalg.lstsq(np.stack(terms, axis=1) / f[:, None], target / f, rcond=None)
            c0, q, o = fitted[:3]
            saved = fitted[3] if saved is None else saved
            print(f"{name}: fixed {c0:+.1f} us, {q:.3f} ns per quantized input element, {o:.3f} ns per output "
                  f"element, {saved:.4f} ns per MAC saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""WEIGHT_QUANT 4 bit block 32 on all-MiniLM-L6-v2: the default strategy (codes packed, decoded at load) against
ON_THE_FLY (block-wise DequantizeLinear, fused into MatMulNBits), side by side with float and with the default
strategy per channel (block_size=0).

    PYTHONPATH=src .venv/bin/python bench/minilm_block_default.py [--cache .cache/minilm] [--sentences 500]

Both conversions quantize the same weights (MatMul, and the word, position and token type tables, at 4 bits too:
gather_min_bit_num=0) with the same block search, so their codes and scales are equal. Printed per model: file size, mean and min cosine of the
sentence embeddings to float (as bench/minilm_int4.py measures them; ON_THE_FLY also at accuracy_level=0, float
activations in the fused kernels), the largest absolute difference of the embeddings against ON_THE_FLY at
accuracy_level=0, the peak RSS of a child process that loads the model and runs one batch (median of --repeats,
models interleaved), and the latency ratio to float (1 thread, batch of 8 sentences, interleaved in one process).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import latency_ratios, run_child
from minilm import NAMES, ROOT, build_float
from minilm_int4 import embeddings

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.model import save_model

CONFIG = """[common_quant_param]
quant_type=WEIGHT_QUANT
bit_num=4
min_quant_weight_size=0
min_quant_weight_channel=0
[weight_quant_param]
block_size={block}
gather_min_bit_num=0
{strategy}
"""
LOAD = """import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.log_severity_level = 3; o.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
data = dict(np.load(sys.argv[2]))
s.run(None, {n: data[n][:8, :32] for n in ("input_ids", "attention_mask", "token_type_ids")})"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "minilm"))
    parser.add_argument("--venv", default=str(ROOT / ".cache" / "minilm-venv"))
    parser.add_argument("--work", default=str(ROOT / ".cache" / "minilm-block-default"))
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    float_path, tokens_path = build_float(Path(args.cache), Path(args.venv), max(args.sentences, 2000))
    tokens = dict(np.load(tokens_path))
    model = onnx.load(str(float_path))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths, seconds = {"FP32": float_path}, {}
    for name, block, strategy in (("default strategy", 32, ""), ("ON_THE_FLY", 32, "dequant_strategy=ON_THE_FLY"),
                                  ("default strategy, per channel", 0, "")):
        paths[name] = work / f"{name.replace(' ', '_').replace(',', '')}.onnx"
        start = time.perf_counter()
        result = convert(model, parse_config(CONFIG.format(block=block, strategy=strategy), "minilm_block_default"))
        save_model(result.model, paths[name])
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {len(result.quantized)} weights quantized, {len(result.skipped)} kept float "
              f"({seconds[name]:.1f} s)", file=sys.stderr)
    rows = slice(0, args.sentences)
    reference = embeddings(float_path, tokens, rows, "")
    exact_otf = embeddings(paths["ON_THE_FLY"], tokens, rows, "0")
    small = work / "tokens.npz"
    np.savez(small, **{n: tokens[n][:8, :32] for n in NAMES})
    peaks: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved, so the machine's load hits every model alike
        for name, path in paths.items():
            run = run_child([sys.executable, "-c", LOAD, str(path), str(small)])
            if run.returncode:
                raise SystemExit(f"{name} failed to load: {run.stderr[-2000:]}")
            peaks[name].append(run.peak_mb)
    feed = {n: tokens[n][:8, :32] for n in NAMES}
    ratios = latency_ratios(paths, "FP32", feed, threads=1)
    print(f"all-MiniLM-L6-v2, 4 bit, {args.sentences} SST-2 sentences; cosine of sentence embeddings to "
          f"FP32; load peak RSS: median of {args.repeats}, interleaved; latency: ratio to FP32, 1 thread, 8 x 32 "
          "tokens, interleaved")
    print("| model | file | mean cosine | min cosine | mean cosine, accuracy_level=0 | max abs diff to ON_THE_FLY "
          "(level 0) | load peak RSS | latency | conversion |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path in paths.items():
        cos = np.sum(embeddings(path, tokens, rows, "") * reference, axis=1)
        exact = embeddings(path, tokens, rows, "0")
        diff = "" if name == "FP32" else f"{np.abs(exact - exact_otf).max():.1e}"
        print(f"| {name} | {path.stat().st_size / 1e6:.2f} MB | {cos.mean():.4f} | {cos.min():.4f} | "
              f"{np.sum(exact * reference, axis=1).mean():.4f} | {diff} | {statistics.median(peaks[name]):.0f} MB | "
              f"{ratios[name]:.2f} | {seconds.get(name, 0):.1f} s |", flush=True)


if __name__ == "__main__":
    main()

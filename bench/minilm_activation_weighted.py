"""The block search weighted by calibration activations on all-MiniLM-L6-v2 (4 bit, block 32, embeddings float),
against the plain search, by the mean cosine of sentence embeddings to FP32, both through the user path.

    PYTHONPATH=src .venv/bin/python bench/minilm_activation_weighted.py [--cache .cache/minilm] [--sentences 500]
        [--calibration 128] [--cost 2]

The plain conversion is ptqlite.convert without calibration data; the weighted one is ptqlite.convert with
--calibration SST-2 sentences taken after the evaluated ones (one unpadded sentence a sample) as in-memory
calibration samples: with block_size, [weight_quant_param] activation_weighted (default true) weights each
MatMul weight's block search by its input channels' activation mean squares (src/ptqlite/activation_weights.py),
minimising sum_k h_k (w_k - dequantized_k)^2 per block: the diagonal of the layer's output error.
--cost N only times the two conversions (verify=False), interleaved N times in this process, and exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_int4 import PTQ_CONFIG
from minilm import NAMES, ROOT, build_float
from minilm_int4 import embeddings

from ptqlite import api
from ptqlite.config import parse_config
from ptqlite.model import save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "minilm"))
    parser.add_argument("--venv", default=str(ROOT / ".cache" / "minilm-venv"))
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--cost", type=int, default=0)
    args = parser.parse_args()
    cache = Path(args.cache)
    float_path, tokens_path = build_float(cache, Path(args.venv), max(args.sentences + args.calibration, 2000))
    tokens = dict(np.load(tokens_path))
    model = onnx.load(str(float_path))
    lengths = tokens["attention_mask"].sum(1)
    samples = [{n: tokens[n][i:i + 1, :lengths[i]] for n in NAMES}
               for i in range(args.sentences, args.sentences + args.calibration)]
    tables = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    word = ",".join(n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables)
    config = parse_config(PTQ_CONFIG.format(bits=4, block=32, skip=f"skip_quant_node={word}"), "minilm_weighted")
    if args.cost:
        for _ in range(args.cost):
            for name, calibration in (("plain", None), ("weighted", samples)):
                start = time.perf_counter()
                api.convert(model, config, calibration, verify=False)
                print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        return
    rows = slice(0, args.sentences)
    reference = embeddings(float_path, tokens, rows, "")
    work = cache / "int4"
    work.mkdir(parents=True, exist_ok=True)
    print(f"all-MiniLM-L6-v2, {args.sentences} SST-2 sentences, 4 bit block 32, embeddings float; "
          f"{args.calibration} calibration sentences")
    print("| search | mean cosine | min cosine | mean cosine, accuracy_level=0 |")
    print("|---|---|---|---|")
    for name, calibration in (("plain (weight error)", None), ("weighted by activation mean squares", samples)):
        path = work / f"weighted_{'plain' if calibration is None else 'weighted'}.onnx"
        save_model(api.convert(model, config, calibration).model, path)
        cos = np.sum(embeddings(path, tokens, rows, "") * reference, axis=1)
        exact = np.sum(embeddings(path, tokens, rows, "0") * reference, axis=1)
        print(f"| {name} | {cos.mean():.4f} | {cos.min():.4f} | {exact.mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()

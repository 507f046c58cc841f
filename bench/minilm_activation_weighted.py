"""Experiment: the block search weighted by calibration activations on all-MiniLM-L6-v2 (4 bit, block 32,
embeddings float), against the plain search, by the mean cosine of sentence embeddings to FP32.

    PYTHONPATH=src .venv/bin/python bench/minilm_activation_weighted.py [--cache .cache/minilm] [--sentences 500]
        [--calibration 128]

The conversion does not read calibration data for the search yet: this script measures, for every MatMul weight,
the mean square of each input channel of its activation over --calibration SST-2 sentences taken after the
evaluated ones (the float model run by ONNX Runtime, one unpadded sentence at a time), and hands it to
`quantize_blocks(importance=...)` by wrapping the function the WEIGHT_QUANT pass calls. The weighted search
minimises sum_k h_k (w_k - dequantized_k)^2 per block: the diagonal of the layer's output error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_int4 import PTQ_CONFIG
from minilm import NAMES, ROOT, build_float
from minilm_int4 import embeddings

import ptqlite.passes.weight as weight_pass
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.model import save_model


def channel_mean_squares(model: onnx.ModelProto, tokens: dict[str, np.ndarray], rows: range) -> dict[str, np.ndarray]:
    """Per MatMul weight name: the mean over calibration tokens of each input channel's square."""
    inits = {t.name for t in model.graph.initializer}
    pairs = [(n.input[0], n.input[1]) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for activation, _ in pairs:
        probe.graph.output.append(helper.make_tensor_value_info(activation, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [a for a, _ in pairs]
    sums = dict.fromkeys(names, 0.0)
    count = 0
    lengths = tokens["attention_mask"].sum(1)
    for i in rows:
        feed = {n: tokens[n][i:i + 1, :lengths[i]] for n in NAMES}
        for name, value in zip(names, session.run(names, feed)):
            sums[name] = sums[name] + np.square(value.astype(np.float64)).reshape(-1, value.shape[-1]).sum(0)
        count += int(lengths[i])
    return {w: (sums[a] / count).astype(np.float32) for a, w in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "minilm"))
    parser.add_argument("--venv", default=str(ROOT / ".cache" / "minilm-venv"))
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--calibration", type=int, default=128)
    args = parser.parse_args()
    cache = Path(args.cache)
    float_path, tokens_path = build_float(cache, Path(args.venv), max(args.sentences + args.calibration, 2000))
    tokens = dict(np.load(tokens_path))
    model = onnx.load(str(float_path))
    squares = channel_mean_squares(model, tokens, range(args.sentences, args.sentences + args.calibration))
    # the weights are recognised by their values (the pass hands quantize_blocks arrays, not names)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    by_value = {(inits[w].shape, inits[w].tobytes()): h for w, h in squares.items()}
    plain = weight_pass.quantize_blocks

    def weighted(w: np.ndarray, bits: int, axis: int, block: int, **options):
        h = by_value.get((w.shape, np.asarray(w, np.float32).tobytes())) if axis == 0 else None
        return plain(w, bits, axis, block, importance=h, **options)

    tables = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    word = ",".join(n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables)
    config = parse_config(PTQ_CONFIG.format(bits=4, block=32, skip=f"skip_quant_node={word}"), "minilm_weighted")
    rows = slice(0, args.sentences)
    reference = embeddings(float_path, tokens, rows, "")
    work = cache / "int4"
    work.mkdir(parents=True, exist_ok=True)
    print(f"all-MiniLM-L6-v2, {args.sentences} SST-2 sentences, 4 bit block 32, embeddings float; "
          f"{args.calibration} calibration sentences")
    print("| search | mean cosine | min cosine | mean cosine, accuracy_level=0 |")
    print("|---|---|---|---|")
    for name, search in (("plain (weight error)", plain), ("weighted by activation mean squares", weighted)):
        weight_pass.quantize_blocks = search
        path = work / f"weighted_{search.__name__}.onnx"
        save_model(convert(model, config).model, path)
        weight_pass.quantize_blocks = plain
        cos = np.sum(embeddings(path, tokens, rows, "") * reference, axis=1)
        exact = np.sum(embeddings(path, tokens, rows, "0") * reference, axis=1)
        print(f"| {name} | {cos.mean():.4f} | {cos.min():.4f} | {exact.mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()

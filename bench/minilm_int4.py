"""Weight-only 4 and 8 bit on all-MiniLM-L6-v2: ptqlite ON_THE_FLY (block-wise, per channel) against
onnxruntime's MatMulNBitsQuantizer (RTN and HQQ), by the mean cosine of sentence embeddings to FP32.

    PYTHONPATH=src .venv/bin/python bench/minilm_int4.py [--cache .cache/minilm] [--sentences 500]

The float model and the tokenized SST-2 sentences are built as bench/minilm.py builds them (a scratch virtual
environment, cached under --cache). Embeddings: last_hidden_state mean-pooled over the attention mask and
L2-normalised (bench/minilm.py's `embeddings`). The HQQ row needs torch in the environment. MatMulNBitsQuantizer quantizes MatMul weights only; the ptqlite
rows quantize the embedding tables (word, position, token type) too unless marked "embeddings float".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_int4 import PTQ_CONFIG
from minilm import NAMES, ROOT, build_float

from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.model import save_model


def embeddings(path: Path, tokens: dict[str, np.ndarray], rows: slice, level: str, batch: int = 32) -> np.ndarray:
    """As bench/minilm.py's: sentences of similar length batched, mean-pooled, L2-normalised; `level` sets the
    accuracy level of the MatMulNBits kernels ONNX Runtime makes from DequantizeLinear + MatMul ("" = its
    default, 4: int8 activations)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 2, 3
    if level:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    data = {n: tokens[n][rows] for n in NAMES}
    lengths = data["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(lengths), 384))
    for start in range(0, len(order), batch):
        pick = order[start:start + batch]
        feed = {n: data[n][pick, :int(lengths[pick].max())] for n in NAMES}
        hidden = session.run(None, feed)[0].astype(np.float64)
        mask = feed["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out[pick] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


def ptqlite_variant(model: onnx.ModelProto, out: Path, bits: int, block: int, skip: str = "") -> float:
    text = PTQ_CONFIG.format(bits=bits, block=block, skip=f"skip_quant_node={skip}" if skip else "")
    start = time.perf_counter()
    save_model(convert(model, parse_config(text, "minilm_int4")).model, out)
    return time.perf_counter() - start


def ort_variant(model: onnx.ModelProto, out: Path, bits: int, block: int, algo: str = "RTN") -> float:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    start = time.perf_counter()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if algo == "HQQ":
        quantizer = MatMulNBitsQuantizer(copy, algo_config=HQQWeightOnlyQuantConfig(block_size=block, bits=bits))
    else:
        quantizer = MatMulNBitsQuantizer(copy, bits=bits, block_size=block, is_symmetric=False)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(out))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "minilm"))
    parser.add_argument("--venv", default=str(ROOT / ".cache" / "minilm-venv"))
    parser.add_argument("--sentences", type=int, default=500)
    args = parser.parse_args()
    cache = Path(args.cache)
    float_path, tokens_path = build_float(cache, Path(args.venv), max(args.sentences, 2000))
    tokens = dict(np.load(tokens_path))
    model = onnx.load(str(float_path))
    # the embedding tables (word, position, token type): Gathers of constant tables
    tables = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    word_embedding = ",".join(n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables)
    work = cache / "int4"
    work.mkdir(parents=True, exist_ok=True)
    variants = {
        "ptqlite 4 bit block 32": lambda p: ptqlite_variant(model, p, 4, 32),
        "ptqlite 4 bit block 32, embeddings float": lambda p: ptqlite_variant(model, p, 4, 32, word_embedding),
        "ptqlite 4 bit block 128, embeddings float": lambda p: ptqlite_variant(model, p, 4, 128, word_embedding),
        "ptqlite 4 bit per channel, embeddings float": lambda p: ptqlite_variant(model, p, 4, 0, word_embedding),
        "MatMulNBits RTN 4 bit block 32": lambda p: ort_variant(model, p, 4, 32),
        "MatMulNBits RTN 4 bit block 128": lambda p: ort_variant(model, p, 4, 128),
        "MatMulNBits HQQ 4 bit block 32": lambda p: ort_variant(model, p, 4, 32, "HQQ"),
        "ptqlite 8 bit block 32, embeddings float": lambda p: ptqlite_variant(model, p, 8, 32, word_embedding),
        "ptqlite 8 bit per channel, embeddings float": lambda p: ptqlite_variant(model, p, 8, 0, word_embedding),
        "MatMulNBits RTN 8 bit block 32": lambda p: ort_variant(model, p, 8, 32),
    }
    try:
        import torch  # noqa: F401  (MatMulNBitsQuantizer's HQQ runs on torch)
    except ImportError:
        del variants["MatMulNBits HQQ 4 bit block 32"]
        print("MatMulNBits HQQ left out: it needs torch", file=sys.stderr)
    rows = slice(0, args.sentences)
    reference = embeddings(float_path, tokens, rows, "")
    print(f"all-MiniLM-L6-v2, {args.sentences} SST-2 sentences; cosine of sentence embeddings to FP32 (mean, min); "
          "fused kernels at ONNX Runtime's default accuracy level and at accuracy_level=0 (float activations)")
    print("| model | file | mean cosine | min cosine | mean cosine, accuracy_level=0 | conversion |")
    print("|---|---|---|---|---|---|")
    print(f"| FP32 | {float_path.stat().st_size / 1e6:.1f} MB | 1.0000 | 1.0000 | 1.0000 | |")
    for number, (name, make) in enumerate(variants.items()):
        path = work / f"v{number}.onnx"
        seconds = make(path)
        cos = np.sum(embeddings(path, tokens, rows, "") * reference, axis=1)
        exact = np.sum(embeddings(path, tokens, rows, "0") * reference, axis=1)
        print(f"| {name} | {path.stat().st_size / 1e6:.1f} MB | {cos.mean():.4f} | {cos.min():.4f} | "
              f"{exact.mean():.4f} | {seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()

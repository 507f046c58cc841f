"""Weight-only 4 and 8 bit on all-MiniLM-L6-v2: ptqlite ON_THE_FLY (block-wise, per channel) against
onnxruntime's MatMulNBitsQuantizer (RTN, HQQ, GPTQ), by the mean cosine of sentence embeddings to FP32.

    PYTHONPATH=src .venv/bin/python bench/minilm_int4.py [--cache .cache/minilm] [--sentences 500]
        [--torch-python /path/to/venv/bin/python]

The float model and the tokenized SST-2 sentences are built as bench/minilm.py builds them (a scratch virtual
environment, cached under --cache). Embeddings: last_hidden_state mean-pooled over the attention mask and
L2-normalised (bench/minilm.py's `embeddings`). MatMulNBitsQuantizer quantizes MatMul weights only; the ptqlite
rows quantize the embedding tables (word, position, token type) too (at gather_min_bit_num's 6 bits unless marked
otherwise) unless marked "embeddings float".

MatMulNBitsQuantizer's HQQ and GPTQ run on torch. They run in a child process of --torch-python (a separate
environment with torch, onnxruntime and onnx; default: this interpreter); when that interpreter has no torch the
rows are left out and the script says so. GPTQ calibrates on --calibration sentences taken after the evaluated
ones (one sentence per batch, unpadded).
"""

from __future__ import annotations

import argparse
import subprocess
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


def ptqlite_variant(model: onnx.ModelProto, out: Path, bits: int, block: int, skip: str = "",
                    extra: str = "") -> float:
    text = PTQ_CONFIG.format(bits=bits, block=block, skip=f"skip_quant_node={skip}" if skip else "") + extra
    start = time.perf_counter()
    save_model(convert(model, parse_config(text, "minilm_int4")).model, out)
    return time.perf_counter() - start


def ort_variant(model: onnx.ModelProto, out: Path, bits: int, block: int) -> float:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    start = time.perf_counter()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    quantizer = MatMulNBitsQuantizer(copy, bits=bits, block_size=block, is_symmetric=False)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(out))
    return time.perf_counter() - start


# MatMulNBitsQuantizer with HQQ or GPTQ (both need torch), run by the --torch-python interpreter; prints seconds.
TORCH_QUANTIZE = """import sys, time, numpy as np, onnx
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.matmul_nbits_quantizer import (GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
                                                             MatMulNBitsQuantizer)
src, out, bits, block, algo, calibration = sys.argv[1:7]
bits, block = int(bits), int(block)

class Sentences(CalibrationDataReader):
    def __init__(self, path):
        data = dict(np.load(path))
        lengths = data["attention_mask"].sum(1)
        self.feeds = [{n: data[n][i:i + 1, :lengths[i]] for n in ("input_ids", "attention_mask", "token_type_ids")}
                      for i in range(len(lengths))]
        self.at = 0
    def get_next(self):
        self.at += 1
        return self.feeds[self.at - 1] if self.at <= len(self.feeds) else None

start = time.perf_counter()
if algo == "HQQ":
    config = HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
else:
    config = GPTQWeightOnlyQuantConfig(calibration_data_reader=Sentences(calibration), block_size=block)
quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=bits, block_size=block, is_symmetric=False, algo_config=config)
quantizer.process()
onnx.save_model(quantizer.model.model, out)
print(f"\nseconds {time.perf_counter() - start}")  # GPTQ's progress bar ends without a newline
"""


def torch_variant(python: str, src: Path, out: Path, bits: int, block: int, algo: str, calibration: Path) -> float:
    run = subprocess.run([python, "-c", TORCH_QUANTIZE, str(src), str(out), str(bits), str(block), algo,
                          str(calibration)], capture_output=True, text=True, check=False)
    if run.returncode:
        raise SystemExit(f"MatMulNBitsQuantizer {algo} failed: {run.stderr[-2000:]}")
    return float(run.stdout.rsplit("seconds ", 1)[-1])


def has_torch(python: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", "import torch, onnxruntime, onnx"], capture_output=True, check=False)
    except OSError:  # no such interpreter
        return False
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "minilm"))
    parser.add_argument("--venv", default=str(ROOT / ".cache" / "minilm-venv"))
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--calibration", type=int, default=128, help="GPTQ calibration sentences")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="an interpreter with torch, onnxruntime and onnx for the HQQ and GPTQ rows")
    parser.add_argument("--only", default="", help="comma-separated numbers of the rows to run, counted from 0 in "
                        "the order of the table (default: all)")
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
    calibration = work / "calibration.npz"  # sentences after the evaluated ones
    picked = slice(args.sentences, args.sentences + args.calibration)
    np.savez(calibration, **{n: tokens[n][picked] for n in NAMES})
    variants = {
        "ptqlite 4 bit block 32": lambda p: ptqlite_variant(model, p, 4, 32),
        "ptqlite 4 bit block 32, embeddings float": lambda p: ptqlite_variant(model, p, 4, 32, word_embedding),
        "ptqlite 4 bit block 128, embeddings float": lambda p: ptqlite_variant(model, p, 4, 128, word_embedding),
        "ptqlite 4 bit per channel, embeddings float": lambda p: ptqlite_variant(model, p, 4, 0, word_embedding),
        "MatMulNBits RTN 4 bit block 32": lambda p: ort_variant(model, p, 4, 32),
        "MatMulNBits RTN 4 bit block 128": lambda p: ort_variant(model, p, 4, 128),
        "MatMulNBits HQQ 4 bit block 32": lambda p: torch_variant(args.torch_python, float_path, p, 4, 32, "HQQ",
                                                                  calibration),
        f"MatMulNBits GPTQ 4 bit block 32 ({args.calibration} calibration sentences)":
            lambda p: torch_variant(args.torch_python, float_path, p, 4, 32, "GPTQ", calibration),
        "ptqlite 8 bit block 32, embeddings float": lambda p: ptqlite_variant(model, p, 8, 32, word_embedding),
        "ptqlite 8 bit per channel, embeddings float": lambda p: ptqlite_variant(model, p, 8, 0, word_embedding),
        "MatMulNBits RTN 8 bit block 32": lambda p: ort_variant(model, p, 8, 32),
        "ptqlite 4 bit block 32, embeddings 8 bit (gather_min_bit_num=8)":
            lambda p: ptqlite_variant(model, p, 4, 32, extra="gather_min_bit_num=8\n"),
    }
    numbers = {name: number for number, name in enumerate(variants)}  # --only counts the rows left out too
    if not has_torch(args.torch_python):
        for name in [n for n in variants if " HQQ " in n or " GPTQ " in n]:
            del variants[name]
        print(f"MatMulNBits HQQ and GPTQ rows left out: {args.torch_python} cannot import torch (pass "
              "--torch-python with a separate environment that has torch, onnxruntime and onnx)", file=sys.stderr)
    chosen = {int(v) for v in args.only.split(",") if v.strip()} if args.only else set(range(len(variants)))
    rows = slice(0, args.sentences)
    reference = embeddings(float_path, tokens, rows, "")
    print(f"all-MiniLM-L6-v2, {args.sentences} SST-2 sentences; cosine of sentence embeddings to FP32 (mean, min); "
          "fused kernels at ONNX Runtime's default accuracy level and at accuracy_level=0 (float activations)")
    print("| model | file | mean cosine | min cosine | mean cosine, accuracy_level=0 | conversion |")
    print("|---|---|---|---|---|---|")
    print(f"| FP32 | {float_path.stat().st_size / 1e6:.1f} MB | 1.0000 | 1.0000 | 1.0000 | |")
    for name, make in variants.items():
        number = numbers[name]
        if number not in chosen:
            continue
        path = work / f"v{number}.onnx"
        seconds = make(path)
        cos = np.sum(embeddings(path, tokens, rows, "") * reference, axis=1)
        exact = np.sum(embeddings(path, tokens, rows, "0") * reference, axis=1)
        print(f"| {name} | {path.stat().st_size / 1e6:.1f} MB | {cos.mean():.4f} | {cos.min():.4f} | "
              f"{exact.mean():.4f} | {seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()

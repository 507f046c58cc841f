"""Weight-only int4 on a synthetic Llama-style decoder: ptqlite ON_THE_FLY (block-wise and per channel) against
onnxruntime's MatMulNBitsQuantizer, side by side in one run.

    PYTHONPATH=src .venv/bin/python bench/llm_int4.py [--hidden 1024 --layers 6 --vocab 16000] [--work DIR]
    PYTHONPATH=src .venv/bin/python bench/llm_int4.py --hidden 4096 --layers 30 --vocab 32000 --work DIR \
        --stream-build --build-only      # a decoder larger than the machine's memory: built, not measured

The decoder (seeded, float32, opset 17, weights in external data): token embedding Gather, per layer RMSNorm ->
q/k/v MatMuls -> multi-head attention (no mask, no rotary: the weights are what is measured) -> o MatMul ->
residual, RMSNorm -> SwiGLU (gate, up, down MatMuls) -> residual; final RMSNorm and an lm_head MatMul. Weights are
Gaussian with a few heavy outliers per matrix, as trained weights have.

Columns: file size (model + data files), peak RSS of a child process that loads the model and runs it once (seq 1),
its RSS after that run, latency at seq 1 / 32 / 128 (1 thread, every model loaded in one process and taking
turns run by run, median per model, as a ratio to float), cosine of the logits to float's (mean over --samples
random sequences of 32 tokens, default 4; with more, the mean of the first 4 is printed too), conversion time and peak RSS of the converting child process (the kernel's rusage of
that process alone; ptqlite's includes its input checks and verification gate, MatMulNBitsQuantizer's its
onnx.load and save).
MatMulNBitsQuantizer quantizes MatMul weights only (the embedding table stays float); the ptqlite rows quantize the
embedding table too (at 6 bits in blocks of 64, 4 codes in 3 bytes: gather_min_bit_num's default; "embedding 8 bit":
gather_min_bit_num=8, one scale per row; "embedding 4 bit": at bit_num) unless marked "embedding float"
(skip_quant_node).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_child, session

ROOT = Path(__file__).resolve().parents[1]

# WEIGHT_QUANT ON_THE_FLY block-wise (bench/minilm_int4.py uses it too)
PTQ_CONFIG = """[common_quant_param]
quant_type=WEIGHT_QUANT
bit_num={bits}
min_quant_weight_size=0
min_quant_weight_channel=0
{skip}
[weight_quant_param]
dequant_strategy=ON_THE_FLY
block_size={block}
"""

ORT_QUANTIZE = """import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
src, out, block, level = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
q = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=block, is_symmetric=False,
                         accuracy_level=None if level == "none" else int(level))
q.process()
onnx.save_model(q.model.model, out)
"""

# Loads the model (1 thread), runs it once at seq 1, prints its resident memory after that run (MB).
LOAD_AND_RUN = """import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1; o.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
s.run(None, {"input_ids": np.zeros((1, 1), np.int64)})
rss = [line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1]
print(int(rss) * 1024 / 1e6)
"""


class ExternalWriter:
    """Writes each tensor of 1 KB or more straight to the model's data file (page-aligned) and returns a message that
    only refers to it: the model is built with one weight in memory at a time, whatever its size."""

    def __init__(self, path: Path, location: str):
        self.handle = open(path, "wb")  # noqa: SIM115  (closed by close())
        self.location = location

    def __call__(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        if array.nbytes < 1024:
            return numpy_helper.from_array(array, name)
        self.handle.write(b"\0" * (-self.handle.tell() % 4096))
        offset = self.handle.tell()
        self.handle.write(memoryview(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))))
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        self.handle.close()


def save_streamed(path: Path, hidden: int, layers: int, vocab: int, ffn: int, heads: int) -> None:
    """The same decoder as decoder(), its weights written to `<path>.data` as they are made (temp names, renamed
    when complete: an interrupted build leaves no model that looks finished)."""
    data = path.with_name(path.name + ".data")
    tmp_data, tmp_model = data.with_name(data.name + ".tmp"), path.with_name(path.name + ".tmp")
    writer = ExternalWriter(tmp_data, data.name)
    try:
        model = decoder(hidden, layers, vocab, ffn, heads, make_tensor=writer)
    finally:
        writer.close()
    tmp_model.write_bytes(model.SerializeToString())
    os.replace(tmp_data, data)
    os.replace(tmp_model, path)


def decoder(hidden: int, layers: int, vocab: int, ffn: int, heads: int, seed: int = 0,
            make_tensor=numpy_helper.from_array) -> onnx.ModelProto:
    """`make_tensor(array, name)`: the initializer of each value (ExternalWriter: written to the data file)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    head_dim = hidden // heads

    def weight(name: str, rows: int, cols: int) -> str:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(1.0 / np.sqrt(rows))
        outliers = rng.random((rows, cols)) < 0.001
        w[outliers] *= 8.0
        del outliers
        inits.append(make_tensor(w, name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(make_tensor(value, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    eps = const("eps", np.array(1e-6, np.float32))
    split_heads = const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = const("merge_heads", np.array([0, 0, hidden], np.int64))
    inv_sqrt = const("inv_sqrt_d", np.array(1.0 / np.sqrt(head_dim), np.float32))

    def rms_norm(x: str, prefix: str) -> str:
        gamma = const(f"{prefix}.g", (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        square = node("Mul", [x, x], f"{prefix}.sq")
        mean = node("ReduceMean", [square], f"{prefix}.mean", axes=[-1], keepdims=1)  # opset 17 form
        root = node("Sqrt", [node("Add", [mean, eps], f"{prefix}.eps")], f"{prefix}.root")
        return node("Mul", [node("Div", [x, root], f"{prefix}.div"), gamma], f"{prefix}.out")

    def heads_of(x: str, prefix: str) -> str:
        return node("Transpose", [node("Reshape", [x, split_heads], f"{prefix}.r")], f"{prefix}.t", perm=[0, 2, 1, 3])

    h = node("Gather", [weight("embed", vocab, hidden), "input_ids"], "embed.out", axis=0)
    for i in range(layers):
        p = f"l{i}"
        x = rms_norm(h, f"{p}.norm1")
        q = heads_of(node("MatMul", [x, weight(f"{p}.q", hidden, hidden)], f"{p}.q.out"), f"{p}.q")
        k = heads_of(node("MatMul", [x, weight(f"{p}.k", hidden, hidden)], f"{p}.k.out"), f"{p}.k")
        v = heads_of(node("MatMul", [x, weight(f"{p}.v", hidden, hidden)], f"{p}.v.out"), f"{p}.v")
        kt = node("Transpose", [k], f"{p}.kt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], f"{p}.qk"), inv_sqrt], f"{p}.scores")
        attn = node("MatMul", [node("Softmax", [scores], f"{p}.softmax", axis=-1), v], f"{p}.attn")
        merged = node("Reshape", [node("Transpose", [attn], f"{p}.attn.t", perm=[0, 2, 1, 3]), merge_heads],
                      f"{p}.merged")
        h = node("Add", [h, node("MatMul", [merged, weight(f"{p}.o", hidden, hidden)], f"{p}.o.out")], f"{p}.res1")
        x = rms_norm(h, f"{p}.norm2")
        gate = node("MatMul", [x, weight(f"{p}.gate", hidden, ffn)], f"{p}.gate.out")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
        up = node("MatMul", [x, weight(f"{p}.up", hidden, ffn)], f"{p}.up.out")
        down = node("MatMul", [node("Mul", [silu, up], f"{p}.swiglu"), weight(f"{p}.down", ffn, hidden)],
                    f"{p}.down.out")
        h = node("Add", [h, down], f"{p}.res2")
    logits = node("MatMul", [rms_norm(h, "final_norm"), weight("lm_head", hidden, vocab)], "logits")
    graph = helper.make_graph(nodes, "llama_like",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
                              [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, "seq", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="llm_int4 bench")
    model.ir_version = 8
    return model


def model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


W8_CONFIG = """[common_quant_param]
quant_type=WEIGHT_QUANT
bit_num=8
min_quant_weight_size=0
min_quant_weight_channel=0
"""
DYNAMIC_CONFIG = """[common_quant_param]
quant_type=DYNAMIC_QUANT
min_quant_weight_size=0
min_quant_weight_channel=0
[dynamic_quant_param]
quant_strategy=ALWC
"""


def convert_ptqlite(src: Path, out: Path, block: int, skip: str = "", config: str = "") -> dict:
    """The CLI in a child process (a model with external data is converted streaming); time and peak RSS."""
    cfg = out.with_suffix(".cfg")
    cfg.write_text(config or PTQ_CONFIG.format(bits=4, block=block, skip=f"skip_quant_node={skip}" if skip else ""))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = run_child([sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={src}",
                     f"--configFile={cfg}", f"--outputFile={out}", "--quiet"], env=env)
    if run.returncode:
        raise SystemExit(f"ptqlite conversion failed: {run.stderr[-2000:]}")
    return {"convert_s": run.seconds, "convert_peak_mb": run.peak_mb}


def convert_ort(src: Path, out: Path, block: int, level: str) -> dict:
    run = run_child([sys.executable, "-c", ORT_QUANTIZE, str(src), str(out), str(block), level])
    if run.returncode:
        raise SystemExit(f"MatMulNBitsQuantizer failed: {run.stderr[-2000:]}")
    return {"convert_s": run.seconds, "convert_peak_mb": run.peak_mb}


def load_memory(path: Path) -> dict:
    run = run_child([sys.executable, "-c", LOAD_AND_RUN, str(path)])
    if run.returncode:
        raise SystemExit(f"loading {path} failed: {run.stderr[-2000:]}")
    return {"load_peak_mb": run.peak_mb, "steady_mb": float(run.stdout.strip().splitlines()[-1])}


def latencies(paths: dict[str, Path], seq: int, rounds: int, runs: int) -> dict[str, float]:
    """Median ms of one run per model, models taking turns run by run (1 thread)."""
    sessions = {name: session(path, 1) for name, path in paths.items()}
    feed = {"input_ids": np.random.default_rng(seq).integers(0, 1000, (1, seq)).astype(np.int64)}
    for s in sessions.values():
        s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            times[name].append((time.perf_counter() - start) / runs * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def logits_cosine(paths: dict[str, Path], vocab: int, samples: int = 4, seq: int = 32,
                  first: int = 0) -> dict[str, float]:
    """Mean cosine of each model's logits to float's over `samples` seeded sequences (the first `first` of them
    when given: the same sequences as a run with fewer samples)."""
    rng = np.random.default_rng(1)
    feeds = [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(samples)]
    reference = session(paths["float"], 2)
    want = [reference.run(None, f)[0].ravel().astype(np.float64) for f in feeds]
    del reference
    result = {}
    for name, path in paths.items():
        s = session(path, 2)
        cos = [float(w @ g / (np.linalg.norm(w) * np.linalg.norm(g)))
               for w, g in zip(want, (s.run(None, f)[0].ravel().astype(np.float64) for f in feeds))]
        result[name] = float(np.mean(cos))
        if first:
            result[f"{name} (first {first})"] = float(np.mean(cos[:first]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--ffn", type=int, default=0, help="SwiGLU width (default: 8/3 hidden, rounded to 256)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--work", default="", help="folder for the models (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the figures here")
    parser.add_argument("--stream-build", action="store_true", help="write each weight to the data file as it is "
                        "made (for a model larger than the memory; the same model as the in-memory build)")
    parser.add_argument("--build-only", action="store_true", help="build the float model and stop")
    parser.add_argument("--variants", default="", help="comma-separated numbers of the rows to run (default: all; "
                        "0 block 32, 1 block 32 embedding float, 2 per channel, 3 MatMulNBits, 4 MatMulNBits "
                        "accuracy_level=4, 5 ptqlite WEIGHT_QUANT 8 bit, 6 ptqlite DYNAMIC_QUANT ALWC, 7 block 32 with the "
                        "embedding at 4 bits too, 8 block 32 with the embedding at 8 bits)")
    parser.add_argument("--samples", type=int, default=4, help="sequences the logits cosine is averaged over")
    args = parser.parse_args()
    ffn = args.ffn or int(np.ceil(args.hidden * 8 / 3 / 256) * 256)
    work = Path(args.work or tempfile.mkdtemp(prefix="llm_int4_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "float.onnx"
    if not src.exists() and args.stream_build:
        started = time.perf_counter()
        save_streamed(src, args.hidden, args.layers, args.vocab, ffn, args.heads)
        print(f"built {model_bytes(src) / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not src.exists():
        model = decoder(args.hidden, args.layers, args.vocab, ffn, args.heads)
        onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="float.onnx.data", size_threshold=1024)
        del model
    if args.build_only:
        return
    rows: dict[str, dict] = {"float": {}}
    paths = {"float": src}
    variants = [
        ("ptqlite ON_THE_FLY 4 bit block 32", lambda out: convert_ptqlite(src, out, 32)),
        ("ptqlite ON_THE_FLY 4 bit block 32, embedding float", lambda out: convert_ptqlite(src, out, 32, "embed.out")),
        ("ptqlite ON_THE_FLY 4 bit per channel", lambda out: convert_ptqlite(src, out, 0)),
        ("MatMulNBits int4 block 32", lambda out: convert_ort(src, out, 32, "none")),
        ("MatMulNBits int4 block 32, accuracy_level=4", lambda out: convert_ort(src, out, 32, "4")),
        ("ptqlite WEIGHT_QUANT 8 bit (default strategy)", lambda out: convert_ptqlite(src, out, 0, config=W8_CONFIG)),
        ("ptqlite DYNAMIC_QUANT ALWC", lambda out: convert_ptqlite(src, out, 0, config=DYNAMIC_CONFIG)),
        ("ptqlite ON_THE_FLY 4 bit block 32, embedding 4 bit", lambda out: convert_ptqlite(
            src, out, 32, config=PTQ_CONFIG.format(bits=4, block=32, skip="") + "gather_min_bit_num=0\n")),
        ("ptqlite ON_THE_FLY 4 bit block 32, embedding 8 bit", lambda out: convert_ptqlite(
            src, out, 32, config=PTQ_CONFIG.format(bits=4, block=32, skip="") + "gather_min_bit_num=8\n")),
    ]
    chosen = {int(v) for v in args.variants.split(",") if v.strip()} if args.variants else set(range(len(variants)))
    for number, (name, make) in enumerate(variants):
        if number not in chosen:
            continue
        out = work / f"v{number}.onnx"
        rows[name] = make(out)
        paths[name] = out
        print(f"converted: {name} in {rows[name]['convert_s']:.1f} s", file=sys.stderr, flush=True)
    for name, path in paths.items():
        rows[name].update(file_mb=model_bytes(path) / 1e6, **load_memory(path))
    first = 4 if args.samples > 4 else 0
    cosines = logits_cosine(paths, args.vocab, args.samples, first=first)
    for name in paths:
        rows[name]["cosine"] = cosines[name]
        if first:
            rows[name]["cosine_first4"] = cosines[f"{name} (first {first})"]
    for seq, rounds, runs in ((1, 15, 4), (32, 7, 1), (128, 5, 1)):
        for name, ms in latencies(paths, seq, rounds, runs).items():
            rows[name][f"seq{seq}_ms"] = ms
        print(f"timed seq {seq}", file=sys.stderr, flush=True)
    base = rows["float"]
    print(f"decoder: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}, ffn {ffn}, heads {args.heads}; "
          f"float {base['file_mb']:.0f} MB")
    cos_head = f"logits cosine ({args.samples} sequences" + ("; first 4)" if first else ")")
    print(f"| model | file | load peak RSS | steady RSS | latency seq 1 / 32 / 128 | {cos_head} | conversion |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        lat = " / ".join(f"{r[f'seq{s}_ms'] / base[f'seq{s}_ms']:.2f}" for s in (1, 32, 128))
        if name == "float":
            lat = " / ".join(f"{base[f'seq{s}_ms']:.1f} ms" for s in (1, 32, 128))
        conv = f"{r['convert_s']:.1f} s, peak {r['convert_peak_mb']:.0f} MB" if "convert_s" in r else ""
        print(f"| {name} | {r['file_mb']:.0f} MB ({r['file_mb'] / base['file_mb']:.3f}x) | "
              f"{r['load_peak_mb']:.0f} MB ({r['load_peak_mb'] / base['load_peak_mb']:.2f}x) | "
              f"{r['steady_mb']:.0f} MB ({r['steady_mb'] / base['steady_mb']:.2f}x) | {lat} | {r['cosine']:.4f}"
              + (f" / {r['cosine_first4']:.4f}" if first else "") + f" | {conv} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

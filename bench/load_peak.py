"""Peak memory of loading weights that a decoder chain rebuilds at load, against plain float weights.

    .venv/bin/python bench/load_peak.py [--latency]

Builds an 8-layer 2048x2048 MatMul stack several ways and prints the peak resident memory of a child process that
loads each and runs it once: float weights; uint8 weights behind one Cast; behind Cast, Mul by a per-column scale
and Add of a per-column offset (the former 8-bit decoder); the same map as one BatchNormalization (scale a, bias
b, mean 0, variance 1, epsilon 0: exactly x * a + b); one Cast with the map on the MatMul output
((x @ u) * a + sum(x) * b, what the WEIGHT_QUANT pass now emits for MatMul weights); block-wise (u - z) * s with
the scales and zero points gathered along K (the block_size decoder) or broadcast on [blocks, 32, N] codes
reshaped back. Then the float stack
converted by the WEIGHT_QUANT pass at a few widths (and 4 bit block 32, rebuilt in float at load). --latency adds
latency ratios against float (1 thread, batch 1, interleaved in one process).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import latency_ratios, run_child

WIDTH, LAYERS = 2048, 8
KINDS = ("float", "cast", "cast+mul+add", "cast+batchnorm", "cast, affine on output", "blocks: gathered scales",
         "blocks: reshaped")
BLOCK = 32
# The float stack converted by the WEIGHT_QUANT pass (default strategy): bit_num, enable_encode, block_size
PASS_KINDS = {"WEIGHT_QUANT 8 bit": (8, "true", 0), "WEIGHT_QUANT 8 bit, enable_encode=false": (8, "false", 0),
              "WEIGHT_QUANT 4 bit": (4, "true", 0), "WEIGHT_QUANT 3 bit": (3, "true", 0),
              "WEIGHT_QUANT 4 bit block 32": (4, "true", 32)}
RUN = f"""import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
s.run(None, {{"x": np.zeros((1, {WIDTH}), np.float32)}})"""


def build(kind: str, path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for k in range(LAYERS):
        if kind == "float":
            inits.append(numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), f"w{k}"))
        else:
            inits.append(numpy_helper.from_array(rng.integers(0, 255, (WIDTH, WIDTH)).astype(np.uint8), f"u{k}"))
            if kind == "cast":
                nodes.append(helper.make_node("Cast", [f"u{k}"], [f"w{k}"], to=TensorProto.FLOAT))
            elif kind == "cast+batchnorm":
                inits += [numpy_helper.from_array(np.full(WIDTH, 0.01, np.float32), f"a{k}"),
                          numpy_helper.from_array(np.full(WIDTH, -1.0, np.float32), f"b{k}"),
                          numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"z{k}"),
                          numpy_helper.from_array(np.ones(WIDTH, np.float32), f"o{k}")]
                nodes += [helper.make_node("Cast", [f"u{k}"], [f"c{k}"], to=TensorProto.FLOAT),
                          helper.make_node("BatchNormalization", [f"c{k}", f"a{k}", f"b{k}", f"z{k}", f"o{k}"],
                                           [f"w{k}"], epsilon=0.0)]
            elif kind.startswith("blocks"):
                # (u - z) * s per block of 32 along K: the block-wise decoder (encoding.decode_blocks) with its
                # scales and zero points gathered per row, or the codes reshaped to [blocks, 32, N] and the result
                # reshaped back
                blocked = kind == "blocks: reshaped"
                params = (WIDTH // BLOCK, 1, WIDTH) if blocked else (WIDTH // BLOCK, WIDTH)
                inits += [numpy_helper.from_array(rng.integers(0, 16, params).astype(np.uint8), f"z{k}"),
                          numpy_helper.from_array(rng.random(params).astype(np.float32), f"a{k}")]
                if k == 0:
                    inits += [numpy_helper.from_array((np.arange(WIDTH) // BLOCK).astype(np.int64), "rows"),
                              numpy_helper.from_array(np.array([WIDTH // BLOCK, BLOCK, WIDTH], np.int64), "bs"),
                              numpy_helper.from_array(np.array([WIDTH, WIDTH], np.int64), "ws")]
                codes = f"u{k}"
                if blocked:
                    nodes.append(helper.make_node("Reshape", [codes, "bs"], [f"r{k}"]))
                    codes = f"r{k}"
                nodes += [helper.make_node("Cast", [codes], [f"c{k}"], to=TensorProto.INT8),
                          helper.make_node("Cast", [f"z{k}"], [f"zc{k}"], to=TensorProto.INT8)]
                zero, scale = f"zc{k}", f"a{k}"
                if not blocked:
                    nodes += [helper.make_node("Gather", [zero, "rows"], [f"zg{k}"], axis=0),
                              helper.make_node("Gather", [scale, "rows"], [f"ag{k}"], axis=0)]
                    zero, scale = f"zg{k}", f"ag{k}"
                nodes += [helper.make_node("Sub", [f"c{k}", zero], [f"d{k}"]),
                          helper.make_node("Cast", [f"d{k}"], [f"f{k}"], to=TensorProto.FLOAT),
                          helper.make_node("Mul", [f"f{k}", scale], [f"m{k}" if blocked else f"w{k}"])]
                if blocked:
                    nodes.append(helper.make_node("Reshape", [f"m{k}", "ws"], [f"w{k}"]))
            elif kind == "cast, affine on output":
                # codes folded by one Cast; the per-column map runs on the MatMul output:
                # x @ (u * a + b) = (x @ u) * a + sum(x) * b
                inits += [numpy_helper.from_array(np.full((1, WIDTH), 0.01, np.float32), f"a{k}"),
                          numpy_helper.from_array(np.full((1, WIDTH), -1.0, np.float32), f"b{k}")]
                nodes += [helper.make_node("Cast", [f"u{k}"], [f"w{k}"], to=TensorProto.FLOAT),
                          helper.make_node("MatMul", [prev, f"w{k}"], [f"p{k}"]),
                          helper.make_node("ReduceSum", [prev], [f"r{k}"], axes=[-1], keepdims=1),
                          helper.make_node("Mul", [f"p{k}", f"a{k}"], [f"s{k}"]),
                          helper.make_node("Mul", [f"r{k}", f"b{k}"], [f"o{k}"]),
                          helper.make_node("Add", [f"s{k}", f"o{k}"], [f"h{k}"])]
                prev = f"h{k}"
                continue
            else:
                inits += [numpy_helper.from_array(np.full((1, WIDTH), 0.01, np.float32), f"a{k}"),
                          numpy_helper.from_array(np.full((1, WIDTH), -1.0, np.float32), f"b{k}")]
                nodes += [helper.make_node("Cast", [f"u{k}"], [f"c{k}"], to=TensorProto.FLOAT),
                          helper.make_node("Mul", [f"c{k}", f"a{k}"], [f"m{k}"]),
                          helper.make_node("Add", [f"m{k}", f"b{k}"], [f"w{k}"])]
        nodes.append(helper.make_node("MatMul", [prev, f"w{k}"], [f"h{k}"]))
        prev = f"h{k}"
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, WIDTH])], inits)
    opset = 14 if kind.startswith("blocks") else 11  # Sub on int8 from opset 14
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


def convert_stack(float_path: Path, bits: int, encode: str, block: int, path: Path) -> None:
    from ptqlite import convert, parse_config
    from ptqlite.model import save_model

    text = (f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num={bits}\nmin_quant_weight_channel=0\n"
            f"enable_encode={encode}\n[weight_quant_param]\nblock_size={block}\n")
    save_model(convert(onnx.load(float_path), parse_config(text, "load_peak.cfg")).model, path)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for n, kind in enumerate(KINDS):
            paths[kind] = Path(tmp) / f"model{n}.onnx"
            build(kind, paths[kind])
            print(f"{kind}: peak RSS {run_child([sys.executable, '-c', RUN, str(paths[kind])]).peak_mb:.0f} MB")
        for n, (kind, (bits, encode, block)) in enumerate(PASS_KINDS.items()):
            paths[kind] = Path(tmp) / f"pass{n}.onnx"
            convert_stack(paths["float"], bits, encode, block, paths[kind])
            print(f"{kind}: peak RSS {run_child([sys.executable, '-c', RUN, str(paths[kind])]).peak_mb:.0f} MB")
        if "--latency" in sys.argv:
            # Only the runtime graphs differ: float's plain MatMul against MatMul plus the per-column map.
            feed = np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)
            models = {k: paths[k] for k in ("float", "cast+mul+add", "cast, affine on output", "WEIGHT_QUANT 8 bit")}
            for kind, ratio in latency_ratios(models, "float", feed, threads=1).items():
                print(f"{kind}: latency vs float (1 thread, batch 1) {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

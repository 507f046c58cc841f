"""Time of a gathered embedding table's decoding alone (ON_THE_FLY 4 bit block 32, the table at 6 bits in blocks of
64, 8 bits a scale per row and 4 bits block 32), against a float Gather, at seq 1 / 32 / 128 (1 thread, the
sessions taking turns, median ms of 10 runs a turn).

    PYTHONPATH=src .venv/bin/python bench/gather_unpack.py [--vocab 32000 --hidden 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ptqlite.config import parse_config
from ptqlite.convert import convert

CONFIG = """[common_quant_param]
quant_type=WEIGHT_QUANT
bit_num=4
min_quant_weight_size=0
min_quant_weight_channel=0
[weight_quant_param]
dequant_strategy=ON_THE_FLY
block_size=32
gather_min_bit_num={bits}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((args.vocab, args.hidden)) * 0.02).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["embed", "ids"], ["e"], axis=0)], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"])],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, "seq", args.hidden])],
                              [numpy_helper.from_array(table, "embed")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    models = {"float": model}
    for name, bits in (("6 bit block 64", 6), ("8 bit per row", 8), ("4 bit block 32", 0)):
        models[name] = convert(model, parse_config(CONFIG.format(bits=bits))).model
    sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, m in models.items()}
    print("| seq | " + " | ".join(sessions) + " |")
    print("|---|" + "---|" * len(sessions))
    for seq in (1, 32, 128):
        feed = {"ids": rng.integers(0, args.vocab, (1, seq)).astype(np.int64)}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(30):
            for name, s in sessions.items():
                start = time.perf_counter()
                for _ in range(10):
                    s.run(None, feed)
                times[name].append((time.perf_counter() - start) / 10 * 1e3)
        print(f"| {seq} | " + " | ".join(f"{np.median(t):.3f} ms" for t in times.values()) + " |")


if __name__ == "__main__":
    main()

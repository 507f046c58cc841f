"""What ONNX Runtime does with external data at unaligned offsets: a stack of 4 MatMuls (2048 x 2048 float32
weights, 64 MB) with each weight at a page boundary plus SKEW bytes of its data file, loaded in a fresh process with
and without prepacking (1 thread); the anonymous (allocated) and file-backed resident memory the session added, and
whether its output equals the prepacked session's on the page-aligned file.

    PYTHONPATH=src .venv/bin/python bench/unaligned_external.py [--skews 0,1,2,8,100] [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

_SESSION = """import sys, numpy as np, onnxruntime as ort
def status():
    values = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile"):
            values[key] = int(line.split()[1]) // 1024
    return values
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.log_severity_level = 3
if sys.argv[2] == "off":
    options.add_session_config_entry("session.disable_prepacking", "1")
before = status()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
out = session.run(None, {"x": np.linspace(-1, 1, 4 * 2048, dtype=np.float32).reshape(4, 2048)})[0]
after = status()
np.save(sys.argv[3], out)
print(after["RssAnon"] - before["RssAnon"], after["RssFile"] - before["RssFile"])
"""


def build(path: Path, skew: int, layers: int = 4, n: int = 2048) -> None:
    rng = np.random.default_rng(0)
    initializers, nodes, previous = [], [], "x"
    with open(path.with_name(path.name + ".data"), "wb") as data:
        for i in range(layers):
            weight = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
            offset = data.tell() + (-data.tell() % 4096) + skew
            data.write(b"\0" * (offset - data.tell()))
            data.write(weight.tobytes())
            tensor = onnx.TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=weight.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", path.name + ".data"), ("offset", str(offset)),
                               ("length", str(weight.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
            previous = f"h{i}"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["b", n])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skews", default="0,1,2,8,100")
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="unaligned-"))
    work.mkdir(parents=True, exist_ok=True)
    reference = None
    print(f"{'skew':>5} {'prepacking':>10} {'anonymous MB':>12} {'file-backed MB':>14}  output")
    for skew in (int(s) for s in args.skews.split(",")):
        path = work / f"skew{skew}.onnx"
        build(path, skew)
        for prepacking in ("on", "off"):
            result = work / f"skew{skew}-{prepacking}.npy"
            done = subprocess.run([sys.executable, "-c", _SESSION, str(path), prepacking, str(result)],
                                  capture_output=True, text=True, check=True)
            anonymous, file_backed = done.stdout.split()
            out = np.load(result)
            if reference is None:
                reference = out
            same = ("identical to the prepacked aligned session" if np.array_equal(out, reference) else
                    f"max abs difference {np.abs(out - reference).max():.2g} (max value {np.abs(reference).max():.2g})")
            print(f"{skew:>5} {prepacking:>10} {anonymous:>12} {file_backed:>14}  {same}", flush=True)


if __name__ == "__main__":
    main()

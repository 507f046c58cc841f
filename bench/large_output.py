"""Outputs over 2 GB: model.save_model on a 2.4 GB float model (nine 8192x8192 MatMul weights).

    PYTHONPATH=$PWD/src .venv/bin/python bench/large_output.py [--folder /tmp/large] [--keep]

Prints whether ModelProto.ByteSize() raises on the model (it does past 2 GB with current protobuf, which is why
the external-data decision uses summed tensor sizes), the time and peak memory of the save, the files written,
whether the caller's model is unchanged, and the largest difference between ONNX Runtime on the saved file and
numpy on the same weights. Needs about 6 GB of memory and 2.5 GB of disk.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ptqlite.model import EXTERNAL_DATA_THRESHOLD, save_model, stored_bytes, tensor_bytes

SIZE = 8192
LAYERS = 9


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights, nodes = [], []
    for i in range(LAYERS):
        w = (rng.standard_normal((SIZE, SIZE), dtype=np.float32) / np.sqrt(SIZE)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"W{i}"))
        del w
        nodes.append(helper.make_node("MatMul", [f"h{i}" if i else "x", f"W{i}"], [f"h{i + 1}" if i < LAYERS - 1
                                                                                  else "y"], name=f"mm{i}"))
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SIZE])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="leave the written files")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="ptqlite-large-"))
    folder.mkdir(parents=True, exist_ok=True)

    model = build()
    print(f"tensor bytes {tensor_bytes(model) / 1e9:.3f} GB (external data above "
          f"{EXTERNAL_DATA_THRESHOLD / 1e9:.3f} GB); peak after building {peak_mb():.0f} MB")
    try:
        model.ByteSize()
        print("ModelProto.ByteSize(): no error")
    except Exception as exc:  # noqa: BLE001 - what protobuf raises is the point
        print(f"ModelProto.ByteSize(): {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    fingerprint = [(t.name, len(t.raw_data)) for t in model.graph.initializer]

    before = peak_mb()
    started = time.perf_counter()
    path = save_model(model, folder / "large.onnx")
    seconds = time.perf_counter() - started
    print(f"save_model: {seconds:.1f} s, peak {peak_mb():.0f} MB (before the save {before:.0f} MB)")
    for file in sorted(folder.iterdir()):
        print(f"  {file.name}: {file.stat().st_size / 1e6:.1f} MB")
    print(f"  stored_bytes: {stored_bytes(path) / 1e6:.1f} MB")
    unchanged = [(t.name, len(t.raw_data)) for t in model.graph.initializer] == fingerprint and all(
        not t.external_data for t in model.graph.initializer)
    print(f"caller's model unchanged: {unchanged}")

    x = np.random.default_rng(1).standard_normal((1, SIZE)).astype(np.float32)
    reference = x
    for tensor in model.graph.initializer:
        reference = reference @ numpy_helper.to_array(tensor)
    del model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    print(f"ONNX Runtime on the saved file vs numpy: max |diff| {float(np.max(np.abs(got - reference))):.3g} "
          f"(output scale {float(np.max(np.abs(reference))):.3g})")
    if not args.keep:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

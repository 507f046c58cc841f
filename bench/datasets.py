"""Evaluation data from ../shared/bench, shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

SHARED = Path(__file__).resolve().parents[2] / "shared" / "bench"
CIFAR_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
CIFAR_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def cifar_data_section(calibrate_size: int = 100) -> str:
    """[data_preprocess_param] for the bundled ResNet20: its calibration images, normalised as CIFAR_MEAN/CIFAR_STD
    (in 0-255 units)."""
    folder = Path(__file__).resolve().parents[1] / "examples" / "calib" / "input"
    return (f"[data_preprocess_param]\ncalibrate_path=input:{folder}\ncalibrate_size={calibrate_size}\n"
            "input_type=IMAGE\nimage_to_format=RGB\nnormalize_mean=[123.675,116.28,103.53]\n"
            "normalize_std=[58.395,57.12,57.375]\n")


def cifar(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test copy as normalised NCHW float32 and int labels."""
    data = np.load(SHARED / "cifar10" / "test2000_uint8_nhwc.npz")
    x, y = data["x"][:limit], data["y"][:limit]
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return (x - CIFAR_MEAN) / CIFAR_STD, y


def top1(model_path: str, x: np.ndarray, y: np.ndarray, batch: int = 200, threads: int = 2,
         label_offset: int = 0, optimize: bool = True) -> float:
    """Top-1 accuracy in percent; `label_offset` is subtracted from the argmax (1 for a background class).
    optimize=False runs the graph as written: a QDQ model then computes in float, without int8 kernels."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    batch = fixed if isinstance(fixed, int) else batch  # models exported with a fixed batch size
    hits = 0
    for start in range(0, len(x), batch):
        logits = session.run(None, {name: x[start:start + batch]})[0]
        hits += int((logits.argmax(1) - label_offset == y[start:start + batch]).sum())
    return 100.0 * hits / len(x)

"""Quantize the bundled ResNet20 with each bundled config and compare it to the float model.

Run with `make demo`. Everything it reads is in examples/; outputs go to out/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
MODEL = HERE / "models" / "resnet20_cifar10.onnx"
OUT = HERE.parent / "out"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


# What each bundled config shows, printed before its result.
ABOUT = {
    "dynamic_quant": "DYNAMIC_QUANT (made for transformers): only this CNN's final Gemm has a MatMul/Gemm weight",
    "fixed_bit_weight_quant": "WEIGHT_QUANT 8 bit, the reference's example (convs of <= 16 channels stay float)",
    "full_quant": "FULL_QUANT int8 from the 100 bundled calibration PNGs",
    "mixed_bit_weight_quant": "WEIGHT_QUANT mixed bit (bit_num=0), the reference's example thresholds",
    "on_the_fly_weight_quant": "WEIGHT_QUANT 8 bit ON_THE_FLY: int8 weights stay in memory",
    "packed_4bit_weight_quant": "WEIGHT_QUANT 4 bit, bit-packed, decoded when ONNX Runtime loads the model",
}


def images() -> tuple[np.ndarray, np.ndarray]:
    """The bundled calibration PNGs as the model's NCHW input, and their labels (from the file names)."""
    files = sorted((HERE / "calib" / "input").glob("*.png"))
    rgb = np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files])
    x = ((rgb.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.array([int(f.stem.split("_")[1]) for f in files])


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def main() -> int:
    x, labels = images()
    reference = logits(MODEL, x)
    print(f"float model {MODEL.name}: top-1 on the {len(x)} bundled images {np.mean(reference.argmax(1) == labels):.1%}")
    for config in sorted((HERE / "configs").glob("*.cfg")):
        out = OUT / config.stem
        command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={MODEL}",
                   f"--outputFile={out}", f"--configFile={config}", "--quiet"]
        print(f"\n$ ptqlite convert --fmk=ONNX --modelFile={MODEL.relative_to(HERE.parent)} "
              f"--outputFile={out.relative_to(HERE.parent)} --configFile={config.relative_to(HERE.parent)}")
        if config.stem in ABOUT:
            print(f"  ({ABOUT[config.stem]})")
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout + done.stderr)
            return 1
        quantized = logits(out.with_suffix(".onnx"), x)
        cosine = np.sum(reference * quantized, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1))
        size = out.with_suffix(".onnx").stat().st_size / MODEL.stat().st_size
        print(f"  size {size:.3f}x float, top-1 {np.mean(quantized.argmax(1) == labels):.1%}, "
              f"mean output cosine {cosine.mean():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

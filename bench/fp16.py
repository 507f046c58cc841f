"""--fp16=on: file size and top-1 with and without float16 storage of the float parts a conversion leaves.

    PYTHONPATH=src .venv/bin/python bench/fp16.py [--model resnet20 mobilenet_v2] [--limit N]

For each model and mode, converts with the CLI twice (--fp16=off, --fp16=on) and measures the file size and top-1
(ResNet20: the 2000 CIFAR-10 test copies; MobileNet V2: the 400 ImageNet evaluation samples of bench/imagenet.py),
plus the output cosine between the two conversions. Modes where float parts stay: WEIGHT_QUANT 8 bit with the
default min_quant_weight_channel=16 (ResNet20's 16-channel convolutions stay float), DYNAMIC_QUANT (Conv weights
stay float: it quantizes MatMul/Gemm/Gather only).
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet
from datasets import SHARED, cifar, top1

from ptqlite.cli import main as ptqlite

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
MODES = {
    "WEIGHT_QUANT 8 bit": "quant_type=WEIGHT_QUANT\nbit_num=8\n",
    "DYNAMIC_QUANT": "quant_type=DYNAMIC_QUANT\n",
}


def model_path(name: str) -> Path:
    if name == "resnet20":
        return SHARED / "models" / "resnet20_cifar10.onnx"
    target = CACHE / "mobilenet_v2_1.0_224_from_qat_tflite.onnx"
    if not target.exists():
        CACHE.mkdir(exist_ok=True)
        with lzma.open(SHARED / "models" / (target.name + ".xz")) as src, open(target.with_suffix(".tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        target.with_suffix(".tmp").replace(target)
    return target


def data(name: str, limit: int | None):
    if name == "resnet20":
        x, y = cifar(limit)
        return x, y, 0
    x, y = imagenet.evaluation(limit)
    return x, y, imagenet.LABEL_OFFSET


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else 50
    return np.concatenate([session.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["resnet20", "mobilenet_v2"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    args = parser.parse_args()
    print("| model | mode | fp16 | file size (MB) | vs float | top-1 | output cosine on-vs-off |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model:
            source = model_path(name)
            x, y, offset = data(name, args.limit)
            float_mb = source.stat().st_size / 1e6
            print(f"| {name} | float | | {float_mb:.3f} | 1.000x | {top1(str(source), x, y, label_offset=offset):.2f} | |")
            for mode, text in MODES.items():
                config = Path(tmp) / "q.cfg"
                config.write_text("[common_quant_param]\n" + text)
                outputs = {}
                for fp16 in ("off", "on"):
                    out = Path(tmp) / f"{name}_{fp16}.onnx"
                    code = ptqlite(["--fmk=ONNX", f"--modelFile={source}", f"--outputFile={out}",
                                    f"--configFile={config}", f"--fp16={fp16}", "--quiet"])
                    assert code == 0, code
                    outputs[fp16] = out
                    mb = out.stat().st_size / 1e6
                    acc = top1(str(out), x, y, label_offset=offset)
                    agree = "" if fp16 == "off" else f"{cosine(logits(outputs['off'], x), logits(out, x)):.6f}"
                    print(f"| {name} | {mode} | {fp16} | {mb:.3f} | {mb / float_mb:.3f}x | {acc:.2f} | {agree} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

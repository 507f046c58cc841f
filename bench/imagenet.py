"""ImageNet sample images from ../shared/bench/imagenet-samples, prepared like the MobileNet models expect.

The directory holds 500 JPEG files named NNNN_nXXXXXXXX.jpg (short side 256, label = NNNN). Sorted by name,
the first 100 calibrate and the other 400 evaluate. Preprocessing follows ptqlite's IMAGE calibration with
center_crop_width/height=224 and normalize_mean/std=[127.5,127.5,127.5]: decode BGR -> RGB -> (x-127.5)/127.5
-> center crop at offsets ((W-224)//2, (H-224)//2), so the benchmark evaluates on exactly what ptqlite calibrates on.
The models output 1001 classes with index 0 = background: predicted label = argmax - 1.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "bench"
IMAGES = SHARED / "imagenet-samples"
CALIBRATION = 100
CROP = 224
MEAN = 127.5
STD = 127.5
# ptqlite config lines that reproduce `preprocess` (the bench writes them into [data_preprocess_param]).
CONFIG_LINES = (
    "input_type=IMAGE",
    "image_to_format=RGB",
    f"normalize_mean=[{MEAN},{MEAN},{MEAN}]",
    f"normalize_std=[{STD},{STD},{STD}]",
    f"center_crop_width={CROP}",
    f"center_crop_height={CROP}",
)
LABEL_OFFSET = 1  # logits index 0 is "background"


def files(directory: Path = IMAGES) -> list[Path]:
    """All sample images sorted byte-wise by name, as ptqlite sorts calibration files."""
    found = sorted(directory.glob("*.jpg"), key=lambda p: p.name.encode())
    if not found:
        raise FileNotFoundError(f"no .jpg files in {directory}")
    return found


def label(path: Path) -> int:
    return int(path.name.split("_", 1)[0])


def preprocess(path: Path, crop: int = CROP) -> np.ndarray:
    """One image as a float32 [3, crop, crop] RGB array scaled to [-1, 1]."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode {path}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    x = (rgb - np.float32(MEAN)) / np.float32(STD)
    height, width = x.shape[:2]
    top, left = (height - crop) // 2, (width - crop) // 2
    return np.ascontiguousarray(x[top:top + crop, left:left + crop].transpose(2, 0, 1))


def load(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """NCHW float32 batch and int labels for the given files."""
    x = np.stack([preprocess(p) for p in paths]) if paths else np.zeros((0, 3, CROP, CROP), np.float32)
    return x, np.array([label(p) for p in paths], np.int64)


def calibration_files(limit: int = CALIBRATION) -> list[Path]:
    return files()[:min(limit, CALIBRATION)]


def evaluation(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 400 evaluation images (after the calibration ones), or the first `limit` of them."""
    return load(files()[CALIBRATION:][:limit])

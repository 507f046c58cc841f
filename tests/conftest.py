"""Shared test helpers: paths to the bundled example and ../shared/bench, and small onnxruntime wrappers."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESNET20 = EXAMPLES / "models" / "resnet20_cifar10.onnx"
SHARED_BENCH = ROOT.parent / "shared" / "bench"
CACHE = ROOT / ".cache"


def shared_file(relative: str) -> Path:
    """A file of ../shared/bench, or skip the test when it is not there (users outside this workplace lack it)."""
    path = SHARED_BENCH / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/bench/{relative}, which is not present")
    if path.suffix == ".xz":
        target = CACHE / path.stem
        if not target.exists():
            CACHE.mkdir(exist_ok=True)
            tmp = target.with_suffix(".tmp")
            with lzma.open(path) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target)
        return target
    return path


def session(model: onnx.ModelProto | str | Path, optimized_path: Path | None = None, **options) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in options.items():
        setattr(so, key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(autouse=True)
def _fixed_int8_timing(monkeypatch):
    """Conversions in tests must not depend on how busy this machine is: FULL_QUANT's latency-aware planning sees
    the int8 graph at half of float's time (tests of that planning patch `measure` themselves)."""
    from ptqlite.passes.full import latency

    monkeypatch.setattr(latency, "measure", lambda *args, **kwargs: latency.Timing(1.0, 0.5))

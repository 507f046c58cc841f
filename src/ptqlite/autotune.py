"""auto_tune for mixed bit: the init_scale whose quantized model keeps output cosine similarity near 0.995.

The whole model's output is compared with the float model's on the user's calibration data when
[data_preprocess_param] is given; otherwise on seeded uniform [0.1, 1] inputs (the reference's choice, which
is not representative, so a note says so). The search is coarse then fine: starting at the configured
init_scale it doubles or halves until the target is bracketed, then bisects the bracket on a log scale. Each
evaluation (passes/mixed_bit.py, tune_init_scale) quantizes every layer at one init_scale and runs the substituted model in ONNX Runtime, so the
number of model evaluations is bounded by MAX_COARSE + MAX_FINE. A streaming conversion's model (or one over 2 GB)
is substituted in a MappedCandidate's data file instead, one weight at a time.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import onnx
from onnx import numpy_helper

from .config import QuantConfig
from .errors import DataError
from .model import iter_tensors
from .paths import write_error
from .runtime import REFERENCE_VALUES, cosine_similarity, cpu_session, model_input_specs, synthetic_inputs
from .stream import MIN_BYTES, is_external, read_array, release_pages

TARGET_COSINE = 0.995
TOLERANCE = 0.001  # the fine search stops once the cosine lies in [target, target + TOLERANCE]
MAX_COARSE = 8
MAX_FINE = 8
SCALE_LIMITS = (1e-4, 0.9)  # init_scale must stay in (0, 1)
RANDOM_SAMPLES = 4


_PURPOSE = "for auto_tune"
_DATA = "candidate.onnx.data"
_WHAT = "auto_tune's temp copy of the model (as large as the float model: set TMPDIR to a folder with room)"
_ALIGN = 4096  # page-aligned tensors: ONNX Runtime maps them in place
_CHUNK = 1 << 22  # values written at a time


class OutputComparer:
    """Float outputs on fixed inputs, computed once; scores candidate models against them. Models are in memory
    or files (MappedCandidate's); prepacking=False runs the sessions on weights mapped from the files' data."""

    def __init__(self, model: onnx.ModelProto | str, inputs: list[dict[str, np.ndarray]], prepacking: bool = True):
        self.inputs = inputs
        self.prepacking = prepacking
        session = cpu_session(model, _PURPOSE, prepacking=prepacking)
        self.reference = [session.run(None, feed) for feed in inputs]

    def __call__(self, candidate: onnx.ModelProto | str) -> float:
        """Mean over samples and outputs of the cosine similarity to the float outputs."""
        session = cpu_session(candidate, _PURPOSE, prepacking=self.prepacking)
        scores = [cosine_similarity(ref, out)
                  for feed, refs in zip(self.inputs, self.reference)
                  for ref, out in zip(refs, session.run(None, feed))]
        return float(np.mean(scores))


class MappedCandidate:
    """The model as a file for ONNX Runtime to map, whose chosen weights are rewritten in place for each candidate.

    In a temp folder: the graph, and one data file holding every tensor in external data and every weight in
    `rewritten` (page-aligned, so a session without prepacking reads them in place: file pages, not allocations).
    It starts with the float values; write() puts a candidate's values of a weight at the same offset. A
    streaming conversion's float model (weights read from memory maps of the input's data files) thus runs as
    each candidate without any copy of the model in memory. The folder goes when the block ends, also on a
    failure."""

    def __init__(self, model: onnx.ModelProto, rewritten: set[str]):
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="ptqlite-tune-"))
        except OSError as exc:
            raise write_error(Path(tempfile.gettempdir()), _WHAT, exc) from None
        self.path = self.folder / "candidate.onnx"
        self.slots: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        try:
            self.handle = open(self.folder / _DATA, "w+b")  # noqa: SIM115  (closed by close())
            skeleton = onnx.ModelProto()
            skeleton.CopyFrom(model)  # a streaming conversion's model holds no external tensor's data
            # the main graph's weights by identity (a body may hold a tensor of the same name); `main` keeps
            # their message objects alive, so iter_tensors meets the same ones
            main = list(skeleton.graph.initializer)
            initializers = {id(t) for t in main if t.name in rewritten}
            for tensor in iter_tensors(skeleton.graph):
                # inline tensors of MIN_BYTES or more too: the graph of a model over 2 GB must fit in one file
                if is_external(tensor) or id(tensor) in initializers or len(tensor.raw_data) >= MIN_BYTES:
                    self._move(tensor, id(tensor) in initializers)
            self.handle.flush()
            with open(self.path, "wb") as handle:
                handle.write(skeleton.SerializeToString())
        except OSError as exc:  # disk full, a read-only temp directory...
            self.close()
            raise write_error(self.folder, _WHAT, exc) from None
        except BaseException:
            self.close()
            raise

    def _move(self, tensor: onnx.TensorProto, kept: bool) -> None:
        """Append the tensor's values to the data file, a chunk at a time, and point its message there."""
        if is_external(tensor):
            values = read_array(tensor)
        elif kept:
            values = numpy_helper.to_array(tensor)
        else:  # any type: its bytes as they are
            values = np.frombuffer(tensor.raw_data, np.uint8)
        self.handle.seek(0, os.SEEK_END)
        self.handle.write(b"\0" * (-self.handle.tell() % _ALIGN))
        offset = self.handle.tell()
        self._put(values)
        if kept:
            self.slots[tensor.name] = (offset, values.dtype, values.shape)
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(name)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", _DATA), ("offset", str(offset)), ("length", str(values.nbytes))):
            tensor.external_data.add(key=key, value=value)

    def _put(self, values: np.ndarray) -> None:
        flat = values.reshape(-1)
        for at in range(0, flat.size, _CHUNK):
            self.handle.write(np.ascontiguousarray(flat[at:at + _CHUNK]).data)  # ONNX's byte order on little-endian hosts
            release_pages(flat, at, min(at + _CHUNK, flat.size))

    def write(self, name: str, values: np.ndarray) -> None:
        """A candidate's values of weight `name` (its shape; cast to its type) in place of the ones before."""
        offset, dtype, shape = self.slots[name]
        values = np.asarray(values)
        if values.shape != shape:
            raise ValueError(f"{name}: candidate values of shape {values.shape}, the weight has {shape}")
        try:
            self.handle.seek(offset)
            self._put(values.astype(dtype, copy=False))
            self.handle.flush()
        except OSError as exc:
            raise write_error(self.folder, _WHAT, exc) from None

    def close(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def random_inputs(model: onnx.ModelProto, samples: int = RANDOM_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Seeded uniform [0.1, 1] inputs shaped like the model's inputs (the reference's, unknown dims taken as 1)."""
    specs = model_input_specs(model)
    for spec in specs:
        if not np.issubdtype(spec.dtype, np.floating):
            raise DataError(f"auto_tune: input '{spec.name}' is {spec.dtype}, so random inputs cannot stand in "
                            "for data; give calibration data in [data_preprocess_param]")
    return synthetic_inputs(specs, REFERENCE_VALUES, samples)


def evaluation_inputs(model: onnx.ModelProto, config: QuantConfig, input_format: str | None,
                      samples=None) -> tuple[list[dict[str, np.ndarray]], str]:
    """The inputs auto_tune compares outputs on (in-memory `samples` first, then the calibration files), and a
    phrase saying what they are."""
    if samples is not None:
        inputs = list(samples)
        return inputs, f"{len(inputs)} in-memory calibration samples"
    if config.data.calibrate_path:
        from .data import calibration_set

        data = calibration_set(config, model, input_format)
        return list(data), f"{len(data)} calibration samples"
    return random_inputs(model), (f"{RANDOM_SAMPLES} seeded uniform [0.1, 1] random inputs, since no "
                                  "[data_preprocess_param] is given (not representative of real data)")


@dataclass
class TuneResult:
    init_scale: float
    cosine: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (init_scale, cosine), in order


def search_scale(evaluate: Callable[[float], float], start: float, target: float = TARGET_COSINE,
                 tolerance: float = TOLERANCE, max_coarse: int = MAX_COARSE,
                 max_fine: int = MAX_FINE) -> TuneResult:
    """The largest init_scale whose cosine is >= target: coarse (x2 or /2 steps), then fine (log bisection).

    `evaluate` maps init_scale to cosine, which falls as init_scale grows. If even the smallest scale tried
    misses the target, that smallest scale is returned.
    """
    lo_limit, hi_limit = SCALE_LIMITS
    history: list[tuple[float, float]] = []

    def score(scale: float) -> float:
        cosine = evaluate(scale)
        history.append((scale, cosine))
        return cosine

    def close(cosine: float) -> bool:
        return target <= cosine <= target + tolerance

    scale = min(max(start, lo_limit), hi_limit)
    cosine = score(scale)
    good, bad = (scale, math.inf) if cosine >= target else (0.0, scale)
    # Coarse: walk by factors of two until the target lies between a good and a bad scale.
    for _ in range(max_coarse - 1):
        if close(cosine) or (good > 0 and math.isfinite(bad)):
            break
        scale = min(good * 2, hi_limit) if cosine >= target else max(bad / 2, lo_limit)
        if scale in (good, bad):
            break  # at a limit
        cosine = score(scale)
        if cosine >= target:
            good = scale
        else:
            bad = scale
    # Fine: bisect between the good and the bad scale on a log scale.
    if good > 0 and math.isfinite(bad) and not close(cosine):
        for _ in range(max_fine):
            scale = math.sqrt(good * bad)
            cosine = score(scale)
            if cosine >= target:
                good = scale
            else:
                bad = scale
            if close(cosine):
                break
    if good > 0:
        return TuneResult(good, dict(history)[good], history)
    smallest = min(s for s, _ in history)
    return TuneResult(smallest, dict(history)[smallest], history)

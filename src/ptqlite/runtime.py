"""ONNX Runtime in one place: CPU sessions, probes that expose intermediate tensors, synthetic inputs, interleaved
timing and cosine similarity.

onnxruntime is imported when the first session is made, not with this module, so that commands that never run a
model (and the CLI's start) do not pay for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import ConversionError, DataError, ModelError
from .model import graph_inputs, iter_tensors, tensor_bytes, too_large_for_one_file, write_by_tensor
from .stream import has_external_data

if TYPE_CHECKING:
    import onnxruntime as ort


# ---------------------------------------------------------------- sessions


def _options(threads: int | None = None, spinning: bool = True, profile_prefix: str | None = None,
             optimize: bool = True, qdq_fusion: bool = True, prepacking: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # FATAL only: every error a session meets is raised to ptqlite, which reports it in its own words (or, when
    # the gate probes other shapes, expects it); the runtime's own log line would reach the terminal beside them.
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not qdq_fusion:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def cpu_session(model: onnx.ModelProto | str, purpose: str, spinning: bool = True,
                optimize: bool = True, threads: int | None = None, qdq_fusion: bool = True,
                prepacking: bool = True, constant_folding: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session on an in-memory model (or a model file, for models over 2 GB); a model it
    cannot load is a ConversionError naming `purpose` (e.g. "for calibration"). spinning=False keeps idle worker
    threads from taking the CPU that Python work between runs needs; optimize=False only loads (a load check);
    `threads` fixes the intra-op threads (onnxruntime's default otherwise); qdq_fusion=False runs
    QuantizeLinear/DequantizeLinear as written instead of fusing them into int8 kernels; prepacking=False keeps
    the kernels from copying constant weights into their packed layouts, so weights read from a memory-mapped
    external data file stay mapped (the gate's float model: verify.FloatPlan); constant_folding=False computes
    the values that depend on constants only on every run instead of once at load (the gate's output where its
    default load does not fit in memory: verify.too_large_to_load)."""
    import onnxruntime as ort

    staged = None
    if (isinstance(model, onnx.ModelProto) and FILE_LOAD_BYTES <= tensor_bytes(model)
            and not too_large_for_one_file(model) and not has_external_data(model, iter_tensors)):
        staged = _staged_file(model)  # written a tensor at a time: no serialisation of the whole model in memory
    if staged is not None:
        source = str(staged)
    else:
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        unfolded = {} if constant_folding else {"disabled_optimizers": ["ConstantFolding"]}
        return ort.InferenceSession(source, _options(threads, spinning=spinning, optimize=optimize,
                                                     qdq_fusion=qdq_fusion, prepacking=prepacking),
                                    providers=["CPUExecutionProvider"], **unfolded)
    except Exception as exc:  # noqa: BLE001  (onnxruntime raises several unrelated types)
        raise ConversionError(f"onnxruntime cannot load the model {purpose} ({exc})") from None
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)


# An in-memory model of FILE_LOAD_BYTES or more is given to onnxruntime as a temp file, not as bytes: from bytes
# it holds them, its parse of them and the initializers made from that parse at once (all-MiniLM-L6-v2, 90 MB:
# +268 MB RSS while loading, +191 MB after), from a file +145 / +130 MB (docs/results.md, "Conversion peak
# memory"). A model with external data stays bytes (its data paths are relative to where it came from).
FILE_LOAD_BYTES = 16 << 20


def temp_model_file(data: bytes | onnx.ModelProto, prefix: str) -> Path:
    """`data` (a serialised model, or a model, written a tensor at a time: model.write_by_tensor) in a new temp
    file named `prefix`...`.onnx` for ONNX Runtime or onnx to load; the caller removes it. OSError when it cannot
    be written, with nothing left behind."""
    import os
    import tempfile

    handle, name = tempfile.mkstemp(prefix=prefix, suffix=".onnx")
    path = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            if isinstance(data, onnx.ModelProto):
                write_by_tensor(data, file)
            else:
                file.write(data)
    except OSError as exc:
        path.unlink(missing_ok=True)
        exc.filename = exc.filename or name  # the caller's message names the file
        raise
    return path


def _staged_file(data: onnx.ModelProto) -> Path | None:
    """`data` in a new temp file (None when it cannot be written: the session then loads from its bytes)."""
    try:
        return temp_model_file(data, "ptqlite-session-")
    except OSError:
        return None


def file_session(path: Path, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session on a model file with `threads` intra-op threads (one inter-op thread), as the benchmark
    measures it; with `profile_prefix`, onnxruntime's profiler writes its trace there. A file it cannot load is a
    ModelError naming the file."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), _options(threads, profile_prefix=profile_prefix),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad model
        raise ModelError(f"{path}: onnxruntime cannot load the model ({str(exc).splitlines()[0]})") from None


def session_feeds(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of `feeds` that `session` takes as inputs."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the named values as graph outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    return probe


class Probe:
    """A session that returns the requested values of a model (initializers and graph inputs read directly)."""

    def __init__(self, model: onnx.ModelProto, names: Iterable[str], purpose: str, qdq_fusion: bool = True,
                 threads: int | None = None):
        self.constants = {t.name: t for t in model.graph.initializer}
        self.inputs = {i.name for i in model.graph.input} - set(self.constants)
        wanted = [n for n in names if n not in self.constants and n not in self.inputs]
        # Between runs the caller compares values in Python: spinning worker threads would only steal its CPU.
        self.session = cpu_session(with_outputs(model, wanted), purpose, spinning=False, qdq_fusion=qdq_fusion,
                                   threads=threads)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(zip(self.outputs, self.session.run(None, session_feeds(self.session, feeds)), strict=True))
        for name in self.inputs:
            if name in feeds:
                values[name] = feeds[name]
        return values

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return numpy_helper.to_array(tensor) if tensor is not None else None


# ---------------------------------------------------------------- synthetic inputs


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs of `model` (initializers excluded), unknown dimensions taken as 1, untyped ones as float."""
    specs = []
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.dim_value > 0 else 1 for d in tensor_type.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type or TensorProto.FLOAT)
        specs.append(InputSpec(value.name, shape, np.dtype(dtype)))
    return specs


@dataclass(frozen=True)
class SyntheticValues:
    """What synthetic inputs hold. One seeded generator draws the inputs in order, sample after sample."""

    seed: int
    float_range: tuple[float, float] | None  # floats uniform in [lo, hi); None: standard normal
    id_range: tuple[int, int] | None  # integer inputs uniform in [lo, hi); None: ones
    by_name: bool = False  # names say what an input holds: masks get ones, token types / segments zeros


# The reference's choice, for the debug reports, analyze and auto_tune (not representative of real data).
REFERENCE_VALUES = SyntheticValues(seed=0, float_range=(0.1, 1.0), id_range=None)
# The benchmark's: the vocabulary size is unknown, but every text model has at least 999 tokens (docs/benchmark.md).
BENCHMARK_VALUES = SyntheticValues(seed=20240601, float_range=None, id_range=(1, 1000), by_name=True)
MASK_WORDS = ("mask",)
ZERO_WORDS = ("token_type", "segment", "type_ids")


def synthetic_inputs(specs: Iterable[InputSpec], values: SyntheticValues = REFERENCE_VALUES,
                     count: int = 1) -> list[dict[str, np.ndarray]]:
    """`count` seeded samples shaped like `specs`; bools are ones."""
    specs = list(specs)
    rng = np.random.default_rng(values.seed)
    samples = []
    for _ in range(count):
        feeds = {}
        for spec in specs:
            name = spec.name.lower()
            if spec.dtype == np.bool_ or (values.by_name and any(w in name for w in MASK_WORDS)):
                feeds[spec.name] = np.ones(spec.shape, spec.dtype)
            elif np.issubdtype(spec.dtype, np.integer):
                if values.by_name and any(w in name for w in ZERO_WORDS):
                    feeds[spec.name] = np.zeros(spec.shape, spec.dtype)
                elif values.id_range is None:
                    feeds[spec.name] = np.ones(spec.shape, spec.dtype)
                else:
                    feeds[spec.name] = rng.integers(*values.id_range, size=spec.shape).astype(spec.dtype)
            elif not np.issubdtype(spec.dtype, np.floating):
                feeds[spec.name] = np.ones(spec.shape, spec.dtype)
            elif values.float_range is None:
                feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.uniform(*values.float_range, size=spec.shape).astype(spec.dtype)
        samples.append(feeds)
    return samples


# ---------------------------------------------------------------- timing and comparing


def time_interleaved(sessions, inputs: dict[str, np.ndarray], loops: int,
                     warmup: int) -> tuple[list, list[list[float]]]:
    """Outputs of each session and its per-run latencies in ms, the sessions taking turns run by run."""
    outputs = [None] * len(sessions)
    try:
        for i, session in enumerate(sessions):
            for _ in range(warmup):
                session.run(None, inputs)
            outputs[i] = session.run(None, inputs)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors for wrong input shapes or types
        raise _cannot_run(exc) from None
    latencies: list[list[float]] = [[] for _ in sessions]
    timed_turns(sessions, inputs, latencies, loops)
    return outputs, latencies


def timed_turns(sessions, inputs: dict[str, np.ndarray], latencies: list[list[float]], runs: int,
                stop: Callable[[list[list[float]]], bool] | None = None) -> None:
    """Time the sessions taking turns until each has `runs` latencies (ms) in `latencies` (the runs already
    there count, and the turns go on from them), or until `stop(latencies)` says so before a turn."""
    try:
        for loop in range(len(latencies[0]), runs):
            if stop is not None and stop(latencies):
                break
            # Alternate which model goes first, so neither always runs on a warmer cache.
            order = range(len(sessions)) if loop % 2 == 0 else reversed(range(len(sessions)))
            for i in order:
                start = time.perf_counter()
                sessions[i].run(None, inputs)
                latencies[i].append((time.perf_counter() - start) * 1000)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors for wrong input shapes or types
        raise _cannot_run(exc) from None


def _cannot_run(exc: Exception) -> DataError:
    return DataError(f"the model cannot run on the given inputs ({str(exc).splitlines()[0]})")


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine in float64. Both all-zero -> 1, exactly one all-zero -> 0, any NaN/Inf -> 0."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0.0
    # plain sums, not BLAS dot: BLAS threads only add overhead at these sizes on a busy machine
    na, nb = float(np.sqrt(np.sum(a * a))), float(np.sqrt(np.sum(b * b)))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.clip(np.sum(a * b) / (na * nb), -1.0, 1.0))

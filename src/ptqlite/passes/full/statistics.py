"""FULL_QUANT statistics: every stage declares what it needs of the calibration data as `StatRequest`s, and one
streaming pass of the samples through onnxruntime measures them all (docs/full_quant.md, "Calibration passes").

Kinds: "range" (an observer of [activation_quant_method] per tensor), "channel_max" (per-channel maximum, of |x|
with `magnitude`, along `axis`, with the number of values each maximum was taken over) and "channel_mean" (the
per-channel mean along axis 1 of each sample, summed over the samples: bias correction divides the difference of
two such sums by the sample count).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ...errors import DataError
from ...observers import fallback_notes, make_observer
from ...qmath import reduce_axes
from ...runtime import cpu_session, with_outputs

RANGE, CHANNEL_MAX, CHANNEL_MEAN = "range", "channel_max", "channel_mean"


@dataclass(frozen=True)
class StatRequest:
    tensor: str
    kind: str  # RANGE, CHANNEL_MAX or CHANNEL_MEAN
    method: str = "MAX_MIN"  # RANGE: the observer
    axis: int = 1  # CHANNEL_MAX / CHANNEL_MEAN: the channel axis
    magnitude: bool = False  # CHANNEL_MAX: of |x|


@dataclass(frozen=True)
class Statistics:
    samples: int  # how many calibration samples were measured
    ranges: dict[str, tuple[float, float]]
    channel_max: dict[str, np.ndarray]
    channel_counts: dict[str, int]  # values per channel behind each channel_max
    channel_mean_sums: dict[str, np.ndarray]
    notes: tuple[str, ...] = ()  # ranges of KL / REMOVAL_OUTLIER that fell back to MAX_MIN, counted per method


_kept: dict | None = None  # what reuse() keeps: (model digest, request) -> measurement, and callers' own keys


@contextmanager
def reuse() -> Iterator[None]:
    """Within the block collect() measures each request on each model once and keeps it (bias correction keeps its
    layer corrections the same way): for callers that convert one model with the same calibration samples many
    times, as analyze does. The samples must be the same throughout the block."""
    global _kept
    outer = _kept
    _kept = {} if outer is None else outer
    try:
        yield
    finally:
        _kept = outer


def kept() -> dict | None:
    """The store of the enclosing reuse() block, or None outside one."""
    return _kept


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha1(model.SerializeToString()).hexdigest()


def collect(model: onnx.ModelProto, requests: Iterable[StatRequest], samples, progress: bool | None,
            desc: str = "calibration") -> Statistics:
    """One pass over `samples` (dicts of model inputs) measuring every request on `model` (inside reuse(): only
    the requests not measured on this model before)."""
    requests = list(requests)
    store = _kept
    if store is None:
        return _assemble(*_measure(model, requests, samples, progress, desc), requests)
    digest = model_digest(model)
    missing = [r for r in requests if (digest, r) not in store]
    if missing:
        # Variants of a plan ask for the ranges of other tensors (a Conv's own output once the Clip after it
        # stays float): the pass that measures a range measures every float activation's, with the same
        # observer, so that later variants find theirs kept instead of each costing a pass over the samples.
        extra = [StatRequest(name, RANGE, method) for method in dict.fromkeys(r.method for r in missing
                                                                               if r.kind == RANGE)
                 for name in _activations(model) if (digest, StatRequest(name, RANGE, method)) not in store]
        count, measured = _measure(model, list(dict.fromkeys(missing + extra)), samples, progress, desc,
                                   optional=set(extra) - set(missing))
        store[digest, "samples"] = count
        store.update(((digest, r), value) for r, value in measured.items())
    return _assemble(store[digest, "samples"], {r: store[digest, r] for r in requests}, requests)


def _activations(model: onnx.ModelProto) -> list[str]:
    """The graph inputs and node outputs of the main graph (which of them are float shows when they are run)."""
    constants = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in constants]
    return names + [o for node in model.graph.node for o in node.output if o]


def _measure(model: onnx.ModelProto, requests: list[StatRequest], samples, progress: bool | None,
             desc: str, optional: set[StatRequest] = frozenset()) -> tuple[int, dict[StatRequest, object]]:
    """One pass: the sample count and, per request, its observer (RANGE), (peak, values per channel)
    (CHANNEL_MAX) or channel mean sum (CHANNEL_MEAN). `optional` RANGE requests are measured only on float
    tensors (left out of the result otherwise)."""
    inputs = {i.name for i in model.graph.input}
    names = list(dict.fromkeys(r.tensor for r in requests if r.tensor not in inputs))
    observers = {r.tensor: make_observer(r.method) for r in requests if r.kind == RANGE}
    peaks: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    sums: dict[str, np.ndarray | float] = {r.tensor: 0.0 for r in requests if r.kind == CHANNEL_MEAN}
    session = _probe_session(model, names) if names else None
    count = 0
    skipped: set[StatRequest] = set()
    for sample in _progress(samples, progress, desc):
        values = dict(zip(names, _run(session, names, sample))) if session else {}
        for request in requests:
            name = request.tensor
            value = sample[name] if name in inputs else values[name]
            if request in optional and not (isinstance(value, np.ndarray) and value.dtype == np.float32):
                skipped.add(request)
                continue
            if request.kind == RANGE:
                observers[name].update(value)
            elif request.kind == CHANNEL_MAX:
                axis = request.axis % value.ndim
                value = np.abs(value) if request.magnitude else value
                peak = value.max(axis=reduce_axes(value.ndim, axis))
                peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
                counts[name] = counts.get(name, 0) + value.size // max(1, value.shape[axis])
            else:
                sums[name] = sums[name] + value.astype(np.float64).mean(axis=reduce_axes(value.ndim, request.axis))
        count += 1
    if count == 0:
        raise DataError("no calibration samples: FULL_QUANT needs at least one")
    measured: dict[StatRequest, object] = {}
    for r in requests:
        if r in skipped:
            continue
        if r.kind == RANGE:
            measured[r] = observers[r.tensor]
        elif r.kind == CHANNEL_MAX:
            measured[r] = (peaks[r.tensor], counts[r.tensor])
        else:
            measured[r] = sums[r.tensor]
    return count, measured


def _assemble(count: int, measured: dict, requests: list[StatRequest]) -> Statistics:
    observers = {r.tensor: measured[r] for r in requests if r.kind == RANGE}
    ranges = {n: o.range() for n, o in observers.items()}
    methods = {r.tensor: r.method for r in requests if r.kind == RANGE}
    notes = [line for method in dict.fromkeys(methods.values())
             for line in fallback_notes(method, [o for n, o in observers.items() if methods[n] == method])]
    peaks = {r.tensor: measured[r][0] for r in requests if r.kind == CHANNEL_MAX}
    counts = {r.tensor: measured[r][1] for r in requests if r.kind == CHANNEL_MAX}
    sums = {r.tensor: measured[r] for r in requests if r.kind == CHANNEL_MEAN}
    return Statistics(count, ranges, peaks, counts, sums, tuple(notes))


def _probe_session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    """A session of `model` that also returns the named intermediate tensors. Between runs the observers work in
    Python: spinning worker threads would only steal their CPU time."""
    return cpu_session(with_outputs(model, outputs), "for calibration", spinning=False)


def _run(session: ort.InferenceSession, names: list[str], sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, sample)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises several unrelated types
        raise DataError(f"a calibration sample does not fit the model ({exc})") from None


def _progress(samples, progress: bool | None, desc: str):
    from ...progress import known_total
    from ...progress import progress as bar

    return bar(samples, total=known_total(samples), desc=desc, enabled=progress)

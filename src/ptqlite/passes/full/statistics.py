"""FULL_QUANT statistics: every stage declares what it needs of the calibration data as `StatRequest`s, and one
streaming pass of the samples through onnxruntime measures them all (docs/full_quant.md, "Calibration passes").

Kinds: "range" (an observer of [activation_quant_method] per tensor), "channel_max" (per-channel maximum, of |x|
with `magnitude`, along `axis`, with the number of values each maximum was taken over) and "channel_mean" (the
per-channel mean along axis 1 of each sample, summed over the samples: bias correction divides the difference of
two such sums by the sample count).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ...errors import DataError
from ...observers import fallback_notes, make_observer
from ...qmath import reduce_axes
from ...runtime import cpu_session

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


def collect(model: onnx.ModelProto, requests: Iterable[StatRequest], samples, progress: bool | None,
            desc: str = "calibration") -> Statistics:
    """One pass over `samples` (dicts of model inputs) measuring every request on `model`."""
    requests = list(requests)
    inputs = {i.name for i in model.graph.input}
    names = list(dict.fromkeys(r.tensor for r in requests if r.tensor not in inputs))
    observers = {r.tensor: make_observer(r.method) for r in requests if r.kind == RANGE}
    peaks: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    sums: dict[str, np.ndarray | float] = {r.tensor: 0.0 for r in requests if r.kind == CHANNEL_MEAN}
    session = _probe_session(model, names) if names else None
    count = 0
    for sample in _progress(samples, progress, desc):
        values = dict(zip(names, _run(session, names, sample))) if session else {}
        for request in requests:
            name = request.tensor
            value = sample[name] if name in inputs else values[name]
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
    ranges = {n: o.range() for n, o in observers.items()}
    methods = {r.tensor: r.method for r in requests if r.kind == RANGE}
    notes = [line for method in dict.fromkeys(methods.values())
             for line in fallback_notes(method, [o for n, o in observers.items() if methods[n] == method])]
    return Statistics(count, ranges, peaks, counts, sums, tuple(notes))


def _probe_session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    """A session of `model` that also returns the named intermediate tensors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs if n not in declared)
    # Between runs the observers work in Python: spinning worker threads would only steal their CPU time.
    return cpu_session(probe, "for calibration", spinning=False)


def _run(session: ort.InferenceSession, names: list[str], sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, sample)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises several unrelated types
        raise DataError(f"a calibration sample does not fit the model ({exc})") from None


def _progress(samples, progress: bool | None, desc: str):
    from ...data import progress as bar

    return bar(samples, total=len(samples) if hasattr(samples, "__len__") else None, desc=desc, enabled=progress)

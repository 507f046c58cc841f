"""FULL_QUANT statistics: every stage declares what it needs of the calibration data as `StatRequest`s, and one
streaming pass of the samples through onnxruntime measures them all (docs/full_quant.md, "Calibration passes").

Kinds: "range" (an observer of [activation_quant_method] per tensor), "channel_max" (per-channel maximum, of |x|
with `magnitude`, along `axis`, with the number of values each maximum was taken over) and "channel_mean" (the
per-channel mean along axis 1 of each sample, summed over the samples: bias correction divides the difference of
two such sums by the sample count).

MAX_MIN ranges and channel means of the requested tensors are reduced inside the probed graph (ReduceMin /
ReduceMax / ReduceSum, and a float64 ReduceMean), so that onnxruntime returns a few numbers per tensor instead of
every activation: returning whole tensors keeps each in its own buffer for the whole run, and copied into numpy,
which made calibration the peak of a conversion's memory and its numpy reductions a third of its time. The values
are the same: min and max are exact in any order, and a range whose tensor holds NaN or Inf on a sample (its
ReduceSum is not finite) is measured on the whole tensor of that sample, as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ...errors import ConversionError, DataError
from ...model import ProbeAdditions, opset_version
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
    session, outputs, reduced = _reducing_session(model, requests, names, inputs, optional) if names else \
        (None, [], {})
    full: ProbeOnDemand | None = None  # whole tensors of reduced ranges, for a sample where one holds NaN/Inf
    count = 0
    skipped: set[StatRequest] = set()
    for sample in _progress(samples, progress, desc):
        values = dict(zip(outputs, _run(session, outputs, sample))) if session else {}
        for request in requests:
            name = request.tensor
            if request in reduced:
                got = [values[n] for n in reduced[request]]
                if request.kind == CHANNEL_MEAN:
                    sums[name] = sums[name] + got[0]
                elif np.isfinite(got[2]):  # no NaN/Inf in the tensor: its min and max are the observer's
                    observers[name].update(np.stack(got[:2]))
                else:
                    full = full or ProbeOnDemand(model, [r.tensor for r in reduced if r.kind == RANGE])
                    observers[name].update(full.value(name, sample))
                continue
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
        if full is not None:
            full.forget()
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


def _reducible(request: StatRequest) -> bool:
    return (request.kind == RANGE and request.method == "MAX_MIN") or (request.kind == CHANNEL_MEAN
                                                                       and request.axis == 1)


def _reducing_session(model: onnx.ModelProto, requests: list[StatRequest], names: list[str], inputs: set[str],
                      optional: set[StatRequest]):
    """The probe session, the output names to fetch, and for each request reduced in the graph the names of its
    results: (min, max, sum) of a MAX_MIN range, the float64 per-channel mean of a channel mean. A tensor is
    reduced only when every request on it can be (the others need the whole tensor anyway) and it is not an
    optional request (those are measured only on the float tensors, which only the values tell)."""
    by_tensor: dict[str, list[StatRequest]] = {}
    for r in requests:
        by_tensor.setdefault(r.tensor, []).append(r)
    reducible = {name for name, rs in by_tensor.items() if name not in inputs
                 and all(_reducible(r) and r not in optional for r in rs)}
    whole = [n for n in names if n not in reducible]
    if reducible:
        probe = ProbeAdditions(model)
        reduced = _add_reductions(probe, opset_version(model), [r for r in requests if r.tensor in reducible])
        outputs = whole + [n for results in reduced.values() for n in results]
        try:
            return _probe_session(model, whole), outputs, reduced
        except ConversionError:  # a type the reduction ops lack: fetch every tensor whole, as onnxruntime can
            pass
        finally:
            probe.remove()
    return _probe_session(model, names), names, {}


def _add_reductions(probe: ProbeAdditions, opset: int, requests: list[StatRequest]) -> dict[StatRequest, list[str]]:
    """Reduction nodes appended by `probe` for each request, their results made graph outputs (the caller
    removes them again with probe.remove())."""
    node, const = probe.node, probe.const
    axes_input = opset >= 18  # ReduceMean/ReduceSum/... take axes as an input from opset 18
    reduced: dict[StatRequest, list[str]] = {}
    for r in requests:
        t = r.tensor
        if r.kind == RANGE:
            reduced[r] = [node(op, [t], f"{t}_calib_{op.lower()}", keepdims=0)
                          for op in ("ReduceMin", "ReduceMax", "ReduceSum")]
        else:  # the mean over every axis but 1, in float64 as numpy computed it: [N, C, rest] -> [C]
            wide = node("Cast", [t], f"{t}_calib_f64", to=onnx.TensorProto.DOUBLE)
            head = node("Slice", [node("Shape", [t], f"{t}_calib_shape"), const([0], f"{t}_calib_0"),
                                  const([2], f"{t}_calib_2")], f"{t}_calib_head")
            shape = node("Concat", [head, const([-1], f"{t}_calib_rest")], f"{t}_calib_nc", axis=0)
            flat = node("Reshape", [wide, shape], f"{t}_calib_flat")
            if axes_input:
                mean = node("ReduceMean", [flat, const([0, 2], f"{t}_calib_axes")], f"{t}_calib_mean", keepdims=0)
            else:
                mean = node("ReduceMean", [flat], f"{t}_calib_mean", axes=[0, 2], keepdims=0)
            reduced[r] = [mean]
    probe.outputs(n for names in reduced.values() for n in names)
    return reduced


class ProbeOnDemand:
    """Whole tensors of one sample, from a probe session made the first time one is asked for (a range whose
    reduction met NaN or Inf); one run per sample."""

    def __init__(self, model: onnx.ModelProto, names: list[str]):
        self.names = list(dict.fromkeys(names))
        self.session = _probe_session(model, self.names)
        self.values: dict[str, np.ndarray] | None = None

    def value(self, name: str, sample: dict[str, np.ndarray]) -> np.ndarray:
        if self.values is None:
            self.values = dict(zip(self.names, _run(self.session, self.names, sample)))
        return self.values[name]

    def forget(self) -> None:
        self.values = None


def _probe_session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    """A session of `model` that also returns the named intermediate tensors. Between runs the observers work in
    Python: spinning worker threads would only steal their CPU time. The outputs are added to `model` itself for
    as long as the session takes to load, then removed: a copy of the model would cost its size once more."""
    have = {o.name for o in model.graph.output}
    probe = ProbeAdditions(model)
    probe.outputs(n for n in dict.fromkeys(outputs) if n not in have)
    try:
        return cpu_session(model, "for calibration", spinning=False)
    finally:
        probe.remove()


def _run(session: ort.InferenceSession, names: list[str], sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, sample)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises several unrelated types
        raise DataError(f"a calibration sample does not fit the model ({exc})") from None


def _progress(samples, progress: bool | None, desc: str):
    from ...progress import known_total
    from ...progress import progress as bar

    return bar(samples, total=known_total(samples), desc=desc, enabled=progress)

"""Debug reports (debug_info_save_path): how far each tensor of the quantized model drifts from the float model.

Built only on what every quant mode produces: the float model, the quantized model, the ConversionResult and
some inputs. Both models run side by side on each input with their intermediate tensors exposed as extra outputs;
a float tensor is compared with what its first consumer reads in the quantized graph (the node with the same name
at the same input slot, e.g. the output of a DequantizeLinear), or else with the tensor of the same name.

Files written (docs/debugging.md explains how to read them):
- output_summary.csv: Round,TensorName,CosineSimilarity for every graph output of every round;
- round_<i>.csv: per tensor an Origin row then a Dequant row of statistics, one file per input sample, the
  reference's columns first, then the local error (the node that makes the tensor run alone on float inputs);
- quant_param.csv: the quantization parameters of every quantized tensor, one row per channel;
- report.html: per-tensor table sorted by local cosine, a plot of both cosines along the graph, a skip_quant_node
  suggestion, the plan, histograms of the worst tensors;
- notes.txt: where the inputs came from and anything the reader must know.
Rounds stream: one round's activations are in memory at a time and each round's CSV is written as it is done.
Per round, one instrumented run of the float model (with the local copies, local_error.py) and one of the
quantized model give every compared value; the quantized run also returns the 8-bit codes of each per-tensor
DequantizeLinear compared, whose histogram gives that tensor's row without sorting it.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import logging
import math
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .config import QuantConfig
from .errors import ConfigError, ConversionError
from .local_error import local_values
from .model import GraphIndex, constants_to_initializers, graph_inputs
from .report_plot import cosine_plot, histogram_svg
from .result import ConversionResult
from .runtime import (
    REFERENCE_VALUES,
    Probe,
    cosine_similarity,
    cpu_session,
    model_input_specs,
    session_feeds,
    synthetic_inputs,
)

log = logging.getLogger(__name__)

SUMMARY_HEADER = ("Round", "TensorName", "CosineSimilarity")
ROUND_HEADER = ("NodeName", "NodeType", "TensorName", "InOutFlag", "DataTypeFlag", "TensorTypeFlag", "Min", "Q1",
                "Median", "Q3", "Max", "Mean", "Var", "Sparsity", "Clip", "CosineSimilarity")
# After the reference's columns: the cosine of the tensor when only the node that makes it is quantized (run on
# the float model's values), and that node (the Conv for a Relu/Clip that FULL_QUANT folded into it).
LOCAL_HEADER = ("LocalCosineSimilarity", "LocalNodeName")
PARAM_HEADER = ("NodeName", "NodeType", "TensorName", "ElementsNum", "Dims", "Scale", "ZeroPoint", "Bits",
                "CorrectionVar", "CorrectionMean")
HISTOGRAM_LAYERS = 6
SUGGESTED_SKIPS = 3  # layers named in report.html's skip_quant_node suggestion
_HIST_BINS = 64
# The report's sessions run in one worker thread beside the comparisons (the other core): one intra-op thread
# each, so that neither waits for threads the other keeps busy.
_RUN_THREADS = 1
_PARALLEL_VALUES = 1 << 20  # a round with fewer float values than this is compared on one thread
_PURPOSE = "for the debug report"
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


# ---------------------------------------------------------------- numerics


def tensor_stats(x: np.ndarray) -> tuple[float, ...]:
    """Min, Q1, Median, Q3, Max, Mean, Var, Sparsity.

    Quartiles interpolate linearly between order statistics (numpy's default); Var is the population standard
    deviation, as the reference reports it under that name; Sparsity is the fraction of exact zeros.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return (float("nan"),) * 8
    quartiles = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return (*(float(v) for v in quartiles), float(x.mean()), float(x.std()), float(np.mean(x == 0)))


class Scratch:
    """Buffers reused from tensor to tensor by one thread's comparisons: a fresh array of a few MB per tensor
    costs more in page faults (the allocator hands large blocks back to the system) than the arithmetic on it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def take(self, role: str, size: int, dtype) -> np.ndarray:
        """A buffer of `size` elements of `dtype` for `role` (its content is whatever the last user left)."""
        key = (role, np.dtype(dtype))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[key] = np.empty(size, dtype)
        return buffer[:size]


def _quartiles(at, n: int) -> list[float]:
    """Q1, median, Q3 of n sorted values, `at(rank)` giving the value at a rank: numpy's "linear" method and its
    _lerp, in Python floats (float64)."""
    quartiles = []
    for q in (0.25, 0.5, 0.75):
        position = (n - 1) * q
        low = int(position)
        a, b = float(at(low)), float(at(min(low + 1, n - 1)))
        gamma = position - low
        quartiles.append(b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)
    return quartiles


# The variance from the sum of squares (one pass, no centred copy) is as accurate as the centred sum only when the
# mean is not large against the spread (its relative error grows with 1 + mean^2 / var): beyond this ratio the
# centred sum is taken.
_ONE_PASS_RATIO = 10.0
_PAIRED_CODES = 1 << 17  # code_histogram counts pairs of codes from this many codes up
# A dequantized tensor of fewer values is sorted: the histogram's fixed cost (256 levels, a few numpy calls) is
# more than the sort of a small tensor (ResNet20's activations, 3K-16K values).
_CODED_VALUES = 1 << 15


class _Flat:
    """A tensor flattened, in float64 and sorted (a float32 sort is several times faster than np.quantile's
    partition): what the statistics of its row need, computed once per round. With a Scratch, the float64 copy
    and the sorted values live in its buffers for `role` (valid until the next _Flat of that role). With
    sums=False (a tensor only compared by cosine) the sum is not taken and the values count as finite when the
    sum of their squares is."""

    __slots__ = ("_finite", "_norm2", "_ordered", "_role", "_scratch", "_total", "raw", "wide")

    def __init__(self, x: np.ndarray, scratch: Scratch | None = None, role: str = "", sums: bool = True):
        self.raw = np.asarray(x).ravel()
        self._scratch, self._role = scratch, role
        if scratch is None:
            self.wide = self.raw.astype(np.float64)
        else:
            self.wide = scratch.take(role + "/wide", self.raw.size, np.float64)
            np.copyto(self.wide, self.raw)
        self._ordered: np.ndarray | None = None
        self._norm2: float | None = None
        self._total: float | None = None
        self._finite: bool | None = None
        if sums:
            self._total = float(self.wide.sum()) if self.raw.size else 0.0
            self._finite = self.raw.size > 0 and math.isfinite(self._total)  # a finite sum: no NaN/Inf

    @property
    def finite(self) -> bool:
        """No NaN/Inf among the values (and at least one value)."""
        if self._finite is None:
            self._finite = self.raw.size > 0 and math.isfinite(self.norm2())
        return self._finite

    @property
    def ordered(self) -> np.ndarray | None:
        """The values sorted (None when some are NaN/Inf)."""
        if self._ordered is None and self.finite:
            if self._scratch is None:
                self._ordered = np.sort(self.raw)
            else:  # np.sort is this: a copy sorted in place
                self._ordered = self._scratch.take(self._role + "/sorted", self.raw.size, self.raw.dtype)
                np.copyto(self._ordered, self.raw)
                self._ordered.sort()
        return self._ordered

    def _centred(self, mean: float) -> np.ndarray:
        if self._scratch is None:
            return self.wide - mean
        return np.subtract(self.wide, mean, out=self._scratch.take("centred", self.wide.size, np.float64))

    def _variance(self, mean: float) -> float:
        n = self.wide.size
        spread = self.norm2() / n - mean * mean
        if spread > 0 and mean * mean <= _ONE_PASS_RATIO * spread:
            return spread
        centred = self._centred(mean)
        return float(np.einsum("i,i->", centred, centred)) / n

    def stats(self) -> tuple[float, ...]:
        """tensor_stats(x), the same numbers (quartiles interpolated as numpy's default, sums in float64)."""
        s = self.ordered
        if s is None or self._total is None:
            return tensor_stats(self.raw)
        n = s.size
        mean = self._total / n  # the sum the finiteness check took
        zero = s.dtype.type(0)  # a key of another type (a Python 0) would make numpy cast the whole array first
        zeros = int(s.searchsorted(zero, "right") - s.searchsorted(zero, "left"))
        return (float(s[0]), *_quartiles(s.__getitem__, n), float(s[-1]), float(mean),
                float(np.sqrt(self._variance(mean))), zeros / n)

    def bounds(self) -> tuple[np.generic, np.generic]:
        """The smallest and the largest value (of the tensor's dtype); the tensor is finite."""
        s = self.ordered
        return s[0], s[-1]

    def below(self, edges: np.ndarray) -> np.ndarray:
        """How many values lie below each edge (edges in the tensor's dtype); the tensor is finite."""
        return self.ordered.searchsorted(edges, "left")

    def clip(self, dequant: _Flat | _Levels) -> float:
        """clip_rate(self, dequant) from the sorted values."""
        s = self.ordered
        if s is None or not dequant.finite or s.dtype != dequant.raw.dtype:
            return clip_rate(self.raw, dequant.raw)
        lo, hi = dequant.bounds()
        outside = s.searchsorted(lo, "left") + s.size - s.searchsorted(hi, "right")
        return float(outside / s.size)

    def histogram(self, dequant: _Flat | _Levels) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Bin edges over both value ranges and the counts of each side, from the sorted values."""
        s = self.ordered
        if s is None or not dequant.finite:
            return _histogram(self.raw, dequant.raw)
        d_lo, d_hi = dequant.bounds()
        lo, hi = min(float(s[0]), float(d_lo)), max(float(s[-1]), float(d_hi))
        edges = np.linspace(lo, hi, _HIST_BINS + 1) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, _HIST_BINS + 1)

        def counts(side: _Flat | _Levels) -> np.ndarray:
            cuts = side.below(edges.astype(side.raw.dtype))
            cuts[-1] = side.raw.size  # the last bin holds its right edge
            return np.diff(cuts)

        return edges, counts(self), counts(dequant)

    def norm2(self) -> float:
        if self._norm2 is None:
            self._norm2 = float(np.einsum("i,i->", self.wide, self.wide))
        return self._norm2

    def cosine(self, other: _Flat | _Levels) -> float:
        """cosine_similarity(self, other) with float64 sums of products (einsum: BLAS dot threads only add overhead on a busy machine)."""
        if not (self.finite and other.finite) or self.raw.size != other.raw.size:
            return cosine_similarity(self.raw, other.raw)
        na, nb = self.norm2(), other.norm2()
        if na == 0.0 or nb == 0.0:
            return 1.0 if na == nb else 0.0
        # Python floats: numpy's scalar ufuncs cost microseconds a call (ResNet20 compares 58 tensors a round)
        return min(max(float(np.einsum("i,i->", self.wide, other.wide)) / math.sqrt(na * nb), -1.0), 1.0)


@dataclass(frozen=True)
class CodeLevels:
    """What a per-tensor 8-bit DequantizeLinear maps each code to, in ascending order of value: `order[i]` is the
    code (as uint8) of the i-th smallest level, `values[i]` its value (float32)."""

    order: np.ndarray
    values: np.ndarray
    wide: np.ndarray = field(init=False, repr=False)  # values in float64
    squares: np.ndarray = field(init=False, repr=False)  # their squares in float64
    zeros: np.ndarray = field(init=False, repr=False)  # which levels are 0

    def __post_init__(self) -> None:
        wide = self.values.astype(np.float64)
        object.__setattr__(self, "wide", wide)
        object.__setattr__(self, "squares", wide * wide)
        object.__setattr__(self, "zeros", self.values == 0)

    @staticmethod
    def of(scale: np.ndarray, zero_point: np.ndarray) -> CodeLevels | None:
        """The levels of DequantizeLinear(codes, scale, zero_point), computed as onnxruntime does,
        (float)(code - zero_point) * scale; None when the quantizer is not per tensor, not 8-bit or not finite."""
        if scale.size != 1 or zero_point.size != 1 or scale.dtype != np.float32:
            return None
        if zero_point.dtype not in (np.uint8, np.int8) or not np.isfinite(scale).all():
            return None
        codes = np.arange(256, dtype=np.uint8).view(zero_point.dtype)
        levels = (codes.astype(np.int32) - np.int32(zero_point.item())).astype(np.float32) * scale.reshape(())
        if not np.isfinite(levels).all():
            return None
        order = np.argsort(levels, kind="stable")
        return CodeLevels(order, levels[order])

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """The dequantized values of `codes` (for checking them against the runtime's)."""
        table = np.empty(256, np.float32)
        table[self.order] = self.values
        return table[np.asarray(codes).reshape(-1).view(np.uint8)]


def code_histogram(codes: np.ndarray, scratch: Scratch | None = None) -> np.ndarray:
    """np.bincount(codes, minlength=256) of 8-bit codes, counted two at a time: the histogram of the codes'
    pairs (as uint16) summed over each position. One increment per two codes is about a quarter faster than one
    per code, where runs of the same code (a ReLU's zeros) make every increment wait for the one before."""
    if codes.size < _PAIRED_CODES:  # summing the pairs' table costs more than it saves
        return np.bincount(codes, minlength=256)
    half = codes.size // 2
    pairs = codes[:2 * half].view(np.uint16)
    if scratch is not None:  # np.bincount counts intp: cast into a kept buffer rather than a fresh array
        wide = scratch.take("pairs", half, np.intp)
        np.copyto(wide, pairs)
        pairs = wide
    table = np.bincount(pairs, minlength=1 << 16).reshape(256, 256)
    counts = table.sum(axis=0) + table.sum(axis=1)
    if codes.size % 2:
        counts[codes[-1]] += 1
    return counts


class _Levels:
    """A dequantized tensor given with its 8-bit codes: the statistics of its row from the histogram of the codes
    (np.bincount, no sort), the same elements as the sort would pick; the float64 copy only for the dot product
    with the float tensor. Mean, Var and the sum of squares are sums over the 256 levels (same values as summing
    the elements, up to the last bits of float64)."""

    __slots__ = ("_cumulative", "_norm2", "counts", "finite", "levels", "raw", "wide")

    def __init__(self, dequant: np.ndarray, codes: np.ndarray, levels: CodeLevels, scratch: Scratch | None = None,
                 role: str = ""):
        self.raw = np.asarray(dequant).ravel()
        self.levels = levels
        self.counts = code_histogram(np.asarray(codes).reshape(-1).view(np.uint8), scratch)[levels.order]
        self._cumulative = np.cumsum(self.counts)
        self.finite = self.raw.size > 0  # every level is finite
        if scratch is None:
            self.wide = self.raw.astype(np.float64)
        else:
            self.wide = scratch.take(role + "/wide", self.raw.size, np.float64)
            np.copyto(self.wide, self.raw)
        self._norm2: float | None = None

    def _at(self, rank: int) -> np.generic:
        """The value at `rank` of the values sorted."""
        return self.levels.values[int(self._cumulative.searchsorted(rank, "right"))]

    def stats(self) -> tuple[float, ...]:
        n = self.raw.size
        mean = float(self.counts @ self.levels.wide) / n
        centred = self.levels.wide - mean
        variance = float(self.counts @ (centred * centred)) / n
        zeros = int(self.counts[self.levels.zeros].sum())
        return (float(self._at(0)), *_quartiles(self._at, n), float(self._at(n - 1)), mean, float(np.sqrt(variance)),
                zeros / n)

    def bounds(self) -> tuple[np.generic, np.generic]:
        return self._at(0), self._at(self.raw.size - 1)

    def below(self, edges: np.ndarray) -> np.ndarray:
        before = np.concatenate(([0], self._cumulative))
        return before[self.levels.values.searchsorted(edges, "left")]

    def norm2(self) -> float:
        if self._norm2 is None:
            self._norm2 = float(self.counts @ self.levels.squares)
        return self._norm2


def clip_rate(origin: np.ndarray, dequant: np.ndarray) -> float:
    """Fraction of origin values outside [min(dequant), max(dequant)]."""
    origin = np.asarray(origin, dtype=np.float64).ravel()
    dequant = np.asarray(dequant, dtype=np.float64).ravel()
    if origin.size == 0 or dequant.size == 0:
        return 0.0
    lo, hi = dequant.min(), dequant.max()
    return float(np.mean((origin < lo) | (origin > hi)))


def _fmt(value: float) -> str:
    return f"{value:.9g}"


# ---------------------------------------------------------------- inputs


_LOW, _HIGH = REFERENCE_VALUES.float_range
SYNTHETIC_NOTE = ("the config has no calibration data, so the comparison runs on one synthetic "
                  f"input (floats uniform in [{_LOW}, {_HIGH}], seed {REFERENCE_VALUES.seed}; "
                  "integer inputs 1); it may not represent real data")


def report_inputs(model: onnx.ModelProto, config: QuantConfig, input_format: str | None = None,
                  notes: list[str] | None = None) -> Iterable[dict[str, np.ndarray]]:
    """The samples the debug report runs on: the calibration set when the config has one (one round per sample),
    else one synthetic sample (and a note saying so appended to `notes`)."""
    # Imported here so that OpenCV loads only when a report is asked for.
    from .data import calibration_set, has_calibration_data

    if has_calibration_data(config):
        return calibration_set(config, model, input_format)
    if notes is not None:
        notes.append(SYNTHETIC_NOTE)
    return synthetic_inputs(model_input_specs(model), REFERENCE_VALUES)


# ---------------------------------------------------------------- which tensors are compared


@dataclass
class _Entry:
    node: str
    op_type: str
    tensor: str  # name in the float graph
    inout: str  # "Input" / "Output"
    kind: str  # "Weight" / "Activation"
    counterpart: str  # name of the value to compare with in the quantized graph
    # (scale, offset) that map the counterpart back to the float value (smoothing, MatMul/Gather weight codes)
    value_map: tuple[np.ndarray, np.ndarray | None] | None = None
    # accumulated over rounds for the HTML table
    cos_sum: float = 0.0
    cos_min: float = 1.0
    clip_sum: float = 0.0
    rounds: int = 0
    histogram: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # edges, origin counts, dequant counts
    local: str | None = None  # the local value's name in the float model with local copies
    local_node: str = ""  # the quantized graph's node that runs alone for it
    local_sum: float = 0.0
    local_rounds: int = 0
    # the counterpart's 8-bit codes (the input of its per-tensor DequantizeLinear) and what they decode to: its
    # statistics then come from a histogram of the codes; dropped when round 0's codes do not decode to it exactly
    codes: str | None = None
    levels: CodeLevels | None = None
    levels_checked: bool = False

    def add(self, cos: float, clip: float, local: float | None) -> None:
        self.cos_sum += cos
        self.cos_min = min(self.cos_min, cos)
        self.clip_sum += clip
        self.rounds += 1
        if local is not None:
            self.local_sum += local
            self.local_rounds += 1

    @property
    def mean_cos(self) -> float:
        return self.cos_sum / self.rounds if self.rounds else float("nan")

    @property
    def mean_local(self) -> float:
        return self.local_sum / self.local_rounds if self.local_rounds else float("nan")


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value that shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 -- any failure only means types are checked at run time instead
        inferred = model
    graph = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)
            if v.type.tensor_type.elem_type}


def _plan_entries(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                  result: ConversionResult) -> list[_Entry]:
    """One entry per tensor, in graph order: quantized weights as the Input of the node that reads them, graph
    inputs as the Input of their first consumer, every other activation as the Output of the node making it."""
    graph = float_model.graph
    index = GraphIndex(graph)
    quant_nodes: dict[str, onnx.NodeProto] = {}
    for node in quant_model.graph.node:
        if node.name:
            quant_nodes.setdefault(node.name, node)
    quant_values = {t.name for t in quant_model.graph.initializer} | {i.name for i in quant_model.graph.input}
    quant_values |= {o for n in quant_model.graph.node for o in n.output}
    types = _float_types(float_model)

    def counterpart(tensor: str) -> tuple[str | None, np.ndarray | None]:
        for node, slot in index.consumers.get(tensor, []):
            twin = quant_nodes.get(node.name) if node.name else None
            if twin is not None and slot < len(twin.input) and twin.input[slot]:
                return twin.input[slot], result.input_maps.get((node.name, slot))
        return (tensor if tensor in quant_values else None), None

    def is_float(tensor: str) -> bool:
        return types.get(tensor, TensorProto.FLOAT) in _FLOAT_TYPES

    entries: list[_Entry] = []
    weights = {q.tensor for q in result.quantized if q.tensor in index.initializers}
    for value in graph_inputs(float_model):
        users = index.consumers.get(value.name)
        twin, value_map = counterpart(value.name)
        if users and twin and is_float(value.name):
            entries.append(_Entry(users[0][0].name, users[0][0].op_type, value.name, "Input", "Activation", twin,
                                  value_map))
    for node in graph.node:
        for name in node.input:
            if name in weights:
                twin, value_map = counterpart(name)
                weights.discard(name)
                if twin:
                    entries.append(_Entry(node.name, node.op_type, name, "Input", "Weight", twin, value_map))
        for name in node.output:
            twin, value_map = counterpart(name) if name else (None, None)
            if twin and is_float(name):
                entries.append(_Entry(node.name, node.op_type, name, "Output", "Activation", twin, value_map))
    return entries


def _static_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """The number of elements of every value whose shape inference gives a static shape."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 -- any failure only means sizes are checked at run time instead
        return {}
    graph = inferred.graph
    sizes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        shape = value.type.tensor_type.shape
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in shape.dim):
            sizes[value.name] = int(np.prod([d.dim_value for d in shape.dim]))
    return sizes


def _find_codes(quant_model: onnx.ModelProto, entries: list[_Entry]) -> None:
    """Give each activation entry whose counterpart a per-tensor 8-bit DequantizeLinear makes (scale and zero
    point constant) the name of that node's codes and their levels."""
    graph = quant_model.graph
    constants = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output if o}
    sizes = _static_sizes(quant_model)
    for entry in entries:
        node = producer.get(entry.counterpart)
        if (entry.kind != "Activation" or entry.value_map is not None or node is None
                or sizes.get(entry.counterpart, _CODED_VALUES) < _CODED_VALUES
                or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) < 3
                or node.input[1] not in constants or node.input[2] not in constants):
            continue
        levels = CodeLevels.of(numpy_helper.to_array(constants[node.input[1]]),
                               numpy_helper.to_array(constants[node.input[2]]))
        if levels is not None:
            entry.codes, entry.levels = node.input[0], levels


# ---------------------------------------------------------------- writing


@dataclass
class DebugReport:
    """What write_reports produced: the files, and per-tensor cosines for callers that rank layers."""

    folder: Path
    rounds: int = 0
    files: list[Path] = field(default_factory=list)
    output_cosines: list[tuple[int, str, float]] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)


def write_reports(folder: str | Path, float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                  result: ConversionResult, inputs: Iterable[dict[str, np.ndarray]],
                  notes: Iterable[str] = (), progress: bool | None = None) -> DebugReport:
    """Write output_summary.csv, round_<i>.csv, quant_param.csv, report.html and notes.txt into `folder`;
    `progress` shows a bar over the rounds (None: on a terminal)."""
    from .progress import known_total, progress_bar

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"debug_info_save_path={folder}: cannot create the folder ({exc.strerror})") from None
    for stale in folder.glob("round_*.csv"):  # rounds of an earlier, longer run would look like this run's
        if re.fullmatch(r"round_\d+\.csv", stale.name):
            stale.unlink()
    reference = onnx.ModelProto()
    reference.CopyFrom(float_model)
    constants_to_initializers(reference)  # weights exported as Constant nodes compare like initializers
    entries = _plan_entries(reference, quant_model, result)
    _find_codes(quant_model, entries)
    report = DebugReport(folder, entries=entries)
    output_names = [o.name for o in reference.graph.output]
    float_probe, local_note = _float_probe(reference, quant_model, entries, output_names)
    if local_note:
        notes = [*notes, local_note]
    # QuantizeLinear/DequantizeLinear computed as written (no int8 kernels): the local copies then see the same
    # arithmetic as the exposed quantized graph, whatever int8 instructions this CPU has.
    quant_probe = Probe(quant_model, [e.counterpart for e in entries] + [e.codes for e in entries if e.codes],
                        _PURPOSE, qdq_fusion=False, threads=_RUN_THREADS)
    # Exposing intermediate tensors can stop the runtime from fusing quantized kernels, so a graph with
    # quantized ops also runs as is for output_summary.csv: the outputs as users will see them.
    quant_session = (cpu_session(quant_model, _PURPOSE, spinning=False, threads=_RUN_THREADS)
                     if _has_quantized_ops(quant_model) else None)
    want_histograms = HISTOGRAM_LAYERS > 0
    weight_rows: dict[int, tuple[list[str], list[str], float, float]] = {}
    samples = iter(inputs)
    scratches = (Scratch(), Scratch())  # one per comparing thread, kept from round to round

    def next_round() -> tuple[dict, dict, dict] | None:
        """The next sample read and run through the three sessions (None when there is none left)."""
        feeds = next(samples, None)
        if feeds is None:
            return None
        float_values = float_probe.run(feeds)
        quant_values = quant_probe.run(feeds)
        plain = quant_values
        if quant_session is not None:
            plain = dict(zip([o.name for o in quant_session.get_outputs()],
                             quant_session.run(None, session_feeds(quant_session, feeds)), strict=True))
        return float_values, quant_values, plain

    summary_path = folder / "output_summary.csv"
    # The sessions run round i+1 in a worker thread while this one compares the values of round i (onnxruntime
    # and numpy's sorts and sums release the GIL): two rounds' values are in memory at a time.
    rounds = known_total(inputs)
    with (open(summary_path, "w", newline="") as summary_file, ThreadPoolExecutor(1) as worker,
          ThreadPoolExecutor(1) as comparing,
          progress_bar(rounds, "debug reports", progress, unit="round") as bar):
        summary = csv.writer(summary_file, lineterminator="\n")
        summary.writerow(SUMMARY_HEADER)
        pending = worker.submit(next_round)
        for index in itertools.count():
            values = pending.result()
            if values is None:
                break
            pending = worker.submit(next_round)
            float_values, quant_values, plain = values
            for name in output_names:
                origin = float_values.get(name, float_probe.constant(name))
                result_value = plain.get(name, quant_probe.constant(name))
                cos = cosine_similarity(origin, result_value) if origin is not None and result_value is not None else 0.0
                summary.writerow((index, name, _fmt(cos)))
                report.output_cosines.append((index, name, cos))
            path = folder / f"round_{index}.csv"
            _write_round(path, entries, float_probe, quant_probe, float_values, quant_values, weight_rows,
                         want_histograms and index == 0, comparing, scratches)
            report.files.append(path)
            report.rounds += 1
            bar.update(1)
            del values, float_values, quant_values, plain
    report.files.insert(0, summary_path)
    report.files.append(_write_params(folder / "quant_param.csv", result))
    notes = list(notes)
    notes += [n for n in result.notes if n not in notes]
    report.files.append(_write_notes(folder / "notes.txt", report, notes))
    report.files.append(_write_html(folder / "report.html", report, result, notes))
    return report


def _float_probe(reference: onnx.ModelProto, quant_model: onnx.ModelProto, entries: list[_Entry],
                 output_names: list[str]) -> tuple[Probe, str | None]:
    """One probe of the float model that also computes each activation's local value (entries get its name),
    or, when that model cannot be built or loaded, of the float model alone and a note saying why."""
    wanted = [e.tensor for e in entries if e.kind == "Activation"] + output_names
    try:
        local = local_values(reference, quant_model, [e.counterpart for e in entries if e.kind == "Activation"])
        probe = Probe(local.model, wanted + list(local.names.values()), _PURPOSE, qdq_fusion=False,
                      threads=_RUN_THREADS)
    except ConversionError as exc:
        return Probe(reference, wanted, _PURPOSE, threads=_RUN_THREADS), f"no local error columns: {exc}"
    for entry in entries:
        if entry.kind == "Activation" and entry.counterpart in local.names:
            entry.local = local.names[entry.counterpart]
            entry.local_node = local.nodes[entry.counterpart] or entry.node
    return probe, None


def _has_quantized_ops(model: onnx.ModelProto) -> bool:
    return any("Quantize" in n.op_type or "Integer" in n.op_type or n.op_type.startswith("QLinear")
               or n.domain not in ("", "ai.onnx") for n in model.graph.node)


def _write_round(path: Path, entries: list[_Entry], float_probe: Probe, quant_probe: Probe,
                 float_values: dict, quant_values: dict, weight_rows: dict, histograms: bool,
                 pool: ThreadPoolExecutor, scratches: tuple[Scratch, Scratch]) -> None:
    def compare(numbers: list[int], scratch: Scratch) -> list:
        return [_compare(n, entries[n], float_probe, quant_probe, float_values, quant_values, weight_rows,
                         histograms, scratch) for n in numbers]

    # Two shares of about the same number of values: one compared on the pool's thread, one here (numpy's sorts
    # and sums release the GIL); a round of small tensors is compared here alone (threads would only add
    # overhead). Rows are written in graph order.
    sizes = [_size(n, e, float_probe, float_values, weight_rows) for n, e in enumerate(entries)]
    shares: tuple[list[int], list[int]] = ([], [])
    loads = [0, 0]
    parallel = sum(sizes) >= _PARALLEL_VALUES
    for n in sorted(range(len(entries)), key=lambda n: -sizes[n]):
        side = 1 if parallel and loads[1] < loads[0] else 0
        shares[side].append(n)
        loads[side] += sizes[n]
    other = pool.submit(compare, shares[1], scratches[1]) if shares[1] else None
    results = dict(zip(shares[0], compare(shares[0], scratches[0]), strict=True))
    if other is not None:
        results.update(zip(shares[1], other.result(), strict=True))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(ROUND_HEADER + LOCAL_HEADER)
        for number, entry in enumerate(entries):
            compared = results[number]
            if compared is None:
                continue
            origin_row, dequant_row, cos, clip, local_cos = compared
            writer.writerow(origin_row)
            writer.writerow([*dequant_row[:-2], _fmt(local_cos) if local_cos is not None else "", dequant_row[-1]])
            entry.add(cos, clip, local_cos)


def _size(number: int, entry: _Entry, float_probe: Probe, float_values: dict, weight_rows: dict) -> int:
    """How many values comparing the entry reads (0 for a weight whose rows are kept from round 0)."""
    if entry.kind == "Weight":
        if number in weight_rows:
            return 0
        tensor = float_probe.constants.get(entry.tensor)
        return int(np.prod(tensor.dims)) if tensor is not None else 0
    value = float_values.get(entry.tensor)
    return int(value.size) if isinstance(value, np.ndarray) else 0


def _compare(number: int, entry: _Entry, float_probe: Probe, quant_probe: Probe, float_values: dict,
             quant_values: dict, weight_rows: dict, histogram: bool, scratch: Scratch | None = None):
    """The Origin and Dequant rows of one entry (the Dequant row's local cosine left empty), its cosine, clip and
    local cosine (None when there is none); None when the entry has nothing to compare this round."""
    if entry.kind == "Weight" and number in weight_rows:  # weights are the same every round
        origin_row, dequant_row, cos, clip = weight_rows[number]
        return origin_row, dequant_row, cos, clip, cos
    origin = float_probe.constant(entry.tensor) if entry.kind == "Weight" else float_values.get(entry.tensor)
    dequant = _mapped(entry, quant_values.get(entry.counterpart), quant_probe)
    if origin is None or dequant is None or not _comparable(origin, dequant):
        return None
    flat_origin, flat_dequant = _Flat(origin, scratch, "origin"), _dequant_side(entry, dequant, quant_values, scratch)
    cos, clip = flat_origin.cosine(flat_dequant), flat_origin.clip(flat_dequant)
    local_cos = None
    if entry.kind == "Weight":
        local_cos = cos  # a weight is what its node reads, alone or not
    elif entry.local is not None:
        local = _mapped(entry, float_values.get(entry.local), None)
        if local is not None and _comparable(origin, local):
            local_cos = flat_origin.cosine(_Flat(local, scratch, "local", sums=False))
    head = [entry.node, entry.op_type, entry.tensor, entry.inout]
    local_node = entry.node if entry.kind == "Weight" else entry.local_node
    origin_row = [*head, "Origin", entry.kind, *map(_fmt, flat_origin.stats()), _fmt(0.0), _fmt(1.0), _fmt(1.0),
                  local_node]
    dequant_row = [*head, "Dequant", entry.kind, *map(_fmt, flat_dequant.stats()), _fmt(clip), _fmt(cos), "",
                   local_node]
    if entry.kind == "Weight":
        weight_rows[number] = (origin_row, dequant_row, cos, clip)
    if histogram:
        entry.histogram = flat_origin.histogram(flat_dequant)
    return origin_row, dequant_row, cos, clip, local_cos


def _dequant_side(entry: _Entry, dequant: np.ndarray, quant_values: dict, scratch: Scratch | None) -> _Flat | _Levels:
    """The dequantized tensor from its codes' histogram where it has codes (round 0 checks that they decode to
    it bit for bit), else sorted."""
    codes = quant_values.get(entry.codes) if entry.levels is not None else None
    if (codes is not None and codes.size == dequant.size >= _CODED_VALUES and codes.dtype in (np.uint8, np.int8)
            and dequant.dtype == np.float32):
        if not entry.levels_checked:
            entry.levels_checked = True
            if not np.array_equal(entry.levels.decode(codes).view(np.uint32), dequant.reshape(-1).view(np.uint32)):
                entry.levels = None
        if entry.levels is not None:
            return _Levels(dequant, codes, entry.levels, scratch, "dequant")
    return _Flat(dequant, scratch, "dequant")


def _mapped(entry: _Entry, value: np.ndarray | None, probe: Probe | None) -> np.ndarray | None:
    """What the node reads (a constant of the probe's model when not computed), mapped back to float units."""
    if value is None and probe is not None:
        value = probe.constant(entry.counterpart)
    if value is not None and entry.value_map is not None:
        scale, offset = entry.value_map
        value = np.asarray(value, np.float32) * scale + (0 if offset is None else offset)
    return value


def _comparable(origin: np.ndarray, dequant: np.ndarray) -> bool:
    return origin.size == dequant.size and origin.dtype.kind == "f" and dequant.dtype.kind == "f"


def csv_fields(fields: Iterable) -> str:
    """`fields` as the reports' csv.writer writes them at the start of a row of more fields (quoted where they
    need it): the text to which a row's remaining fields are appended after a comma."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([*fields, ""])
    return buffer.getvalue()[:-2]  # less the empty last field's comma and the line end


def _write_params(path: Path, result: ConversionResult) -> Path:
    """One row per channel of every quantized tensor; parameters a pass did not record stay empty."""
    with open(path, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerow(PARAM_HEADER)
        for q in result.quantized:
            columns = [q.scale, q.zero_point, q.correction_var, q.correction_mean]
            arrays = [np.asarray(c).ravel() if c is not None else None for c in columns]
            channels = max([a.size for a in arrays if a is not None] or [1])
            dims = "[" + " ".join(str(d) for d in q.shape) + "]"
            elements = int(np.prod(q.shape)) if q.shape else 1
            # each column as its strings, once per tensor (a per-tensor value repeated on every channel's row)
            texts = [[""] * channels if a is None or a.size == 0 else
                     [str(int(v)) for v in a.tolist()] if i == 1 else [_fmt(v) for v in a.tolist()]
                     for i, a in enumerate(arrays)]
            texts = [t if len(t) == channels else t[:1] * channels for t in texts]
            # The names are written by csv once per tensor, not once per channel (csv.writer scans every field,
            # and a per-channel weight of MobileNet V2 repeats 100-character names on up to 1280 rows: 0.2 s a
            # report); numbers never need quoting.
            head = csv_fields([";".join(q.nodes), q.op_type, q.tensor, elements, dims])
            handle.write("".join(f"{head},{scale},{zero},{q.bits},{var},{mean}\n"
                                 for scale, zero, var, mean in zip(*texts, strict=True)))
    return path


def _write_notes(path: Path, report: DebugReport, notes: list[str]) -> Path:
    lines = [f"rounds: {report.rounds} (round_<i>.csv, i from 0)",
             "Var is the population standard deviation (the column name follows the reference).",
             ("Each tensor appears once: quantized weights as the Input of the node that reads them, graph inputs "
              "as the Input of their first consumer, other activations as the Output of the node that makes them."),
             *notes]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- HTML


def _histogram(origin: np.ndarray, dequant: np.ndarray):
    both = np.concatenate([np.asarray(origin, np.float64).ravel(), np.asarray(dequant, np.float64).ravel()])
    both = both[np.isfinite(both)]
    if both.size == 0:
        return None
    edges = np.histogram_bin_edges(both, bins=_HIST_BINS)

    def counts(x):
        x = np.asarray(x, np.float64).ravel()
        return np.histogram(x[np.isfinite(x)], bins=edges)[0]

    return edges, counts(origin), counts(dequant)


_SORT_JS = """
function sortTable(th) {
  const table = th.closest('table'), col = th.cellIndex, body = table.tBodies[0];
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  const key = td => { const v = parseFloat(td.textContent); return isNaN(v) ? td.textContent : v; };
  [...body.rows].sort((a, b) => {
    const x = key(a.cells[col]), y = key(b.cells[col]);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  }).forEach(r => body.appendChild(r));
}
"""


def _table(header: Iterable[str], rows: Iterable[Iterable], sortable: bool = False) -> str:
    click = ' onclick="sortTable(this)"' if sortable else ""
    head = "".join(f"<th{click}>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ranking_key(entry: _Entry) -> tuple[float, float, str]:
    local = entry.mean_local
    return (local if np.isfinite(local) else entry.mean_cos, entry.mean_cos, entry.tensor)


def skip_suggestion(report: DebugReport, result: ConversionResult, count: int = SUGGESTED_SKIPS) -> list[str]:
    """The `count` layers of the conversion's plan whose tensors have the lowest local cosine: where most error is
    introduced. Not verified (ptqlite analyze converts with such lines and measures the outputs)."""
    planned = {n for q in result.quantized for n in q.nodes}
    chosen: list[str] = []
    for entry in sorted((e for e in report.entries if e.local_rounds and e.kind == "Activation"), key=_ranking_key):
        if entry.local_node in planned and entry.local_node not in chosen and entry.mean_local < 1.0:
            chosen.append(entry.local_node)
    return chosen[:count]


def _write_html(path: Path, report: DebugReport, result: ConversionResult, notes: list[str]) -> Path:
    plan = {q.tensor: q for q in result.quantized}
    order = {id(e): i for i, e in enumerate(report.entries, 1)}
    ranked = sorted((e for e in report.entries if e.rounds), key=_ranking_key)

    def number(v: float) -> str:
        return f"{v:.6f}" if np.isfinite(v) else ""

    layer_rows = []
    for e in ranked:
        q = plan.get(e.tensor)
        layer_rows.append((order[id(e)], e.node, e.op_type, e.tensor, e.kind, number(e.mean_local),
                           number(e.mean_cos), number(e.cos_min), f"{e.clip_sum / e.rounds:.6f}", e.local_node,
                           q.bits if q else "", q.scheme if q else ""))
    outputs: dict[str, list[float]] = {}
    for _, name, cos in report.output_cosines:
        outputs.setdefault(name, []).append(cos)
    along = [e for e in report.entries if e.rounds and e.kind == "Activation"]
    worst_local = sorted(range(len(along)), key=lambda i: _ranking_key(along[i]))[:5]
    plot = cosine_plot([f"{e.tensor} ({e.local_node or e.node})" for e in along], [order[id(e)] for e in along],
                       [e.mean_cos for e in along], [e.mean_local for e in along], set(worst_local))
    skip = skip_suggestion(report, result)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ptqlite debug report</title>",
        ("<style>body{font-family:sans-serif;font-size:13px;max-width:1400px}"
         "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 6px;"
         "vertical-align:top}td{max-width:28em;overflow-wrap:anywhere}th{cursor:pointer;background:#eee}"
         "code{background:#f3f3f3;padding:1px 4px;overflow-wrap:anywhere}.svgs svg{margin:0 8px 8px 0}</style>"),
        f"<script>{_SORT_JS}</script></head><body>",
        f"<h1>{html.escape(result.quant_type)} debug report</h1>",
        (f"<p>{report.rounds} round(s). <b>Accumulated</b> cosine: the tensor in the quantized model against the "
         "float model (every error before it included). <b>Local</b> cosine: the node that makes the tensor run "
         "alone on the float model's values, with its quantized weights and its inputs and output through their "
         "own quantizers: where error is introduced. Both averaged over rounds.</p>"),
        "<h2>Graph outputs</h2>",
        _table(("TensorName", "mean cosine", "min cosine"),
               ((n, f"{np.mean(c):.6f}", f"{np.min(c):.6f}") for n, c in outputs.items())),
    ]
    if plot:
        parts += ["<h2>Cosine along the graph</h2>", plot]
        parts.append("<p>Worst local cosine: " + "; ".join(
            f"#{order[id(along[i])]} {html.escape(along[i].local_node or along[i].node)} "
            f"({number(along[i].mean_local)})"
            for i in worst_local) + "</p>")
    if skip:
        parts.append(
            "<h2>What to skip</h2><p>The layers that introduce the most error (lowest local cosine, of the "
            f"conversion's plan): <code>skip_quant_node={html.escape(','.join(skip))}</code>. Unverified: a layer "
            "whose error the rest of the graph absorbs may not be worth skipping. <code>ptqlite analyze</code> "
            "(same flags as the conversion, no --outputFile) converts with candidate lines and prints one verified "
            "to reach a target output cosine (docs/debugging.md).</p>")
    parts += [
        "<h2>Tensors</h2>",
        "<p>Sorted by local cosine, worst first; click a column header to sort.</p>",
        _table(("#", "NodeName", "NodeType", "TensorName", "Kind", "mean local cosine", "mean cosine",
                "min cosine", "mean clip", "local node", "bits", "scheme"), layer_rows, sortable=True),
    ]
    worst = [e for e in ranked if e.histogram is not None][:HISTOGRAM_LAYERS]
    if worst:
        parts.append("<h2>Float vs quantized values of the worst tensors (round 0)</h2><div class='svgs'>")
        parts += [histogram_svg(f"{e.tensor} (local {number(e.mean_local)}, accumulated {number(e.mean_cos)})",
                                *e.histogram) for e in worst]
        parts.append("</div>")
    parts += [
        "<h2>Plan</h2>",
        _table(("TensorName", "OpType", "Nodes", "Bits", "Scheme", "Storage", "Bytes before", "Bytes after",
                "Relative error"),
               ((q.tensor, q.op_type, ", ".join(q.nodes), q.bits, q.scheme, q.storage, q.bytes_before,
                 q.bytes_after, f"{q.relative_error:.6f}") for q in result.quantized), sortable=True),
        "<h2>Skipped</h2>",
        _table(("TensorName", "OpType", "Nodes", "Reason"),
               ((s.tensor, s.op_type, ", ".join(s.nodes), s.reason) for s in result.skipped)),
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts))
    return path


def debug_report(float_model: onnx.ModelProto, result: ConversionResult, config: QuantConfig,
                 input_format: str | None = None,
                 samples: Iterable[dict[str, np.ndarray]] | None = None,
                 folder: str | Path | None = None, progress: bool | None = None) -> DebugReport:
    """The convert() hook: reports for `result` on `samples` when convert() was given them (Python API), else on
    the config's calibration data, else on one synthetic sample. Written into `folder` (default:
    debug_info_save_path; convert() passes a temp folder that it moves into place once all is written)."""
    notes: list[str] = []
    inputs = samples if samples is not None else report_inputs(float_model, config, input_format, notes)
    result.notes += [n for n in notes if n not in result.notes]
    return write_reports(folder or config.common.debug_info_save_path, float_model, result.model, result, inputs,
                         notes, progress)


def is_report_file(name: str) -> bool:
    """Files of an earlier run that a new report replaces even when it does not write them (fewer rounds)."""
    return re.fullmatch(r"round_\d+\.csv", name) is not None

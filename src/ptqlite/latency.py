"""Timing a quantized graph against its float graph on the machine that converts, for latency-aware planning
("never slower than float"; FULL_QUANT in passes/full, DYNAMIC_QUANT in passes/dynamic.py): one intra-op thread
each, interleaved run by run, the median of each; the rule that counts a graph as slower; the growing sets of
layers put back to float; the cost model that orders DYNAMIC_QUANT's layers for that; and the inputs DYNAMIC_QUANT
times on when it has no calibration sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ConversionError
from .model import graph_inputs, iter_initializers, restore_io_shapes
from .runtime import BENCHMARK_VALUES, InputSpec, cpu_session, synthetic_inputs, time_interleaved, timed_turns
from .stream import WHOLE_LOAD_BYTES, streaming

# Shares of the int8 weighted layers put back to float, in the pass's order (FULL_QUANT: smallest first;
# DYNAMIC_QUANT: costliest by int8_net_cost first), until the graph is no slower.
SHARES = (0.25, 0.5, 0.75, 1.0)
# The int8 graph counts as slower than float only beyond this ratio: interleaved medians on a shared machine move
# by a few % from run to run, and a decision taken on noise would make the output depend on the machine's load.
SLOWER = 1.05
# Within that band DYNAMIC_QUANT's cost model decides, but only where the layers it says lose would cost at least
# this share of the float model's time: magika ACWL's Dense_0 is estimated at 1.1 ms of 14.5 (timed 1.06-1.08x in
# the benchmark), ppocr_rec ACWL's nine layers at 0.09 ms of 34 (timed 0.93-1.00x), where int8 is worth its
# smaller file (docs/dynamic_quant.md, "Latency-aware planning").
NOTICEABLE_SHARE = 0.02
# Wall time spent timing one pair of graphs, and the bounds on the number of interleaved runs.
BUDGET_S = 0.4
MIN_RUNS, MAX_RUNS = 15, 300
# DYNAMIC_QUANT without a sample: a dynamic dimension is timed at this size (a transformer's sequence length, an
# image side, a number of frames), except the first axis of an input of rank 2 or more, the batch, timed at 1.
# Sequence 1 would time a transformer where the MatMuls are tiny and int8 always loses.
DYNAMIC_DIM = 128


@dataclass(frozen=True)
class Timing:
    float_ms: float  # median per run
    quantized_ms: float

    @property
    def ratio(self) -> float:
        return self.quantized_ms / self.float_ms if self.float_ms > 0 else 1.0


# The reason a weight is listed as skipped when latency-aware planning kept its layer float (both passes).
DEMOTED = "kept float by latency-aware planning: int8 ran no faster than float on this machine"


def measure(float_model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: dict[str, np.ndarray],
            own_shapes: onnx.ModelProto | None = None, clear_of: tuple[float, float] | None = None) -> Timing:
    """Median run times of both graphs on `feeds` (one intra-op thread each, interleaved). `own_shapes` (the
    model as given, before --inputShape) gives both graphs its input and output shapes when ONNX Runtime refuses
    them with the fixed ones. `clear_of` (low, high): the caller decides only whether the ratio is <= low, > high
    or in between, and the runs stop as soon as no timings of the runs still to come could move the ratio of the
    medians out of the side it is on, below low or above high (`decided`); in between they all run."""
    try:
        sessions = [cpu_session(m, "to time it", threads=1) for m in (float_model, quantized)]
    except ConversionError:
        if own_shapes is None:
            raise
        sessions = [cpu_session(with_shapes_of(m, own_shapes), "to time it", threads=1)
                    for m in (float_model, quantized)]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    inputs = {k: v for k, v in feeds.items() if k in names[0]}
    start = time.perf_counter()
    _, latencies = time_interleaved(sessions, inputs, loops=2, warmup=1)
    per_pair = max((time.perf_counter() - start) / 3, 1e-6)
    runs = int(np.clip(BUDGET_S / per_pair, MIN_RUNS, MAX_RUNS))
    # The two sizing loops ran after the warm-up, as timed runs do: they are the first two of `runs`.
    timed_turns(sessions, inputs, latencies, runs,
                stop=None if clear_of is None else lambda done: decided(done, runs, *clear_of))
    return Timing(float(np.median(latencies[0])), float(np.median(latencies[1])))


def untimed(model: onnx.ModelProto, large: str = "") -> str:
    """Why `model` is not timed ("" when it is): a streaming conversion, or weights over stream.WHOLE_LOAD_BYTES
    (a session of both graphs would hold them twice more). `large` says, in parentheses, why that is no loss."""
    if streaming():
        return "a streaming conversion (weights in external data) does not load the model whole to time it"
    size = sum(t.ByteSize() for t in iter_initializers(model.graph))
    if size > WHOLE_LOAD_BYTES:
        return (f"the model holds {size / 1e9:.2f} GB of weights, over the {WHOLE_LOAD_BYTES / 2**30:.0f} GiB "
                "that are timed" + (f" ({large})" if large else ""))
    return ""


def median_bounds(values: list[float], runs: int) -> tuple[float, float] | None:
    """The least and the greatest median that `runs` values can have when `values` are the first of them and the
    others can be anything (None while too few are known to bound it on both sides)."""
    ordered, unknown = sorted(values), runs - len(values)
    low, high = (runs - 1) // 2, runs // 2  # the middle order statistics (equal for an odd count)
    if low - unknown < 0 or high >= len(ordered):
        return None
    return ((ordered[low - unknown] + ordered[high - unknown]) / 2, (ordered[low] + ordered[high]) / 2)


def decided(latencies: list[list[float]], runs: int, low: float, high: float) -> bool:
    """Whether the ratio of the medians of `runs` interleaved runs (latencies[1]'s over latencies[0]'s) is
    already sure to be <= low, or sure to be > high, whatever the runs still to come measure: stopping then gives
    the decision that all the runs would have given (the same 5% margin; only the ratio quoted is of fewer runs)."""
    floats, quantized = median_bounds(latencies[0], runs), median_bounds(latencies[1], runs)
    if floats is None or quantized is None or floats[0] <= 0:
        return False
    least, greatest = quantized[0] / floats[1], quantized[1] / floats[0]
    return greatest <= low or least > high


def settled(timing: Timing, again: Callable[[], Timing]) -> Timing:
    """`timing`, or, where its ratio lies within the noise margin above float (1.0 < ratio <= SLOWER), the mean of
    it and one more measurement (`again`): the decision at the margin is the one noise moves most (magika's int8
    ACWL graph measured 1.05x float in a conversion, so it stayed int8, and 1.07-1.10x in the benchmark)."""
    if not 1.0 < timing.ratio <= SLOWER:
        return timing
    second = again()
    return Timing((timing.float_ms + second.float_ms) / 2, (timing.quantized_ms + second.quantized_ms) / 2)


def with_shapes_of(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with `original`'s input and output shapes (as the output is written)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    restore_io_shapes(copy, original, [])
    return copy


def demotions(names: list[str], first: set[str] | frozenset = frozenset()) -> list[set[str]]:
    """The growing sets of layers to try in float: the layers `first` alone (FULL_QUANT: those inside If/Loop/Scan
    bodies, int8 weight-only), then with each share of SHARES of `names` (in their order; no repeats)."""
    sets: list[set[str]] = [set(first)] if first else []
    for share in SHARES:
        chosen = set(names[:max(1, round(share * len(names)))]) | set(first)
        if chosen and (not sets or chosen != sets[-1]):
            sets.append(chosen)
    return sets


def timing_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs DYNAMIC_QUANT times on without a sample: the model's own static dims (--inputShape fixes them
    before the pass), each dynamic one at DYNAMIC_DIM, the batch at 1."""
    specs = []
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        dims = list(tensor_type.shape.dim)
        shape = tuple(d.dim_value if d.dim_value > 0 else 1 if axis == 0 and len(dims) >= 2 else DYNAMIC_DIM
                      for axis, d in enumerate(dims))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type or TensorProto.FLOAT)
        specs.append(InputSpec(value.name, shape, np.dtype(dtype)))
    return specs


def timing_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """One input at timing_specs' shapes, with the benchmark's values (token ids 1..999, masks ones, token types
    zeros, floats standard normal; docs/benchmark.md)."""
    return synthetic_inputs(timing_specs(model), BENCHMARK_VALUES)[0]


def describe(feeds: dict[str, np.ndarray]) -> str:
    """'input_ids 1x128, attention_mask 1x128' for the summary."""
    return ", ".join(f"{name} {'x'.join(map(str, np.shape(v))) or 'scalar'}" for name, v in feeds.items())



# DYNAMIC_QUANT's cost model of one MatMul/Gemm layer, int8 against float (ns; onnxruntime 1.32, 1 thread, AVX2
# without VNNI): int8 saves MAC_SAVED_NS per multiply-add (rows x K x N) and adds, per strategy, a fixed cost
# (its extra nodes), the run-time quantization of its input (per element, rows x K; ACWL's per-row form is seven
# float ops, ALWC's one fused DynamicQuantizeLinear) and the rescaling of its output (per element, rows x N).
# Fitted by bench/dynamic_cost.py --fit on single layers (docs/results.md, "DYNAMIC_QUANT demotion order by a
# cost model"); only the order of the layers and the sign are used, each candidate is still timed.
MAC_SAVED_NS = 0.011
COSTS_NS = {  # strategy -> (per layer, per input element, per output element)
    "ALWC": (1400.0, 0.45, 0.34),
    "ACWL": (9400.0, 2.4, 1.6),
}


def int8_net_cost(strategy: str, rows: int, k: int, n: int) -> float:
    """Estimated time (ns) a [K, N] layer on `rows` rows adds in int8 over float; negative where int8 is faster."""
    fixed, per_input, per_output = COSTS_NS[strategy]
    return fixed + per_input * rows * k + per_output * rows * n - MAC_SAVED_NS * rows * k * n

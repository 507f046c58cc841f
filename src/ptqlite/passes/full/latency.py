"""Latency-aware planning ("never slower than float"): the int8 graph is timed against the prepared float graph
on the machine that converts, on the first calibration sample, one thread, interleaved run by run. Where the int8
graph is slower, the weights read inside If/Loop/Scan bodies go back to float first (they are stored int8 behind a
DequantizeLinear that runs on every call and speeds nothing up), then the weighted layers with the fewest
multiply-adds (their int8 kernels gain least, and the quantize/dequantize at their edges costs the same), in
growing shares, until the graph is no slower than float ([full_quant_param] latency_aware, docs/full_quant.md
"Latency-aware planning"). A graph that ONNX Runtime does not load with the fixed --inputShape shapes (control flow
whose inferred shapes break) is timed with the model's own input shapes, fed the same sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from ...errors import ConversionError
from ...model import restore_io_shapes
from ...runtime import cpu_session, time_interleaved
from ...targets import WEIGHTED_OPS
from .graph_plan import GraphPlan

# Shares of the int8 weighted layers put back to float, smallest first, until the graph is no slower.
SHARES = (0.25, 0.5, 0.75, 1.0)
# The int8 graph counts as slower than float only beyond this ratio: interleaved medians on a shared machine move
# by a few % from run to run, and a decision taken on noise would make the output depend on the machine's load.
SLOWER = 1.05
# Wall time spent timing one pair of graphs, and the bounds on the number of interleaved runs.
BUDGET_S = 0.4
MIN_RUNS, MAX_RUNS = 15, 300


@dataclass(frozen=True)
class Timing:
    float_ms: float  # median per run
    quantized_ms: float

    @property
    def ratio(self) -> float:
        return self.quantized_ms / self.float_ms if self.float_ms > 0 else 1.0


def measure(float_model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: dict[str, np.ndarray],
            own_shapes: onnx.ModelProto | None = None) -> Timing:
    """Median run times of both graphs on `feeds` (one intra-op thread each, interleaved). `own_shapes` (the
    model as given, before --inputShape) gives both graphs its input and output shapes when ONNX Runtime refuses
    them with the fixed ones."""
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
    time_interleaved(sessions, inputs, loops=2, warmup=1)
    per_pair = max((time.perf_counter() - start) / 3, 1e-6)
    runs = int(np.clip(BUDGET_S / per_pair, MIN_RUNS, MAX_RUNS))
    _, latencies = time_interleaved(sessions, inputs, loops=runs, warmup=0)
    return Timing(float(np.median(latencies[0])), float(np.median(latencies[1])))


def with_shapes_of(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with `original`'s input and output shapes (as the output is written)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    restore_io_shapes(copy, original, [])
    return copy


def smallest_first(model: onnx.ModelProto, plan: GraphPlan) -> list[str]:
    """Names of the int8 weighted nodes, fewest multiply-adds first (weight elements x output positions, from
    shape inference where it knows the output shape)."""
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
              for vi in (*model.graph.value_info, *model.graph.output)}
    weights = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    costs = []
    for pos, node in enumerate(model.graph.node):
        if plan.roles[pos] != "compute" or node.op_type not in WEIGHTED_OPS or not node.name:
            continue
        out = shapes.get(node.output[0], [])
        positions = int(np.prod(out[2:])) if node.op_type.startswith("Conv") and len(out) > 2 else \
            int(np.prod(out[:-1])) if out else 1
        costs.append((weights.get(node.input[1], 0) * max(positions, 1), pos, node.name))
    return [name for _, _, name in sorted(costs)]


def demotions(names: list[str], body_nodes: set[str] | frozenset = frozenset()) -> list[set[str]]:
    """The growing sets of layers to try in float: the nodes inside bodies whose weights are int8 weight-only
    (`body_nodes`) alone first, then with each share of SHARES of `names` (no repeats)."""
    sets: list[set[str]] = [set(body_nodes)] if body_nodes else []
    for share in SHARES:
        chosen = set(names[:max(1, round(share * len(names)))]) | set(body_nodes)
        if chosen and (not sets or chosen != sets[-1]):
            sets.append(chosen)
    return sets

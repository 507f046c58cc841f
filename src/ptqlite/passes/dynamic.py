"""DYNAMIC_QUANT: int8 weights offline, activations quantized at run time by standard ONNX ops.

Each MatMul/Gemm with a constant weight B becomes

    ALWC (default): DynamicQuantizeLinear(x) -> MatMulInteger(x_u8, W_s8) -> Cast -> Mul(x_scale * w_scale[N])
    ACWL:           x' = x * d (d per input channel, the weight's rows divided by it); per-row scale
                    s = max|x'| / 127 over the last axis; x_u8 = Cast(Round(x' * 127 / max|x'|) + 128)
                    -> MatMulInteger(x_u8, W_s8) -> Cast -> Mul(s * w_scale)

ONNX Runtime fuses these into its DynamicQuantizeMatMul / MatMulIntegerToFloat kernels (ACWL: the per-row scale
is applied inside MatMulIntegerToFloat). The weight codes are symmetric
int8 in [-127, 127] (per output channel for ALWC, per tensor for ACWL). On x86 CPUs without VNNI the
uint8 x int8 kernel adds the products of neighbouring K positions in saturating 16-bit arithmetic, so ALWC
widens a column's scale where two same-sign neighbouring codes could sum above 128 (as FULL_QUANT's CPU preset
does) and keeps the faster int8 kernel exact. ACWL's one per-tensor scale would take the worst pair of the whole
tensor; it takes the scale between max|w| / 127 and that widened one whose codes, with the few pairs still over
128 trimmed, are closest to the weight (see docs/dynamic_quant.md). The `alwc_weights="uint8"` option stores
q + 128 as uint8 for ALWC (exact uint8 x uint8 kernel, for comparisons). A MatMul of two activations stays
float.

Gather embedding tables get int8 codes with one symmetric scale per row; the gathered rows are dequantized
after the Gather, so the table stays int8 in memory as well as on disk.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import embedding
from .. import latency as timer
from ..config import QuantConfig
from ..embedding import GraphBuilder, TableWriter
from ..errors import PtqError
from ..model import (
    GraphIndex,
    attribute,
    ensure_opset,
    graph_inputs,
    iter_graphs,
    iter_initializers,
    opset_version,
    remove_initializers,
    set_input_shapes,
    subgraphs,
    weight_free_copy,
)
from ..plan import WeightSpec, gemm_rows, int8_rules, plan_weights, weight_layout
from ..qmath import (
    QParams,
    dequantize,
    int16_pair_limit,
    quantize,
    relative_error,
    symmetric_params,
)
from ..result import ConversionResult, QuantizedTensor, SkippedTensor
from ..targets import target

log = logging.getLogger(__name__)

_OPS = ("MatMul", "Gemm", "Gather")
# The integer kernels DYNAMIC_QUANT's graph runs on: onnxruntime's CPU provider.
_PRESET = target("CPU")
# Stored codes are q + 128, q in [-127, 127]; MatMulInteger subtracts the zero point.
_ZERO = 128
# Keeps the per-row scale of an all-zero row finite (x / s is then 0, as it should be).
_TINY = np.float32(1e-30)


@dataclass
class _IntWeight:
    q_name: str  # int8 codes q, or uint8 codes q + 128, layout [.., K, N]
    zero_name: str  # "" for int8 codes (zero point 0)
    params: QParams
    relative_error: float  # of the float weight the integer path computes with (kept instead of that weight,
    # which would hold a float copy of every weight until the pass ends)
    rows: int  # K
    equalizer: str | None = None  # ACWL: per-input-channel factor applied to x (the weight was divided by it)
    extra_bytes: int = 0  # stored besides codes and scale (ACWL: the equalizer)


def row_equalizer(w: np.ndarray) -> np.ndarray:
    """ACWL: d[k] = max |w[k, :]|, normalised to a geometric mean of 1.

    One scale for a whole weight is dominated by its largest rows (in BERT one input channel of a feed-forward
    weight reaches 175 standard deviations). Dividing row k by d[k] and multiplying activation column k by
    d[k] leaves x @ w unchanged; every row of w / d then has the same largest magnitude, so the one weight
    scale fits all rows, and the per-row activation scale takes the spread instead. On MiniLM this gave a
    higher embedding cosine than sqrt(max |w[k, :]|) (0.9959 against 0.9943, docs/results.md).
    """
    peak = np.abs(w).max(axis=1).astype(np.float64)
    d = np.where(peak > 0, peak, 1.0)
    return d / np.exp(np.log(d).mean())


def _trim_pairs(codes: np.ndarray) -> np.ndarray:
    """Codes [.., K, N] (K even) with every same-sign pair at K positions 2i, 2i+1 summing to at most 128 in
    magnitude: the excess comes off the smaller code of the pair."""
    codes = codes.copy()
    a, b = codes[..., 0::2, :], codes[..., 1::2, :]
    total = a + b
    excess = np.sign(total) * np.maximum(np.abs(total) - 128, 0)
    first = np.abs(a) <= np.abs(b)
    a -= np.where(first, excess, 0)
    b -= np.where(first, 0, excess)
    return codes


def acwl_int8(w: np.ndarray) -> tuple[np.ndarray, QParams]:
    """ACWL's per-tensor int8 codes [.., K, N] whose neighbouring same-sign K pairs fit the int16 sums of the
    uint8 x int8 kernel, and their parameters.

    Widening the single scale until no pair exceeds 128 (ALWC's rule per column) costs every weight up to a
    bit; trimming the few pairs over 128 instead costs only those. Candidates between the two are tried and
    the codes closest to `w` kept. An odd K (pairing not known) takes the widened scale."""
    params = symmetric_params(w, 8, None, narrow=True)
    wide = _pair_safe(w, params)
    if w.shape[-2] % 2 or w.ndim < 2:
        return quantize(w, wide), wide
    base, top = float(params.scale.reshape(())), float(wide.scale.reshape(()))
    best = None
    for scale in np.unique(np.geomspace(base, max(top, base), 6)):
        p = QParams(np.full_like(params.scale, scale), params.zero_point, params.qmin, params.qmax)
        codes = _trim_pairs(quantize(w, p))
        error = float(np.sum((codes * scale - w.astype(np.float64)) ** 2))
        if best is None or error < best[0]:
            best = (error, codes, p)
    return best[1], best[2]


class _Rewriter(GraphBuilder):
    """Builds the replacement nodes and constants for one model."""

    def __init__(self, model: onnx.ModelProto, strategy: str, int8_weights: bool, codes: dict | None = None):
        super().__init__(model.graph)
        self.strategy = strategy
        self.int8_weights = int8_weights
        # (tensor, transposed) -> (int8 codes, params, equalizer, relative error), kept only when given: latency-aware
        # planning rewrites the model once per candidate, and each weight is quantized once for all of them
        self.codes = codes
        # int8 codes meet the u8*s8 kernel, whose pair sums the preset may ask to keep inside int16
        self.pair_safe = int8_weights and _PRESET.int16_pair_sums
        self.opset = opset_version(model)
        self.constants: dict[tuple, str] = {}
        self.weights: dict[tuple[str, bool, str], _IntWeight] = {}
        # a weak reference back: rewriter <-> table writer would be a reference cycle, which kept the whole model
        # alive until Python's cycle collector ran
        self.tables = TableWriter(weakref.proxy(self))
        # ACWL: (graph, activation, equalizer) -> its quantized form (uint8 codes, per-row scale), made once
        self.activations: dict[tuple, tuple[str, str]] = {}
        self.outputs: set[str] = set()  # ACWL products, whose bias Add must not join ONNX Runtime's fusion

    def shared(self, array: np.ndarray) -> str:
        """A small constant (zero points, 1/127) stored once per model."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.constants[key] = self.const(array, "ptq_dq_c")
        return self.constants[key]

    def matmul_weight(self, tensor: str, transpose: bool) -> _IntWeight:
        """Integer codes [.., K, N] and their parameters, quantized once per (tensor, layout)."""
        key = (tensor, transpose)
        if key not in self.weights:
            quantized = self.codes.get(key) if self.codes is not None else None
            if quantized is None:
                quantized = self.quantize_weight(tensor, transpose)
                if self.codes is not None:
                    self.codes[key] = quantized
            codes, params, equalizer, error = quantized
            shape = codes.shape
            base = tensor.replace("::", "_").strip("/")
            if self.int8_weights:
                q_name, zero_name = self.const(codes, f"{base}_quantized"), ""
            else:
                q_name = self.const((codes.astype(np.int16) + _ZERO).astype(np.uint8), f"{base}_quantized")
                # A zero point per column takes ONNX Runtime's fast uint8 x uint8 path (a scalar one
                # was slower on some runs).
                zero = np.full(shape[-1], _ZERO, np.uint8) if len(shape) == 2 else np.array(_ZERO, np.uint8)
                zero_name = self.shared(zero)
            eq_name, extra_bytes = None, 0
            if equalizer is not None:
                eq_name = self.const(equalizer.astype(np.float32), f"{base}_equalizer")
                extra_bytes = 4 * equalizer.size
            self.weights[key] = _IntWeight(q_name, zero_name, params, error, shape[-2] if len(shape) >= 2 else 1,
                                           eq_name, extra_bytes)
        return self.weights[key]

    def quantize_weight(self, tensor: str, transpose: bool):
        """int8 codes [.., K, N] in [-127, 127], their parameters, ACWL's equalizer (None for ALWC) and the relative error of the
        weight the integer path computes with."""
        w = self.index.array(tensor).astype(np.float32)
        if transpose:
            w = np.ascontiguousarray(w.T)
        original = w
        equalizer = None
        if self.strategy == "ALWC":
            params = symmetric_params(w, 8, w.ndim - 1, narrow=True)
            if self.pair_safe:
                params = _pair_safe(w, params)
            codes = quantize(w, params)
        else:
            if w.ndim == 2:
                equalizer = row_equalizer(w)
                w = w / equalizer[:, None].astype(np.float32)
            if self.pair_safe:
                codes, params = acwl_int8(w)
            else:
                params = symmetric_params(w, 8, None, narrow=True)
                codes = quantize(w, params)
        w_hat = dequantize(codes, params)
        if equalizer is not None:
            w_hat = w_hat * equalizer[:, None].astype(np.float32)
        return codes.astype(np.int8), params, equalizer, relative_error(original, w_hat)

    def quantized_matmul(
        self, x: str, tensor: str, transpose: bool, output: str, prefix: str, alpha: float = 1.0, graph: int = 0
    ) -> list[onnx.NodeProto]:
        """Nodes computing alpha * x @ W (W = tensor, transposed if asked) with integer arithmetic."""
        weight = self.matmul_weight(tensor, transpose)
        q_name, zero_name = weight.q_name, weight.zero_name
        w_scale = (weight.params.scale.reshape(-1) * alpha).astype(np.float32)
        nodes = []

        def add(op, inputs, out=None, **attrs):
            node, name = self.node(op, inputs, prefix, out, **attrs)
            nodes.append(node)
            return name

        if self.strategy == "ALWC":
            dq = helper.make_node(
                "DynamicQuantizeLinear",
                [x],
                [self.index.unique_name(f"{prefix}/{s}") for s in ("x_quantized", "x_scale", "x_zero_point")],
                name=self.index.unique_name(f"{prefix}/DynamicQuantizeLinear"),
            )
            nodes.append(dq)
            x_q, x_scale, x_zero = dq.output
            acc = add("MatMulInteger", [x_q, q_name, x_zero] + ([zero_name] if zero_name else []))
            w_scale_name = self.const(
                w_scale if w_scale.size > 1 else w_scale.reshape(()), f"{prefix}_w_scale"
            )
            scale = add("Mul", [x_scale, w_scale_name])
        else:
            key = (graph, x, weight.equalizer)
            if key not in self.activations:
                self.activations[key] = self.row_quantize(x, weight, prefix, nodes)
            x_q, x_scale = self.activations[key]
            acc = add("MatMulInteger", [x_q, q_name, self.shared(np.uint8(_ZERO))] + ([zero_name] if zero_name else []))
            # Mul(row scale, weight scale), the row scale first: ONNX Runtime fuses MatMulInteger, Cast and
            # this product into MatMulIntegerToFloat, which applies the per-row scale of its first input.
            # A constant bias Add right after would be fused too and scaled by the row scale: run() turns
            # such an Add into a Sub (self.outputs).
            w_scale_name = self.const(w_scale.reshape(()), f"{prefix}_w_scale")
            scale = add("Mul", [x_scale, w_scale_name])
            self.outputs.add(output)
        add("Mul", [add("Cast", [acc], to=TensorProto.FLOAT), scale], out=output)
        return nodes

    def row_quantize(self, x: str, weight: _IntWeight, prefix: str, nodes: list[onnx.NodeProto]) -> tuple[str, str]:
        """ACWL: x (times its equalizer) as uint8 codes q + 128 with one symmetric scale per row, and that
        scale ([.., 1], max |x| / 127)."""

        def add(op, inputs, **attrs):
            node, name = self.node(op, inputs, prefix, **attrs)
            nodes.append(node)
            return name

        if weight.equalizer is not None:
            x = add("Mul", [x, weight.equalizer])
        amax = add("Max", [self.reduce_abs_max(x, prefix, nodes), self.shared(_TINY)])
        scale = add("Div", [amax, self.shared(np.float32(127))])
        # Mul, Round, Add and Cast, not one per-axis QuantizeLinear of x as [rows, K]: OpenVINO 2026.4 fails to run
        # a QuantizeLinear whose per-axis scale is computed at run time (FakeQuantize bounds [rows] against data
        # [rows, K]); onnxruntime runs both as fast (docs/dynamic_quant.md).
        inverse = add("Div", [self.shared(np.float32(127)), amax])
        rounded = add("Round", [add("Mul", [x, inverse])])
        return add("Cast", [add("Add", [rounded, self.shared(np.float32(_ZERO))])], to=TensorProto.UINT8), scale

    def reduce_abs_max(self, x: str, prefix: str, nodes: list[onnx.NodeProto]) -> str:
        node, magnitude = self.node("Abs", [x], prefix)
        nodes.append(node)
        if self.opset >= 18:
            node, out = self.node(
                "ReduceMax", [magnitude, self.shared(np.array([-1], np.int64))], prefix, keepdims=1
            )
        else:
            node, out = self.node("ReduceMax", [magnitude], prefix, axes=[-1], keepdims=1)
        nodes.append(node)
        return out


def _pair_safe(w: np.ndarray, params: QParams) -> QParams:
    """Per-column scales widened so that two same-sign codes at K positions 2i, 2i+1 sum to at most 128.

    ONNX Runtime's uint8 x int8 kernel on x86 without VNNI adds those two products in saturating int16; with
    activation codes up to 255 a pair sum of 128 stays exact (255 * 128 = 32640). Sums of float weights at
    most 127 * scale round to at most 128."""
    limit = int16_pair_limit(gemm_rows(w, "MatMul", False).astype(np.float64)) / params.qmax
    limit = limit.reshape(-1, params.scale.size).max(axis=0).reshape(params.scale.shape)
    return QParams(np.maximum(params.scale, limit), params.zero_point, params.qmin, params.qmax)


def run(model: onnx.ModelProto, config: QuantConfig, alwc_weights: str = "int8", ops: tuple[str, ...] = _OPS,
        samples: Iterable[dict[str, np.ndarray]] | None = None, own_shapes: onnx.ModelProto | None = None,
        **_) -> ConversionResult:
    """Dynamic quantization of `model` in place (quant_strategy ALWC or ACWL).

    `alwc_weights`: "int8" (default; pair-safe scales, uint8 x int8 kernel) or "uint8" (q + 128, exact
    uint8 x uint8 kernel at any scale, slower on CPUs without VNNI). `ops` limits the rewrite to these op
    types (FULL_QUANT uses it for the embedding tables of Gather). With [dynamic_quant_param] latency_aware (the
    default) the MatMul/Gemm layers whose int8 form makes the model slower than float on this machine stay float
    (`samples`: the first one is timed when given; `own_shapes`: the model before --inputShape, for graphs that
    ONNX Runtime loads only with their own shapes)."""
    ensure_opset(model, 11)
    if not config.dynamic.latency_aware or not set(ops) & {"MatMul", "Gemm"}:
        return _quantize(model, config, alwc_weights, ops)[0]
    skipped = _untimed(model)
    if skipped:
        result = _quantize(model, config, alwc_weights, ops)[0]
        result.notes.append(f"latency-aware planning skipped: {skipped}")
        return result
    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)
    codes: dict = {}  # each weight quantized once for every candidate

    def candidate(demoted: set[str]) -> tuple[ConversionResult, list[tuple[str, str]]]:
        work = onnx.ModelProto()
        work.CopyFrom(float_model)
        return _quantize(work, config, alwc_weights, ops, demoted, codes)

    best = _never_slower_than_float(float_model, candidate, samples, own_shapes,
                                    config.dynamic.quant_strategy)
    model.CopyFrom(best.model)
    best.model = model
    return best


def _untimed(model: onnx.ModelProto) -> str:
    """Why latency-aware planning does not time this model ("" when it does)."""
    return timer.untimed(model, "large MatMuls gain most from int8")


def _never_slower_than_float(float_model: onnx.ModelProto, candidate, samples, own_shapes,
                             strategy: str) -> ConversionResult:
    """The first candidate (every layer int8, then growing shares of the MatMul/Gemm layers in float, those whose
    int8 form costs most by latency.int8_net_cost first) whose model runs no slower than `float_model`, else the
    fastest one; its notes say what was measured and kept float. A candidate with every layer float is the float
    graph (ratio 1, not timed), so the result is never slower than float as measured here. Where every layer int8
    times within the noise band around float, the layers the cost model says lose are the one candidate, if
    their estimated loss is at least latency.NOTICEABLE_SHARE of the float model's time."""
    described = "first calibration sample"
    try:
        feeds = next(iter(samples)) if samples is not None else None
    except StopIteration:
        feeds = None
    if feeds is None:
        feeds = timer.timing_feeds(float_model)
        described = timer.describe(feeds)
    first, layers = candidate(set())
    if not layers:  # no MatMul/Gemm runs in int8 (Gather tables only, or nothing): nothing to decide
        return first
    try:
        # below the band int8 is kept, above it layers are demoted; within it every run counts (settled, and the
        # cost model's share of the float time)
        timing = timer.settled(timer.measure(float_model, first.model, feeds, own_shapes,
                                             clear_of=(1 / timer.SLOWER, timer.SLOWER)),
                               lambda: timer.measure(float_model, first.model, feeds, own_shapes))
        tried = [(set(), first, timing)]
    except PtqError as exc:
        # Timing is advice: a graph that does not run as timed (an input whose synthetic values it refuses, say)
        # keeps every layer int8 (the verification step judges it).
        first.notes.append(f"latency-aware planning skipped: {str(exc).splitlines()[0]}")
        return first
    ratio = tried[0][2].ratio
    sets, bound = [], 1.0
    if ratio >= 1 / timer.SLOWER:  # the estimates cost a shape inference: made only where they may be used
        costs = layer_costs(float_model, layers, feeds, strategy)
        order = sorted(costs, key=lambda name: -costs[name])  # stable: graph order among equal estimates
        losers = {name for name in order if costs[name] > 0}
        loss_ms = sum(costs[name] for name in losers) / 1e6
        if ratio > timer.SLOWER:
            sets = timer.demotions(order)
        elif losers and loss_ms >= timer.NOTICEABLE_SHARE * timing.float_ms:
            # Within the noise band (1/SLOWER to SLOWER) the timing cannot tell int8 from float: magika ACWL
            # measured 0.98-1.05x in conversions and 1.06-1.08x in the benchmark. Where the cost model sees a
            # noticeable loss it decides, the layers it says int8 slows down go back to float, and the timing
            # only checks that this is no slower than float or than every layer int8.
            sets, bound = [losers], max(1.0, ratio)
    for demoted in sets:
        result = candidate(demoted)[0]
        if not result.quantized:  # every layer float, nothing else rewritten: the float graph itself
            tried.append((demoted, result, timer.Timing(timing.float_ms, timing.float_ms)))
        else:
            try:
                # a candidate within the bound ends the search; the others' ratios choose the fastest
                tried.append((demoted, result, timer.measure(float_model, result.model, feeds, own_shapes,
                                                             clear_of=(bound, float("inf")))))
            except PtqError:  # this candidate cannot be timed, so it is not chosen
                break
        if tried[-1][2].ratio <= bound:
            break
    # the first candidate within the bound, else the fastest (the float graph, when it was reached, is 1.0)
    demoted, best, timing = tried[-1] if tried[-1][2].ratio <= bound else min(tried, key=lambda t: t[2].ratio)
    if demoted:
        now = "the float graph" if not best.quantized else f"now {timing.ratio:.2f}x float"
        best.notes.append(f"latency-aware planning: int8 ran {ratio:.2f}x float on this machine (1 thread, "
                          f"{described}); {len(demoted)} of {len(layers)} MatMul/Gemm layers kept float (those "
                          f"int8 costs most by the cost model first), {now} ([dynamic_quant_param] "
                          "latency_aware=false keeps every layer int8)")
    else:
        best.notes.append(f"latency-aware planning: int8 runs {ratio:.2f}x float on this machine (1 thread, "
                          f"{described})")
    return best


def layer_costs(model: onnx.ModelProto, layers: list[tuple[str, str]], feeds: dict[str, np.ndarray],
                strategy: str) -> dict[str, float]:
    """latency.int8_net_cost of each rewritten MatMul/Gemm node (`layers`: (node, weight) pairs, graph order):
    its rows (output elements over N) from shape inference at the timed input shapes (1 where it knows none),
    K and N from its weight."""
    shaped = weight_free_copy(model)  # shape inference reads small constants only
    set_input_shapes(shaped, {name: list(np.shape(v)) for name, v in feeds.items()
                              if name in {i.name for i in graph_inputs(shaped)}})
    try:
        # data_prop: a Reshape to a shape computed from Shape/Gather/Concat (attention heads merged back before
        # MiniLM's output projections) gets its dims; without it those layers counted one row
        shaped = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; the weight shape alone estimates then
        log.debug("no shapes to estimate the layers by (%s)", str(exc).splitlines()[0] if str(exc) else exc)
    rows: dict[str, int] = {}
    for graph in iter_graphs(shaped.graph):
        for vi in (*graph.value_info, *graph.output):
            dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
            rows[vi.name] = int(np.prod(dims[:-1])) if dims else 1
    nodes = {node.name: node for node in _all_nodes(shaped.graph.node)}
    shapes = {t.name: tuple(t.dims) for t in iter_initializers(model.graph)}
    costs = {}
    for name, weight in layers:
        node, shape = nodes[name], shapes.get(weight, (1, 1))
        if len(shape) < 2:
            k, n = (shape or (1,))[0], 1
        else:  # a [.., K, N] weight's batch is in the rows already (output [.., R, N])
            k, n = (shape[-1], shape[-2]) if _stored_transposed(node, shape) else (shape[-2], shape[-1])
        costs[name] = timer.int8_net_cost(strategy, max(rows.get(node.output[0], 1), 1), k, n)
    return costs


def _quantize(model: onnx.ModelProto, config: QuantConfig, alwc_weights: str, ops: tuple[str, ...],
              demoted: set[str] | frozenset = frozenset(),
              codes: dict | None = None) -> tuple[ConversionResult, list[tuple[str, str]]]:
    """The rewrite of `model` in place, the nodes in `demoted` left float (latency-aware planning; `codes`
    memoises each weight's quantization across calls), and the (node, weight) of every MatMul/Gemm layer it could
    rewrite (demoted ones too), in graph order."""
    strategy = config.dynamic.quant_strategy
    plan = plan_weights(model, int8_rules(config, ops))
    result = ConversionResult(model, config.quant_type)
    result.skipped += [SkippedTensor(s.tensor, s.op_type, s.nodes, s.skip_reason) for s in plan.skipped]
    specs = {s.tensor: s for s in plan.quantized}
    log.info("%s weight plan (%s): %d weights to int8, %d stay float", config.quant_type, "/".join(ops),
             len(plan.quantized), len(plan.skipped))
    int8_weights = strategy == "ACWL" or alwc_weights == "int8"
    rw = _Rewriter(model, strategy, int8_weights, codes)
    graphs = iter(range(1 << 30))  # an id per graph rewritten: an ACWL activation is quantized once per graph

    kept_float: dict[str, str] = {}  # weight -> why one of its users stays float
    done: dict[str, QuantizedTensor] = {}
    layers: list[tuple[str, str]] = []  # (node, weight) of every MatMul/Gemm rewritten or demoted

    # `again` is rewrite itself, passed in rather than called by name: a closure that names itself is a reference
    # cycle, which (through rw) kept the whole model alive until Python's cycle collector ran
    def rewrite(graph_nodes: list[onnx.NodeProto], again) -> list[onnx.NodeProto]:
        new_nodes: list[onnx.NodeProto] = []
        graph = next(graphs)
        for node in graph_nodes:
            for sub in subgraphs(node):  # If/Loop/Scan bodies read the new constants from the outer scope
                rewritten = again(list(sub.node), again)
                del sub.node[:]
                sub.node.extend(rewritten)
            weight = _weight_input(node, specs)
            if weight is None:
                new_nodes.append(node)
                continue
            spec = specs[weight]
            reason = _unsupported(node, weight, rw.index)
            if not reason and node.op_type != "Gather" and node.name:
                layers.append((node.name, weight))
                if node.name in demoted:
                    reason = timer.DEMOTED
            if reason:
                kept_float.setdefault(weight, reason)
                new_nodes.append(node)
                continue
            extra_bytes = 0  # stored besides codes and scales
            if node.op_type == "Gather":
                nodes, error, params = rw.tables.gather(node, weight)
                scheme, storage = embedding.SCHEME, embedding.STORAGE
            else:
                nodes, error, params, extra_bytes = _matmul_nodes(rw, node, weight, graph)
                scheme = "symmetric per-channel axis -1 (N)" if strategy == "ALWC" else "symmetric per-tensor"
                scheme += f"; activations {_ACTIVATION_SCHEME[strategy]}"
                storage = "MatMulInteger uint8 (zero point 128)"
                if int8_weights:
                    storage = "MatMulInteger int8" + (" (pair sums kept within int16)" if rw.pair_safe else "")
            new_nodes += nodes
            if weight not in done:
                w = rw.index.array(weight)
                done[weight] = QuantizedTensor(
                    weight,
                    node.op_type,
                    spec.nodes,
                    spec.shape,
                    8,
                    scheme,
                    storage,
                    bytes_before=w.nbytes,
                    bytes_after=w.size + 4 * params.scale.size + extra_bytes,
                    relative_error=error,
                    scale=params.scale.ravel(),
                    zero_point=params.zero_point.ravel(),
                )
        return new_nodes

    new_nodes = rewrite(list(model.graph.node), rewrite)

    for weight, record in done.items():
        if weight in kept_float:
            record.storage += (
                f" (a float copy stays for a user that cannot be rewritten: {kept_float[weight]})"
            )
        result.quantized.append(record)
    for weight, reason in kept_float.items():
        if weight not in done:
            spec = specs[weight]
            result.skipped.append(SkippedTensor(weight, spec.op_type, spec.nodes, reason))
    removed = {w for w in done if w not in kept_float}
    remove_initializers(model.graph, removed)
    model.graph.initializer.extend(rw.initializers)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if rw.outputs:
        _keep_bias_outside_fusion(model.graph, rw)
    if set(ops) - {"Gather"}:
        result.notes.append(
            f"quant_strategy={strategy}: activations {_ACTIVATION_SCHEME[strategy]}, quantized at run time"
        )
    return result, layers




_ACTIVATION_SCHEME = {
    "ALWC": "uint8 asymmetric per-tensor (runtime min/max)",
    "ACWL": "int8 symmetric per-row (runtime max |x| of each row, after the per-input-channel equalizer)",
}


def _weight_input(node: onnx.NodeProto, specs: dict[str, WeightSpec]) -> str | None:
    """The planned weight this node reads, if any."""
    if node.op_type not in _OPS:
        return None
    for name in node.input[:2]:
        if name in specs:
            return name
    return None


def _unsupported(node: onnx.NodeProto, weight: str, index: GraphIndex) -> str:
    """Why this user of a planned weight keeps the float weight ('' when it can be rewritten)."""
    op = node.op_type
    if op == "Gather":
        return embedding.unsupported_gather(node)
    if node.input[1] != weight:
        return f"the constant is the first input of {op} '{node.name}'; only a constant second input is done"
    if node.input[0] in index.initializers:
        return f"{op} '{node.name}' multiplies two constants"
    if op == "Gemm" and attribute(node, "transA", 0):
        return f"Gemm '{node.name}' has transA=1"
    return ""


def _stored_transposed(node: onnx.NodeProto, shape: tuple[int, ...]) -> bool:
    """Whether the weight `node` reads as B is stored [N, K] (input channels last, Gemm transB=1); the integer
    path computes with [.., K, N]. A Gather table is never transposed."""
    return node.op_type != "Gather" and weight_layout(node, 1, shape).input_axis == len(shape) - 1


def _matmul_nodes(rw: _Rewriter, node: onnx.NodeProto, weight: str, graph: int = 0):
    prefix = node.name or rw.index.unique_name(node.op_type)
    transpose = _stored_transposed(node, tuple(rw.index.initializers[weight].dims))
    if node.op_type == "MatMul":
        nodes = rw.quantized_matmul(node.input[0], weight, transpose, node.output[0], prefix, graph=graph)
    else:
        alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        product = node.output[0] if not bias or beta == 0 else rw.index.unique_name(f"{prefix}/product")
        nodes = rw.quantized_matmul(node.input[0], weight, transpose, product, prefix, alpha, graph)
        if bias and beta != 0:
            if beta != 1.0:
                if bias in rw.index.initializers:
                    bias = rw.const((rw.index.array(bias) * beta).astype(np.float32), f"{prefix}_bias")
                else:
                    scaled, bias = rw.node(
                        "Mul", [bias, rw.const(np.float32(beta), f"{prefix}_beta")], prefix
                    )
                    nodes.append(scaled)
            add, _ = rw.node("Add", [product, bias], prefix, output=node.output[0])
            nodes.append(add)
    quantized = rw.matmul_weight(weight, transpose)  # memoised: the codes quantized_matmul used
    return nodes, quantized.relative_error, quantized.params, quantized.extra_bytes


def _all_nodes(nodes):
    for node in nodes:
        yield node
        for sub in subgraphs(node):
            yield from _all_nodes(sub.node)


def _keep_bias_outside_fusion(graph: onnx.GraphProto, rw: _Rewriter) -> None:
    """ACWL: an Add of a constant right after a per-row-scaled product becomes Sub of the negated constant.

    ONNX Runtime would fuse that Add into MatMulIntegerToFloat as its bias and scale the bias by the per-row
    scale as well (measured with onnxruntime 1.32); x - (-b) is exactly x + b and is not fused."""
    uses: dict[str, int] = {}
    for node in _all_nodes(graph.node):
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        product = [i for i, name in enumerate(node.input) if name in rw.outputs]
        if len(product) != 1:
            continue
        y, other = node.input[product[0]], node.input[1 - product[0]]
        if uses.get(y) != 1 or y in outputs or not _constant(other, graph, initializers):
            continue
        if other in initializers:
            negated = numpy_helper.from_array(-rw.index.array(other) if other in rw.index.initializers
                                              else -numpy_helper.to_array(initializers[other]),
                                              rw.index.unique_name(f"{other}_negated"))
            graph.initializer.append(negated)
            negated_name = negated.name
        else:
            neg, negated_name = rw.node("Neg", [other], node.name or "bias")
            graph.node.insert(list(graph.node).index(node), neg)
        node.op_type = "Sub"
        del node.input[:]
        node.input.extend([y, negated_name])


def _constant(name: str, graph: onnx.GraphProto, initializers: dict) -> bool:
    return name in initializers or any(n.op_type == "Constant" and name in n.output for n in graph.node)

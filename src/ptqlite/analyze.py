"""Find the layers whose quantization hurts the output most and print a skip_quant_node line that fixes it.

Works for every quant mode because it only drives convert() with variants of the config's skip_quant_node:
- "only L": every candidate layer but L skipped, so L alone is quantized; 1 - cosine is L's own damage;
- "all but L": L alone skipped; the cosine gained over the full conversion is what skipping L buys.
Layers are ranked by the sum of both effects. The skip line is the shortest prefix of that ranking whose
conversion reaches --targetCosine (galloping then bisecting over the prefix length), verified by converting with it.
Cosine: per sample, all graph outputs flattened together, float model vs quantized model; averaged over samples.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .cli_convert import add_model_arguments, load_inputs, output_path
from .config import QuantConfig
from .convert import convert
from .errors import UsageError
from .model import graph_inputs, name_unnamed_nodes, save_model
from .report import report_inputs
from .runtime import cosine_similarity, cpu_session, session_feeds
from .targets import WEIGHTED_OPS
from .targets import target as target_preset

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--targetCosine", type=float, default=0.999,
                        help="output cosine similarity the suggested skip list must reach (default 0.999)")
    parser.add_argument("--top", type=int, default=10, help="how many of the worst layers to print (default 10)")
    parser.add_argument("--samples", type=int, default=8,
                        help="calibration samples the cosine is measured on (default 8; each variant is converted "
                             "with the config's own calibration data)")
    parser.add_argument("--namedModelFile", default="",
                        help="where to write the model with its unnamed nodes named (their first output's name), "
                             "for use with the printed skip line")
    parser.add_argument("--sweep", choices=["both", "only", "allbut"], default="both",
                        help="which per-layer experiments to run (default both; one of them halves the time)")


@dataclass
class LayerEffect:
    node: str
    op_type: str
    cos_only: float | None  # output cosine with only this layer quantized
    cos_without: float | None  # output cosine with everything but this layer quantized

    def score(self, base: float) -> float:
        damage = 1.0 - self.cos_only if self.cos_only is not None else 0.0
        gain = max(0.0, self.cos_without - base) if self.cos_without is not None else 0.0
        return damage + gain


@dataclass
class OpTypeEffect:
    op_type: str
    nodes: tuple[str, ...]
    cosine: float  # output cosine with every node of this type skipped (and nothing else beyond the config's own)


@dataclass
class Analysis:
    base_cosine: float
    all_skipped_cosine: float  # every candidate layer skipped
    ranking: list[LayerEffect]
    skip: tuple[str, ...]  # the suggested skip_quant_node (the config's own entries first)
    skip_cosine: float
    reached: bool
    conversions: int
    notes: list[str]
    model: onnx.ModelProto  # the model the node names refer to (unnamed nodes named)
    op_types: list[OpTypeEffect] = dataclasses.field(default_factory=list)  # FULL_QUANT's unweighted int8 ops
    own: int = 0  # how many entries of `skip` are the config's own skip_quant_node


def _with_skip(config: QuantConfig, skip: Sequence[str]) -> QuantConfig:
    common = dataclasses.replace(config.common, skip_quant_node=tuple(skip), debug_info_save_path="")
    # Timing decides latency-aware planning: layers it would put back to float would blur what a skip does, and
    # differ from run to run.
    full = dataclasses.replace(config.full, latency_aware=False)
    dynamic = dataclasses.replace(config.dynamic, latency_aware=False)
    return dataclasses.replace(config, common=common, full=full, dynamic=dynamic)


class _Progress:
    """A progress line per conversion: a bar over the expected number of conversions, the time so far and an
    estimate of the time left (from the mean time per conversion)."""

    def __init__(self, report: Callable[[str], None] | None):
        self.report, self.started, self.total = report, time.perf_counter(), 1

    def __call__(self, done: int, what: str) -> None:
        if self.report is None:
            return
        self.total = max(self.total, done + 1)
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - done) if done else float("nan")
        filled = round(20 * done / self.total)
        self.report(f"[{'#' * filled}{'.' * (20 - filled)}] {done}/~{self.total} conversions, "
                    f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}: {what}")


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class _Evaluator:
    """Converts the model with a skip list and measures the output cosine on fixed samples (memoised)."""

    def __init__(self, model: onnx.ModelProto, config: QuantConfig, samples: list[dict[str, np.ndarray]],
                 input_format: str | None, progress: _Progress | None = None):
        self.model, self.config, self.samples, self.input_format = model, config, samples, input_format
        self.reference = _run(model, samples)
        self.cache: dict[frozenset[str], float] = {}
        self.conversions = 0
        self.progress = progress
        self.step = ""  # what the conversions are for, for the progress line

    def cosine(self, skip: Sequence[str]) -> float:
        key = frozenset(skip)
        if key not in self.cache:
            self.evaluate(skip)
        return self.cache[key]

    def evaluate(self, skip: Sequence[str]):
        """Convert with `skip` and measure it; returns the ConversionResult."""
        # the input rules are checked on the first conversion; later ones convert the same model. analyze
        # measures every variant itself, so convert's own gate (and ON_THE_FLY's timing against float) would
        # only repeat the work.
        result = convert(self.model, _with_skip(self.config, list(dict.fromkeys(skip))), verify=False,
                         input_format=self.input_format, progress=False, validate=self.conversions == 0,
                         speed_check=False)
        self.conversions += 1
        if self.progress is not None:
            self.progress(self.conversions, self.step)
        values = [cosine_similarity(_flat(reference), _flat(outputs))
                  for reference, outputs in zip(self.reference, _run(result.model, self.samples), strict=True)]
        self.cache[frozenset(skip)] = float(np.mean(values))
        return result


def _run(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """The graph outputs of `model` on each sample."""
    session = cpu_session(model, "for analyze")
    return [session.run(None, session_feeds(session, sample)) for sample in samples]


def _flat(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(o, dtype=np.float64).ravel() for o in outputs])


def analyze(model: onnx.ModelProto, config: QuantConfig, *, target: float = 0.999, samples: int = 8,
            sweep: str = "both", input_format: str | None = None,
            progress: Callable[[str], None] | None = None) -> Analysis:
    """Rank the quantized layers of `model` by their effect on output cosine and find a skip list for `target`."""
    notes: list[str] = []
    unnamed = sum(1 for n in model.graph.node if not n.name)
    if unnamed:
        model = _copy(model)
        name_unnamed_nodes(model)
        notes.append(f"{unnamed} nodes had no name; they are named after their first output, as convert does, "
                     "so the skip line works on the original file too")
    # islice reads no sample past the last one used; a count below 1 reaches the error below
    inputs = list(itertools.islice(report_inputs(model, config, input_format, notes), max(samples, 0)))
    if not inputs:
        raise UsageError("analyze needs at least one sample: --samples must be >= 1")
    if (config.full.latency_aware if config.quant_type == "FULL_QUANT" else
            config.dynamic.latency_aware if config.quant_type == "DYNAMIC_QUANT" else False):
        notes.append("latency-aware planning is off for these conversions (timing would decide which layers stay "
                     "float); convert with the printed line to see its effect")
    with _reused_statistics(config):
        return _analyze(model, config, inputs, notes, target, sweep, input_format, _Progress(progress))


def _reused_statistics(config: QuantConfig):
    """FULL_QUANT variants calibrate on the same samples: each statistic and layer correction is measured once."""
    if config.quant_type != "FULL_QUANT":
        return contextlib.nullcontext()
    from .passes.full.statistics import reuse

    return reuse()


def _analyze(model: onnx.ModelProto, config: QuantConfig, inputs: list[dict[str, np.ndarray]], notes: list[str],
             target: float, sweep: str, input_format: str | None, progress: _Progress) -> Analysis:
    evaluator = _Evaluator(model, config, inputs, input_format, progress)
    own = tuple(config.common.skip_quant_node)
    evaluator.step = "every layer quantized"
    base = evaluator.evaluate(own)
    base_cos = evaluator.cosine(own)
    node_types = {n.name: n.op_type for n in model.graph.node}
    candidates = list(dict.fromkeys(n for q in base.quantized for n in q.nodes
                                    if n and n in node_types and n not in own))
    sweeps = 2 if sweep == "both" else 1
    progress.total = 2 + sweeps * len(candidates) + 2 * math.ceil(math.log2(len(candidates) + 1)) + 2
    ranking = []
    for number, node in enumerate(candidates, 1):
        evaluator.step = f"layer {number}/{len(candidates)}: {node}"
        others = [c for c in candidates if c != node]
        ranking.append(LayerEffect(
            node, node_types[node],
            evaluator.cosine([*own, *others]) if sweep in ("both", "only") else None,
            evaluator.cosine([*own, node]) if sweep in ("both", "allbut") else None))
    # the best skipping weighted layers can do: when this is far from 1, the loss is elsewhere
    evaluator.step = "every layer skipped"
    floor = evaluator.cosine([*own, *candidates])
    ranking.sort(key=lambda e: (-e.score(base_cos), e.node))
    op_types = _op_type_sweep(base.model, config, own, candidates, evaluator, progress)

    evaluator.step = "shortest skip line"

    def search(lead: tuple[str, ...]) -> tuple[int, float]:
        return _shortest_prefix(lambda k: evaluator.cosine([*own, *lead, *(e.node for e in ranking[:k])]),
                                len(ranking), target)

    lead: tuple[str, ...] = ()
    count, cos = search(lead)
    # Layers alone fall short: try again with every node of the op type whose skipping helps most in front.
    if cos < target and op_types and op_types[0].cosine > base_cos:
        with_type = search(op_types[0].nodes)
        if with_type[1] > cos:
            lead, (count, cos) = op_types[0].nodes, with_type
    skip = tuple(dict.fromkeys((*own, *lead, *(e.node for e in ranking[:count]))))
    return Analysis(base_cos, floor, ranking, skip, cos, cos >= target, evaluator.conversions, notes, model,
                    op_types, len(dict.fromkeys(own)))


def _op_type_sweep(quantized: onnx.ModelProto, config: QuantConfig, own: tuple[str, ...], candidates: list[str],
                   evaluator: _Evaluator, progress: _Progress) -> list[OpTypeEffect]:
    """FULL_QUANT also runs unweighted ops in int8 (Add, Mul, Concat, pooling...), whose activations no layer
    skip controls: one conversion per op type, with every node of that type skipped, ranks them (best first).
    A node counts when, in the conversion with the config's own skip list, it reads a dequantized tensor."""
    if config.quant_type != "FULL_QUANT":
        return []
    unweighted = target_preset(config.full.target_device).compute_ops - WEIGHTED_OPS
    dequantized = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    groups: dict[str, list[str]] = {}
    for node in quantized.graph.node:
        if (node.op_type in unweighted and node.name and node.name not in own and node.name not in candidates
                and any(name in dequantized for name in node.input)):
            groups.setdefault(node.op_type, []).append(node.name)
    effects = []
    progress.total += len(groups)
    for op_type, nodes in sorted(groups.items()):
        evaluator.step = f"op type {op_type}: {len(nodes)} node(s) skipped"
        effects.append(OpTypeEffect(op_type, tuple(nodes), evaluator.cosine([*own, *nodes])))
    return sorted(effects, key=lambda e: (-e.cosine, e.op_type))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _shortest_prefix(cosine_of: Callable[[int], float], total: int, target: float) -> tuple[int, float]:
    """Smallest k in 0..total with cosine_of(k) >= target, assuming more skipped layers never hurt; when none
    reaches the target, (total, cosine_of(total))."""
    if cosine_of(0) >= target:
        return 0, cosine_of(0)
    low, high = 0, 1  # cosine_of(low) < target
    while high < total and cosine_of(high) < target:
        low, high = high, min(2 * high, total)
    if cosine_of(high) < target:
        return high, cosine_of(high)
    while high - low > 1:
        middle = (low + high) // 2
        if cosine_of(middle) >= target:
            high = middle
        else:
            low = middle
    return high, cosine_of(high)


def format_analysis(analysis: Analysis, top: int, target: float) -> str:
    lines = [f"output cosine with every layer quantized: {analysis.base_cosine:.6f}",
             f"output cosine with every layer skipped:   {analysis.all_skipped_cosine:.6f}",
             f"worst layers (of {len(analysis.ranking)}), by damage when quantized alone plus gain when skipped:",
             f"  {'rank':>4}  {'cos only this':>13}  {'cos all but':>11}  node (type)"]
    for rank, effect in enumerate(analysis.ranking[:top], 1):
        only = f"{effect.cos_only:.6f}" if effect.cos_only is not None else "-"
        without = f"{effect.cos_without:.6f}" if effect.cos_without is not None else "-"
        lines.append(f"  {rank:>4}  {only:>13}  {without:>11}  {effect.node} ({effect.op_type})")
    if analysis.op_types:
        lines.append("unweighted ops that run in int8, by output cosine with all their nodes skipped:")
        lines += [f"  {e.op_type} ({len(e.nodes)} node(s)): {e.cosine:.6f}" for e in analysis.op_types]
    own = analysis.skip[:analysis.own]
    if analysis.reached and analysis.skip == own:
        lines.append(f"the output cosine {analysis.base_cosine:.6f} already reaches {target} with "
                     + ("every layer quantized: nothing to skip" if not own else
                        "the config's own skip_quant_node: nothing more to skip"))
        lines += [f"note: {n}" for n in analysis.notes]
        lines.append(f"({analysis.conversions} conversions)")
        return "\n".join(lines)
    if analysis.reached:
        lines.append(f"skipping {len(analysis.skip)} node(s) gives output cosine {analysis.skip_cosine:.6f} "
                     f">= {target} (verified by converting with it):")
    else:
        lines.append(f"target {target} not reached: the skip line below gives {analysis.skip_cosine:.6f} "
                     "(the rest of the loss comes from tensors no skipped node controls)")
    lines.append("skip_quant_node=" + ",".join(analysis.skip))
    lines += [f"note: {n}" for n in analysis.notes]
    lines.append(f"({analysis.conversions} conversions)")
    return "\n".join(lines)


def _progress_printer() -> Callable[[str], None]:
    """On a terminal one line redrawn in place; elsewhere (a log, a pipe) nothing but the -vv log."""
    if sys.stderr.isatty():
        return lambda text: print(f"\ranalyze: {text[:150]:<150}", end="", file=sys.stderr, flush=True)
    return lambda text: log.debug("analyze: %s", text)


def run(args: argparse.Namespace) -> int:
    if not 0.0 < args.targetCosine <= 1.0:
        raise UsageError(f"--targetCosine={args.targetCosine}: expected a number in (0, 1]")
    if args.top < 1 or args.samples < 1:
        raise UsageError("--top and --samples must be at least 1")
    config, model = load_inputs(args)
    if not graph_inputs(model):
        raise UsageError(f"{args.modelFile}: the model has no inputs to feed")
    analysis = analyze(model, config, target=args.targetCosine, samples=args.samples, sweep=args.sweep,
                       input_format=args.inputDataFormat or None,
                       progress=_progress_printer())
    if sys.stderr.isatty():
        print(file=sys.stderr)  # end the progress line
    print(format_analysis(analysis, args.top, args.targetCosine))
    if args.namedModelFile:
        print(f"named model written to {save_model(analysis.model, output_path(args.namedModelFile))}")
    return 0

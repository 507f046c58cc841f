"""ON_THE_FLY's speed against float, said in the summary ("never a silent surprise"): the output is timed against
the float model with latency.py's timing (1 thread, interleaved, medians, the 5% noise margin) and, where it runs
slower, a warning names the ratio, why, and the default strategy. What ON_THE_FLY stores is not changed: the user
asked for integer weights in memory.
"""

from __future__ import annotations

import logging

import onnx

from .. import latency as timer
from ..errors import PtqError
from ..result import ConversionResult

log = logging.getLogger(__name__)

# Ops whose float kernels ONNX Runtime prepares around a constant weight (pre-packed, NCHWc layout, fused
# BatchNormalization and activations): a weight DequantizeLinear makes at run time loses all of that.
PREPACKED_OPS = ("Conv", "ConvTranspose")


def check(float_model: onnx.ModelProto, result: ConversionResult, own_shapes: onnx.ModelProto | None) -> None:
    """Time `result.model` against `float_model` and add the note, or the warning when it runs slower."""
    feeds = timer.timing_feeds(float_model)
    try:
        timing = timer.settled(
            timer.measure(float_model, result.model, feeds, own_shapes, clear_of=(timer.SLOWER, timer.SLOWER)),
            lambda: timer.measure(float_model, result.model, feeds, own_shapes))
    except PtqError as exc:  # timing is advice: the gate judges a graph that does not run on synthetic inputs
        result.notes.append(f"ON_THE_FLY speed not measured: {str(exc).splitlines()[0]}")
        return
    ops = sorted({q.op_type for q in result.quantized})
    warning = slower_warning(timing, ops, timer.describe(feeds))
    if warning:
        result.warnings.append(warning)
        log.warning("%s", warning)
    else:
        result.notes.append(f"ON_THE_FLY output runs {timing.ratio:.2f}x float on this machine "
                            f"(1 thread, {timer.describe(feeds)})")


def slower_warning(timing: timer.Timing, ops: list[str], described: str) -> str:
    """The warning for an ON_THE_FLY output that runs slower than float beyond the noise margin, else ""."""
    if timing.ratio <= timer.SLOWER:
        return ""
    prepacked = [op for op in ops if op in PREPACKED_OPS]
    if prepacked:
        why = (f"its {'/'.join(prepacked)} weights are dequantized on every run, so ONNX Runtime cannot pre-pack "
               "them, use its blocked layout or fuse the activations")
    else:
        why = f"its {'/'.join(ops) or 'quantized'} weights are dequantized on every run"
    return (f"the ON_THE_FLY output takes {timing.ratio:.2f}x float's time on this machine "
            f"({timing.quantized_ms:.2f} vs {timing.float_ms:.2f} ms, 1 thread, {described}): {why}. "
            "Leaving dequant_strategy out (the default strategy) gives about the same file size at float speed, "
            "with the weights float in memory")

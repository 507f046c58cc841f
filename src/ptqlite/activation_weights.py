"""Per-input-channel activation mean squares of MatMul/Gemm weights, from calibration data, for the block search.

A block-wise weight's error reaches the layer's output through the activations it multiplies: with x the input
and d = w - dequantized, E|x @ d|^2 has the diagonal sum_k E[x_k^2] d_k^2. Weighting the search's error by
E[x_k^2] (quantize_blocks(importance=...)) spends the codes where the activations are large (all-MiniLM-L6-v2,
4 bit block 32: docs/results.md, block-wise section).

The float model is run once over the samples; each activation read as input A by a MatMul/Gemm with a constant
weight is reduced inside the probed graph to its per-channel sum of squares (float64, over every axis but the
last) and its shape, so onnxruntime returns a few numbers per tensor instead of every activation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ConversionError, DataError
from .model import ProbeAdditions, attribute, opset_version
from .runtime import cpu_session

log = logging.getLogger(__name__)


def activation_inputs(model: onnx.ModelProto, weights: set[str]) -> dict[str, list[str]]:
    """Weight name -> the activations (input A, channels on the last axis) of the MatMul/Gemm nodes that read it
    as input B. Gemm with transA keeps its channels on axis 0 and is left out (its weight is searched plainly)."""
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            continue
        readers.setdefault(node.input[1], []).append(node.input[0])
    return readers


def channel_mean_squares(model: onnx.ModelProto, weights: set[str], samples: Iterable[dict[str, np.ndarray]]
                         ) -> dict[str, np.ndarray]:
    """Weight name -> float64 mean over the calibration rows of each input channel's square (summed over the
    weight's readers); weights whose activations could not be measured (not finite) are left out. `model` is
    left as it was."""
    readers = activation_inputs(model, weights)
    activations = list(dict.fromkeys(a for names in readers.values() for a in names))
    if not activations:
        return {}
    probe = ProbeAdditions(model)
    node, const = probe.node, probe.const
    axes_input = opset_version(model) >= 13  # ReduceSum takes axes as an input from opset 13
    outputs: dict[str, tuple[str, str]] = {}
    try:
        for a in activations:
            shape = node("Shape", [a], f"{a}_awq_shape")
            last = node("Slice", [shape, const([-1], f"{a}_awq_m1"), const([2**62], f"{a}_awq_end")],
                        f"{a}_awq_last")
            rows = node("Reshape", [node("Cast", [a], f"{a}_awq_f64", to=TensorProto.DOUBLE),
                                    node("Concat", [const([-1], f"{a}_awq_rest"), last], f"{a}_awq_2d", axis=0)],
                        f"{a}_awq_rows")
            square = node("Mul", [rows, rows], f"{a}_awq_square")
            if axes_input:
                total = node("ReduceSum", [square, const([0], f"{a}_awq_axes")], f"{a}_awq_sum", keepdims=0)
            else:
                total = node("ReduceSum", [square], f"{a}_awq_sum", axes=[0], keepdims=0)
            outputs[a] = (total, shape)
        probe.outputs(n for pair in outputs.values() for n in pair)
        session = cpu_session(model, "for the activation-weighted block search", spinning=False)
    finally:
        probe.remove()
    names = [n for pair in outputs.values() for n in pair]
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(activations, 0)
    for sample in samples:
        try:
            values = session.run(names, sample)
        except Exception as exc:  # noqa: BLE001 -- onnxruntime raises several unrelated types
            raise DataError(f"a calibration sample does not fit the model ({exc})") from None
        for i, a in enumerate(activations):
            total, shape = values[2 * i], values[2 * i + 1]
            sums[a] = sums[a] + total if a in sums else total.astype(np.float64)
            counts[a] += int(np.prod(shape[:-1]))
    result: dict[str, np.ndarray] = {}
    for weight, names_read in readers.items():
        means = [sums[a] / counts[a] for a in names_read if counts[a]]
        if means and all(m.shape == means[0].shape for m in means):
            h = np.sum(means, axis=0)
            if np.all(np.isfinite(h)):
                result[weight] = h
    return result


def measure_or_skip(model: onnx.ModelProto, weights: set[str], samples) -> tuple[dict[str, np.ndarray], str]:
    """channel_mean_squares, and a note for the result; a model that the probe cannot run is searched plainly
    (the note says why) rather than refused: the weighting only refines the scales."""
    try:
        squares = channel_mean_squares(model, weights, samples)
    except ConversionError as exc:
        return {}, f"activation-weighted block search not used: {str(exc).splitlines()[0]}"
    return squares, (f"activation-weighted block search: {len(squares)} of {len(weights)} block-wise weights "
                     "weighted by their input channels' mean squares on the calibration samples")

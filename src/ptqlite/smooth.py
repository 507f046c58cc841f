"""Activation smoothing for FULL_QUANT MatMul/Gemm inputs whose channels differ widely in range.

One int8 scale per activation tensor is set by its widest channel. Transformer activations (LayerNorm outputs,
GELU outputs, attention context) have a few channels tens of times wider than the rest, so the other channels keep
only a few codes. Since x @ W = (x / s) @ (s[:, None] * W) for any positive per-input-channel s, dividing each
channel k by s_k = amax_k ** alpha / wmax_k ** (1 - alpha) (amax_k: calibration maximum of |x[..., k]|, wmax_k:
maximum of |W[k, :]| over every weight reading x) moves part of that spread into the weights, whose per-channel
scales absorb it better (the SmoothQuant idea: Xiao et al., 2022).

The division is one float Mul per smoothed tensor in front of its MatMuls; the conversion keeps it float (the
tensor it divides is read at full precision and quantized after it). Tensors whose channels are already alike
(max over median of amax below MIN_SPREAD) are left alone, which leaves CNN classifiers unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .model import GraphIndex, attribute
from .plan import weight_layout
from .qmath import channel_shape

# Measured on all-MiniLM-L6-v2 FULL_QUANT MAX_MIN (docs/full_quant.md): alpha 0.5 / 0.7 / 0.85 gave sentence
# cosine 0.9875 / 0.9957 / 0.9931 against 0.9795 without smoothing.
ALPHA = 0.7
MIN_SPREAD = 4.0


@dataclass
class SmoothGroup:
    """An activation read as input A by MatMul/Gemm nodes with constant weights (their weight rows are its channels)."""

    tensor: str
    nodes: list[onnx.NodeProto]


def smoothing_groups(model: onnx.ModelProto, weights: set[str], skip: set[str]) -> list[SmoothGroup]:
    """Activations read as input A by MatMul/Gemm nodes whose weight is planned, 2-D and read by no other node.
    Readers that do not qualify (skipped, shared weight) keep reading the activation as it is."""
    index = GraphIndex(model.graph)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.name in skip or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in weights or x in index.initializers or len(index.initializers[w].dims) != 2:
            continue
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            continue
        if len(index.consumers[w]) != 1:
            continue
        groups.setdefault(x, []).append(node)
    return [SmoothGroup(x, nodes) for x, nodes in groups.items()]


def _input_axis(w: np.ndarray, node: onnx.NodeProto) -> int:
    """The axis of the 2-D weight B that the input's channels multiply."""
    return weight_layout(node, 1, w.shape).input_axis


def _rows(w: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """The weight as [K, N] (input channels first)."""
    return np.moveaxis(w, _input_axis(w, node), 0)


def smoothing_factors(amax: np.ndarray, weights: list[np.ndarray], alpha: float = ALPHA) -> np.ndarray | None:
    """Per-input-channel s (geometric mean 1), or None when the channels are alike enough to leave alone."""
    amax = np.asarray(amax, np.float64)
    live = amax > 0
    if not live.any() or amax.max() < MIN_SPREAD * np.median(amax[live]):
        return None
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    ok = live & (wmax > 0)
    s = np.ones_like(amax)
    s[ok] = amax[ok] ** alpha / wmax[ok] ** (1 - alpha)
    s[ok] /= np.exp(np.log(s[ok]).mean())
    return s


def smooth(model: onnx.ModelProto, groups: list[SmoothGroup], amax: dict[str, np.ndarray],
           alpha: float = ALPHA) -> tuple[list[str], dict[tuple[str, int], np.ndarray]]:
    """Apply smoothing in place. Returns the names of the inserted Mul nodes (they must stay float) and, per
    (node, input slot) of each smoothed MatMul/Gemm, the factor that maps what it reads back to the float value."""
    graph = model.graph
    index = GraphIndex(graph)
    inserted: dict[str, onnx.NodeProto] = {}  # smoothed tensor -> its Mul
    rescale: dict[tuple[str, int], np.ndarray] = {}
    for group in groups:
        if group.tensor not in amax:
            continue
        rows = [_rows(index.array(n.input[1]), n) for n in group.nodes]
        s = smoothing_factors(amax[group.tensor], rows, alpha)
        if s is None:
            continue
        base = group.tensor.replace("/", "_").strip("_")
        divisor = index.unique_name(f"{base}_smooth_inverse")
        smoothed = index.unique_name(f"{base}_smoothed")
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), divisor))
        mul = helper.make_node("Mul", [group.tensor, divisor], [smoothed], name=index.unique_name(f"{base}_smooth"))
        for node in group.nodes:
            w = index.array(node.input[1]).astype(np.float64)
            by_row = s.reshape(channel_shape(w.shape, _input_axis(w, node)))
            scaled = w * by_row
            rescale[(node.name, 0)] = s.astype(np.float32)
            rescale[(node.name, 1)] = (1.0 / by_row).astype(np.float32)
            tensor = index.initializers[node.input[1]]
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), node.input[1]))
            node.input[0] = smoothed
        inserted[smoothed] = mul
    # each Mul goes right before the first node that reads its output (its input's producer comes earlier)
    ordered: list[onnx.NodeProto] = []
    pending = dict(inserted)
    for node in graph.node:
        ordered += [pending.pop(name) for name in node.input if name in pending]
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    return [mul.name for mul in inserted.values()], rescale

"""Cross-layer equalisation (Nagel et al., "Data-Free Quantization", 2019) for per-tensor weight quantization.

For Conv A -> [ReLU] -> Conv B, scaling output channel c of A by 1/s_c and input channel c of B by s_c leaves the
function unchanged, because ReLU commutes with positive scaling. Choosing s_c = sqrt(r_A[c] / r_B[c]) (r = the
channel's largest |weight|) gives both layers the same per-channel range, so one scale per tensor fits all
channels; without it depthwise convolutions, whose channels differ by orders of magnitude, collapse to zero.
ReLU6 does not commute with scaling, so a Clip(0, 6) between two equalised convs becomes a ReLU: the graph then
differs from the original only where an activation exceeded 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .model import GraphIndex, attribute


@dataclass
class _Pair:
    first: onnx.NodeProto
    second: onnx.NodeProto
    activation: onnx.NodeProto | None


def equalize(model: onnx.ModelProto, iterations: int = 8) -> list[str]:
    """Equalise every Conv->Conv pair (which covers Conv->DepthwiseConv->Conv chains) in place; returns notes."""
    index = GraphIndex(model.graph)
    pairs = [p for node in model.graph.node if (p := _pair_after(index, node)) is not None]
    if not pairs:
        return []
    weights = {name: index.array(name).astype(np.float64) for p in pairs for name in _params(p)}
    for _ in range(iterations):
        # Sweeping the chain repeatedly converges: each pair's scale approaches 1.
        for pair in pairs:
            _equalize_pair(pair, weights)
    for name, value in weights.items():
        index.initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    relu6 = 0
    for pair in pairs:
        act = pair.activation
        if act is not None and act.op_type == "Clip":
            # Clip's bounds are inputs 1 and 2 (or attributes before opset 11); a ReLU needs only the data.
            del act.input[1:]
            del act.attribute[:]
            act.op_type = "Relu"
            relu6 += 1
    notes = [f"cross-layer equalisation of {len(pairs)} conv pairs"]
    if relu6:
        notes.append(f"{relu6} ReLU6 (Clip 0..6) between equalised convs became ReLU")
    return notes


def _params(pair: _Pair) -> list[str]:
    names = [pair.first.input[1], pair.second.input[1]]
    if len(pair.first.input) > 2 and pair.first.input[2]:
        names.append(pair.first.input[2])
    return names


def _single_consumer(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    users = index.consumers.get(tensor, [])
    if len(users) != 1 or tensor in index.graph_output_names:
        return None
    return users[0][0]


def _pair_after(index: GraphIndex, first: onnx.NodeProto) -> _Pair | None:
    if not _is_plain_conv(index, first):
        return None
    nxt = _single_consumer(index, first.output[0])
    activation = None
    if nxt is not None and nxt.op_type in ("Relu", "Clip"):
        if nxt.op_type == "Clip" and not _clip_from_zero(index, nxt):
            return None
        activation, nxt = nxt, _single_consumer(index, nxt.output[0])
    source = activation if activation is not None else first
    if nxt is None or not _is_plain_conv(index, nxt) or nxt.input[0] != source.output[0]:
        return None
    w2 = index.initializers[nxt.input[1]]
    group = attribute(nxt, "group", 1)
    in_channels = int(w2.dims[1]) * group
    if group not in (1, in_channels):
        return None
    if int(index.initializers[first.input[1]].dims[0]) != in_channels:
        return None
    return _Pair(first, nxt, activation)


def _is_plain_conv(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Conv whose weight (and bias) are constants used by this node only."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    names = [n for n in node.input[1:3] if n]
    return all(n in index.initializers and len(index.consumers[n]) == 1 for n in names)


def _clip_from_zero(index: GraphIndex, clip: onnx.NodeProto) -> bool:
    """True for a Clip with lower bound 0 (a ReLU with an upper cap)."""
    if len(clip.input) > 1 and clip.input[1]:
        name = clip.input[1]
        return name in index.initializers and float(index.array(name)) == 0.0
    return attribute(clip, "min", None) == 0.0


def _equalize_pair(pair: _Pair, weights: dict[str, np.ndarray]) -> None:
    w1 = weights[pair.first.input[1]]
    w2 = weights[pair.second.input[1]]
    channels = w1.shape[0]
    group = attribute(pair.second, "group", 1)
    # View B's weight with input channel c along axis 1: [out, in, ...] for group 1,
    # [groups(=channels), multiplier, ...] for depthwise.
    view2 = w2 if group == 1 else w2.reshape(channels, -1)
    axis2 = 1 if group == 1 else 0
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    r2 = np.abs(np.moveaxis(view2, axis2, 0).reshape(channels, -1)).max(axis=1)
    scale = np.ones(channels)
    ok = (r1 > 0) & (r2 > 0)
    scale[ok] = np.sqrt(r1[ok] / r2[ok])
    weights[pair.first.input[1]] = w1 / scale.reshape(-1, *([1] * (w1.ndim - 1)))
    if len(pair.first.input) > 2 and pair.first.input[2]:
        weights[pair.first.input[2]] = weights[pair.first.input[2]] / scale
    shape2 = [1] * view2.ndim
    shape2[axis2] = channels
    weights[pair.second.input[1]] = (view2 * scale.reshape(shape2)).reshape(w2.shape)

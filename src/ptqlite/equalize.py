"""Cross-layer equalisation (Nagel et al., "Data-Free Quantization", 2019) for per-tensor weight quantization.

For Conv A -> [ReLU] -> Conv B, scaling output channel c of A by 1/s_c and input channel c of B by s_c leaves the
function unchanged, because ReLU commutes with positive scaling. Choosing s_c = sqrt(r_A[c] / r_B[c]) (r = the
channel's largest |weight|) gives both layers the same per-channel range, so one scale per tensor fits all
channels; without it depthwise convolutions, whose channels differ by orders of magnitude, collapse to zero.
ReLU6 does not commute with scaling: after it, channel c must be capped at 6 / s_c. Given per-channel calibration
maxima, the channels that reach 6 share one scale and the ReLU6 stays one Clip that the int8 conv absorbs (per-
channel caps would run as a float Min); without them, Clip(0, 6) becomes Relu -> Min(per-channel caps), exact for
any input. (Replacing it by a plain ReLU, as the paper does, cost MobileNet V2 -- a model fine-tuned for
quantization, whose activations often reach 6 -- 13.5 points of float top-1.)
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


def capped_tensors(model: onnx.ModelProto) -> list[str]:
    """The inputs of the ReLU6 (Clip 0..m) nodes that equalisation would rescale: `equalize` needs their
    per-channel maxima to replace each cap by one Clip instead of per-channel Min caps."""
    index = GraphIndex(model.graph)
    pairs = _pairs(index)
    return [p.activation.input[0] for p in pairs if p.activation is not None and p.activation.op_type == "Clip"]


def equalize(model: onnx.ModelProto, iterations: int = 8,
             channel_max: dict[str, np.ndarray] | None = None) -> list[str]:
    """Equalise Conv->Conv pairs (a depthwise conv with the conv before it) in place; returns notes.

    `channel_max` maps the input of a ReLU6 between equalised convs (see `capped_tensors`) to its per-channel
    maximum over calibration data. With it, the channels that reach the cap share one scale and the ReLU6 becomes
    a single Clip(0, cap / s) that the int8 producer absorbs; without it, Relu -> Min(per-channel caps)."""
    index = GraphIndex(model.graph)
    pairs = _pairs(index)
    if not pairs:
        return []
    weights = {name: index.array(name).astype(np.float64) for p in pairs for name in _params(p)}
    scales = [np.ones(int(index.initializers[p.first.input[1]].dims[0])) for p in pairs]
    for _ in range(iterations):
        # Sweeping the chain repeatedly converges: each pair's scale approaches 1.
        for i, pair in enumerate(pairs):
            scales[i] *= _equalize_pair(pair, weights)
    uniform = 0
    for i, pair in enumerate(pairs):
        act = pair.activation
        if channel_max is not None and act is not None and act.op_type == "Clip" and act.input[0] in channel_max:
            scales[i], bound = _share_cap(pair, weights, scales[i], channel_max[act.input[0]],
                                          _clip_max(index, act))
            _set_clip_max(model.graph, index, act, bound)
            uniform += 1
    for name, value in weights.items():
        index.initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    capped = []
    for pair, scale in zip(pairs, scales):
        act = pair.activation
        if act is not None and act.op_type == "Clip" and not (channel_max and act.input[0] in channel_max):
            rank = len(index.initializers[pair.first.input[1]].dims)  # the conv's output rank
            capped.append(_cap_per_channel(model.graph, index, act, _clip_max(index, act) / scale, rank))
    if capped:
        # Put each Min right after its Relu so that the node list stays in topological order.
        position = {id(node): i for i, node in enumerate(model.graph.node)}
        order = sorted(capped, key=lambda pair: -position[id(pair[0])])
        for relu, cap in order:
            model.graph.node.insert(position[id(relu)] + 1, cap)
    notes = [f"cross-layer equalisation of {len(pairs)} conv pairs"]
    if capped:
        notes.append(f"{len(capped)} ReLU6 (Clip 0..6) between equalised convs became Relu -> Min(per-channel cap)")
    if uniform:
        notes.append(f"{uniform} ReLU6 between equalised convs kept as one Clip: the channels that reach the cap "
                     "share one scale")
    return notes


def _share_cap(pair: _Pair, weights: dict[str, np.ndarray], scale: np.ndarray, peak: np.ndarray,
               cap: float) -> tuple[np.ndarray, float]:
    """Give the channels whose calibration maximum reaches the cap one common scale s_b, so that one bound
    cap / s_b clips them all exactly; lift the scale of the other channels where needed so that their observed
    maximum stays under that bound. Rescales the pair's weights in place; returns the new scales and the bound."""
    w1 = weights[pair.first.input[1]]
    channels = w1.shape[0]
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1) * scale  # ranges before equalisation
    r2 = _input_ranges(pair, weights) / scale
    peak = np.asarray(peak, dtype=np.float64).reshape(-1)
    binding = peak >= cap
    target = scale.copy()
    if binding.any():
        # The binding channels act as one channel: balance their joint ranges like _equalize_pair does one.
        top1, top2 = r1[binding].max(), r2[binding].max()
        target[binding] = np.sqrt(top1 / top2) if top1 > 0 and top2 > 0 else 1.0
        bound = cap / float(target[binding][0])
        target = np.where(binding, target, np.maximum(target, peak / bound))
    else:
        bound = float(np.max(cap / target))  # clips no channel earlier than the ReLU6 did
    _rescale_pair(pair, weights, target / scale)
    return target, bound


def _input_ranges(pair: _Pair, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Largest |w| of the second conv per input channel (the channels of the first conv's output)."""
    w2 = weights[pair.second.input[1]]
    channels = weights[pair.first.input[1]].shape[0]
    if attribute(pair.second, "group", 1) == 1:
        return np.abs(np.moveaxis(w2, 1, 0).reshape(channels, -1)).max(axis=1)
    return np.abs(w2.reshape(channels, -1)).max(axis=1)


def _rescale_pair(pair: _Pair, weights: dict[str, np.ndarray], factor: np.ndarray) -> None:
    """Divide the first conv's output channel c by factor_c and multiply the second's input channel c by it."""
    w1 = weights[pair.first.input[1]]
    weights[pair.first.input[1]] = w1 / factor.reshape(-1, *([1] * (w1.ndim - 1)))
    if len(pair.first.input) > 2 and pair.first.input[2]:
        weights[pair.first.input[2]] = weights[pair.first.input[2]] / factor
    _scale_inputs(pair, weights, factor)


def _scale_inputs(pair: _Pair, weights: dict[str, np.ndarray], factor: np.ndarray) -> None:
    """Multiply the second conv's input channel c by factor_c."""
    w2 = weights[pair.second.input[1]]
    if attribute(pair.second, "group", 1) == 1:
        weights[pair.second.input[1]] = w2 * factor.reshape(1, -1, *([1] * (w2.ndim - 2)))
    else:  # depthwise: [channels x multiplier, 1, ...], input channel c owns `multiplier` consecutive rows
        weights[pair.second.input[1]] = (w2.reshape(factor.size, -1) * factor[:, None]).reshape(w2.shape)


def _set_clip_max(graph: onnx.GraphProto, index: GraphIndex, clip: onnx.NodeProto, bound: float) -> None:
    """Rewrite the Clip as Clip(x, 0, bound) with its own bound constants (the old ones may be shared)."""
    low = index.unique_name(f"{clip.output[0]}_min")
    high = index.unique_name(f"{clip.output[0]}_max")
    graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), low))
    graph.initializer.append(numpy_helper.from_array(np.array(bound, np.float32), high))
    del clip.attribute[:]
    del clip.input[1:]
    clip.input.extend([low, high])


def _clip_max(index: GraphIndex, clip: onnx.NodeProto) -> float:
    if len(clip.input) > 2 and clip.input[2]:
        return float(index.array(clip.input[2]))
    return float(attribute(clip, "max", np.inf))


def _cap_per_channel(graph: onnx.GraphProto, index: GraphIndex, clip: onnx.NodeProto, caps: np.ndarray,
                     rank: int) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """Clip(0, m) becomes Relu -> Min(caps shaped [C, 1, ...] to broadcast over the spatial axes); the Min takes
    over the Clip's output name."""
    output = clip.output[0]
    relu_out = index.unique_name(f"{output}_relu")
    cap_name = index.unique_name(f"{output}_cap")
    graph.initializer.append(numpy_helper.from_array(caps.astype(np.float32).reshape(-1, *[1] * (rank - 2)),
                                                     cap_name))
    del clip.input[1:]
    del clip.attribute[:]
    clip.op_type = "Relu"
    clip.output[0] = relu_out
    cap = onnx.helper.make_node("Min", [relu_out, cap_name], [output], name=index.unique_name(f"{output}_min"))
    return clip, cap


def _pairs(index: GraphIndex) -> list[_Pair]:
    return [p for node in index.graph.node if (p := _pair_after(index, node)) is not None]


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
    # A depthwise conv is equalised with the conv before it only. Pairing it with the conv after it too (the
    # paper's Conv -> DW -> Conv chain) measured worse on MobileNet V2 per tensor: output cosine 0.983 vs 0.989
    # (MAX_MIN), top-1 84.5 vs 85.75 (KL); pairing it only with the conv after it gave 0.950. It also halves the
    # ReLU6 caps that run in float.
    if not _is_plain_conv(index, first) or _is_depthwise(index, first):
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


def _is_depthwise(index: GraphIndex, conv: onnx.NodeProto) -> bool:
    return attribute(conv, "group", 1) > 1 and int(index.initializers[conv.input[1]].dims[1]) == 1


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


def _equalize_pair(pair: _Pair, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Rescale one pair in place; returns the scale s (A's output channel c was divided by s_c)."""
    w1 = weights[pair.first.input[1]]
    channels = w1.shape[0]
    has_bias = len(pair.first.input) > 2 and bool(pair.first.input[2])
    bias = weights[pair.first.input[2]] if has_bias else np.zeros(channels)
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    if pair.activation is not None:
        # A channel of A with zero weights and a bias <= 0 is 0 after the ReLU: B's weights reading it do not
        # matter, and zeroing them keeps them from setting B's per-tensor range (MobileNet V2 has such channels).
        _scale_inputs(pair, weights, (~((r1 == 0) & (bias <= 0))).astype(np.float64))
    r2 = _input_ranges(pair, weights)
    scale = np.ones(channels)
    ok = (r1 > 0) & (r2 > 0)
    scale[ok] = np.sqrt(r1[ok] / r2[ok])
    # A channel of A with zero weights is a constant (its bias): any scale keeps A's weights equal, so shrink B's
    # input channel to the largest equalised range of B instead.
    free = (r1 == 0) & (r2 > 0)
    if free.any() and ok.any():
        scale[free] = np.minimum(1.0, np.max(r2[ok] * scale[ok]) / r2[free])
    _rescale_pair(pair, weights, scale)
    return scale

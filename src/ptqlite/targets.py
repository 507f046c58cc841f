"""target_device presets: what the FULL_QUANT planner quantizes, and how, for each runtime.

They are data only; the FULL_QUANT package (passes/full/) reads them and has no per-device branches, and
DYNAMIC_QUANT reads the CPU preset's kernel rules (its graph runs on onnxruntime's CPU provider).
docs/full_quant.md gives the reason for every choice (and the measurements behind the CPU one).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

# Ops that compute on integers when their inputs and output carry QDQ pairs (own output parameters).
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# Softmax stays float: an exponential turns the input's absolute rounding into relative errors of the
# probabilities, and an attention mask's sentinel (-1e4 .. -3.4e38) would take the whole int8 range of its input
# (MiniLM FULL_QUANT: sentence-embedding cosine 0.44 with an int8 Softmax, 0.98 without).
_COMPUTE_CPU = WEIGHTED_OPS | {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid",
                               "LeakyRelu", "Relu", "Clip"}
# Ops that only move or select values: their output reuses the input's parameters, so onnxruntime drops the
# DequantizeLinear/QuantizeLinear around them and runs them on the integer tensor.
_SHARED = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "GlobalMaxPool",
                     "Resize", "Slice", "Gather", "Pad", "Identity", "DepthToSpace", "SpaceToDepth", "Expand",
                     "Tile", "Split"})
# Activations that may be folded into the producing op: dropped when the output quantizer clamps the same way.
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})


@dataclass(frozen=True)
class Target:
    """How one target_device wants its int8 graph."""

    name: str
    provider: str  # onnxruntime execution provider the preset is meant for
    activation_type: int  # TensorProto.UINT8 or TensorProto.INT8
    activation_symmetric: bool  # zero point fixed at 0
    weight_per_tensor_type: int  # weight dtype when per_channel=false (per-channel weights are always int8)
    weight_per_tensor_symmetric: bool
    compute_ops: frozenset[str]  # ops run in int8 with their own output parameters
    shared_ops: frozenset[str] = _SHARED  # ops whose output shares the input's parameters
    # Weighted ops whose output stays float where no int8 op reads it (a graph output, a float consumer):
    # onnxruntime runs them as int8 kernels with float output, and the logits keep full precision. A Conv has no
    # such kernel: left float it would dequantize its weight at every run (MobileNet V2's 1x1 logits conv: 1.10x
    # instead of 1.0x the latency of quantize_static's model), so its output is quantized like any other.
    float_output_ops: frozenset[str] = frozenset({"MatMul", "Gemm"})
    # Give the 1-D bias Add after an int8 MatMul with float output the output's rank on static 3-D+ shapes:
    # onnxruntime's MatMulAddFusion (it runs before its QDQ fusions) would otherwise make a float Gemm of the pair,
    # which dequantizes the weight at every run (static-shape MiniLM: 1.63x float instead of 0.74x).
    bias_with_output_rank: bool = True
    # Keep every pair of u8*s8 products inside int16 (x86 kernels without VNNI add them with saturation): the
    # weight scale of a channel grows where two neighbouring codes could sum past 128. Depthwise kernels widen to
    # 16 bits before multiplying and keep full int8 weights. On for every preset: their models are also run and
    # checked under onnxruntime's CPU provider, and the rule costs no measurable accuracy on the exact kernels of
    # the other runtimes (MobileNet V2 with QDQ arithmetic: 86.0-87.0 top-1 with or without it).
    int16_pair_sums: bool = True
    # Store Gather embedding tables as int8 rows with a scale each and dequantize only the gathered rows (Gather on
    # int8, Cast, Mul): onnxruntime's CPU provider runs that; the other runtimes' int8 Gather support varies.
    int8_gather_tables: bool = False

    @property
    def activation_signed(self) -> bool:
        return self.activation_type == TensorProto.INT8


PRESETS: dict[str, Target] = {
    # onnxruntime CPU: uint8 asymmetric activations with int8 symmetric weights (the u8s8 kernels of MLAS; s8s8
    # measured slower on x86, see docs/full_quant.md).
    # The AVX2 kernels (CPUs without VNNI) add u8*s8 products pairwise in int16 and saturate with full-range
    # weights (MobileNet V2: 80.5 top-1 instead of 86.75): weights keep 8 bits but no pair may overflow.
    "CPU": Target("CPU", "CPUExecutionProvider", TensorProto.UINT8, False, TensorProto.INT8, True, _COMPUTE_CPU,
                  int8_gather_tables=True),
    # TensorRT: int8 symmetric everywhere (zero point 0 is the only one it accepts), per-channel weights; it fuses
    # Conv+ReLU itself, so activations are never dropped (the symmetric zero point keeps them anyway).
    "NVGPU": Target("NVGPU", "TensorrtExecutionProvider", TensorProto.INT8, True, TensorProto.INT8, True,
                    _COMPUTE_CPU),
    # Qualcomm QNN HTP: uint8 asymmetric activations; per-channel weights must be int8 symmetric, per-tensor
    # weights are uint8 asymmetric like the activations. HTP wants every tensor quantized, so the
    # elementwise activations and InstanceNormalization are quantized too. LayerNormalization is not: its input
    # (a transformer's residual stream) and output carry channels tens of times wider than the rest, and one
    # uint8 scale per tensor loses the bulk of the values (MiniLM: output cosine to float 0.68 -> 0.87 without it,
    # docs/results.md "Portable outputs").
    "DSP": Target("DSP", "QNNExecutionProvider", TensorProto.UINT8, False, TensorProto.UINT8, False,
                  _COMPUTE_CPU | {"Tanh", "HardSigmoid", "HardSwish", "Sub", "Div", "ReduceMean", "Softmax",
                                  "PRelu", "Sigmoid", "InstanceNormalization"}),
    # Ascend (CANN): int8 asymmetric activations, symmetric int8 weights.
    "ASCEND": Target("ASCEND", "CANNExecutionProvider", TensorProto.INT8, False, TensorProto.INT8, True,
                     _COMPUTE_CPU),
}


def target(name: str) -> Target:
    """The preset for a config's target_device (config.py already limits the names)."""
    return PRESETS[name]

"""The conversion flow: copy the model, prepare it, run the pass for the configured quant mode."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import onnx

from .config import QuantConfig
from .model import constants_to_initializers, lift_subgraph_constants, name_unnamed_nodes
from .plan import weight_tensors
from .result import ConversionResult, SkippedTensor

# A pass: run(model, config, **options) -> ConversionResult, on the copy that convert() made.
QuantPass = Callable[..., ConversionResult]


def pass_for(config: QuantConfig) -> QuantPass:
    """The run() of the pass for the config's quant mode (config.py admits no other quant_type).

    Each pass is imported here, when it is chosen: `import ptqlite` then loads no pass, so the benchmark's
    memory-measuring child process (which imports ptqlite) does not count the passes' imports (all four
    together, with the onnxruntime and onnx.reference they import, add about 15 MB to its peak)."""
    if config.quant_type == "WEIGHT_QUANT" and config.is_mixed_bit:
        from .passes import mixed_bit

        return mixed_bit.run
    if config.quant_type == "WEIGHT_QUANT":
        from .passes import weight

        return weight.run
    if config.quant_type == "FULL_QUANT":
        from .passes import full

        return full.run
    from .passes import dynamic  # DYNAMIC_QUANT

    return dynamic.run


def convert(model: onnx.ModelProto, config: QuantConfig, **options: Any) -> ConversionResult:
    """Quantize a copy of `model` as `config` says; `model` itself is left untouched.

    options are passed to the pass (e.g. input_format="NHWC" for calibration images, progress=False).
    """
    started = time.perf_counter()
    quant_pass = pass_for(config)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    constants_to_initializers(work)
    # Weights of If/Loop/Scan bodies move to the main graph (the bodies read them from the outer scope), so every
    # pass plans them like any other.
    lift_subgraph_constants(work)
    # Unnamed nodes (common in converted models) get their first output's name, so skip_quant_node can list them.
    name_unnamed_nodes(work)
    weights = weight_tensors(work)
    result = quant_pass(work, config, **options)
    _account_for_every_weight(result, weights, config)
    if config.common.debug_info_save_path:
        from .report import debug_report

        debug_report(model, result, config, options.get("input_format"), options.get("samples"))
    result.seconds = time.perf_counter() - started
    return result


def _account_for_every_weight(result: ConversionResult, weights: dict[str, tuple[str, tuple[str, ...]]],
                              config: QuantConfig) -> None:
    """List as skipped, with the reason, every float weight that the pass neither quantized nor skipped (an op
    type the mode does not quantize), so that "quantized N, skipped M" covers every weight of the model."""
    seen = {t.tensor for t in result.quantized} | {t.tensor for t in result.skipped}
    for name, (op, nodes) in weights.items():
        if name not in seen:
            result.skipped.append(SkippedTensor(name, op, nodes, f"{config.quant_type} does not quantize {op} "
                                                "weights"))


def quantize(model: onnx.ModelProto, config: QuantConfig, **options: Any) -> onnx.ModelProto:
    """Python API: the quantized model only."""
    return convert(model, config, **options).model

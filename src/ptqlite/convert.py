"""The conversion flow: copy the model, prepare it, run the pass for the configured quant mode."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import onnx

from .config import QuantConfig
from .model import constants_to_initializers, name_unnamed_nodes
from .result import ConversionResult

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
    # Unnamed nodes (common in converted models) get their first output's name, so skip_quant_node can list them.
    name_unnamed_nodes(work)
    result = quant_pass(work, config, **options)
    if config.common.debug_info_save_path:
        from .report import debug_report

        debug_report(model, result, config, options.get("input_format"), options.get("samples"))
    result.seconds = time.perf_counter() - started
    return result


def quantize(model: onnx.ModelProto, config: QuantConfig, **options: Any) -> onnx.ModelProto:
    """Python API: the quantized model only."""
    return convert(model, config, **options).model

"""The conversion flow: copy the model, prepare it, run the pass for the configured quant mode."""

from __future__ import annotations

import importlib
import time
from typing import Any

import onnx

from .config import QuantConfig
from .errors import UnsupportedError
from .model import constants_to_initializers, name_unnamed_nodes
from .result import ConversionResult

# quant mode -> module in ptqlite.passes whose run() does it
_PASSES = {
    ("WEIGHT_QUANT", "fixed"): "weight",
    ("WEIGHT_QUANT", "mixed"): "mixed_bit",
    ("FULL_QUANT", "fixed"): "full",
    ("DYNAMIC_QUANT", "fixed"): "dynamic",
}


def _pass_for(config: QuantConfig):
    key = (config.quant_type, "mixed" if config.is_mixed_bit else "fixed")
    label = "WEIGHT_QUANT mixed bit (bit_num=0)" if config.is_mixed_bit else config.quant_type
    name = f"ptqlite.passes.{_PASSES.get(key)}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the pass exists but something it imports is missing: a real error
            raise
        raise UnsupportedError(f"{config.source}: quant_type {label} is not supported yet") from None


def convert(model: onnx.ModelProto, config: QuantConfig, **options: Any) -> ConversionResult:
    """Quantize a copy of `model` as `config` says; `model` itself is left untouched.

    options are passed to the pass (e.g. input_format="NHWC" for calibration images, progress=False).
    """
    started = time.perf_counter()
    quant_pass = _pass_for(config)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    constants_to_initializers(work)
    # Unnamed nodes (common in converted models) get their first output's name, so skip_quant_node can list them.
    name_unnamed_nodes(work)
    result = quant_pass.run(work, config, **options)
    if config.common.debug_info_save_path:
        from .report import debug_report

        debug_report(model, result, config, options.get("input_format"), options.get("samples"))
    result.seconds = time.perf_counter() - started
    return result


def quantize(model: onnx.ModelProto, config: QuantConfig, **options: Any) -> onnx.ModelProto:
    """Python API: the quantized model only."""
    return convert(model, config, **options).model

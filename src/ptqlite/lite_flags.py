"""converter_lite's other flags: accepted where the value means nothing for an ONNX output or is what ptqlite does
anyway, honoured where ptqlite can (--fp16=on, --inputDataType/--outputDataType INT8/UINT8), refused in one line
otherwise (docs/spec.md, "Command line"). The Python API takes --fp16 and --input/outputDataType as keywords
(from_keywords) and shares the checks and the integer boundaries with the command line."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from .config import QuantConfig
from .errors import UsageError
from .result import ConversionResult

# flag -> {accepted value: what it means here}; values are matched as converter_lite does (exact case), and a
# flag that is absent takes converter_lite's default, which is always accepted.
ACCEPTED: dict[str, dict[str, str]] = {
    "--fp16": {"off": "float parts stay float32 (the default)",
               "on": "the float32 constants left unquantized are stored as float16"},
    "--optimize": {"none": "ONNX Runtime applies its own graph optimisations at load",
                   "general": "ONNX Runtime applies its own graph optimisations at load",
                   "gpu_oriented": "the output is an ONNX model; the NVGPU preset is target_device=NVGPU",
                   "ascend_oriented": "the output is an ONNX model; the ASCEND preset is target_device=ASCEND"},
    "--inputDataType": {"DEFAULT": "inputs keep the model's types", "FLOAT32": "inputs keep the model's types",
                        "INT8": "FULL_QUANT: float inputs become int8 codes",
                        "UINT8": "FULL_QUANT: float inputs become uint8 codes"},
    "--outputDataType": {"DEFAULT": "outputs keep the model's types", "FLOAT32": "outputs keep the model's types",
                         "INT8": "FULL_QUANT: float outputs become int8 codes",
                         "UINT8": "FULL_QUANT: float outputs become uint8 codes"},
    "--encryption": {"false": "the output is a plain ONNX file"},
    "--infer": {"true": "the verification gate runs the output anyway",
                "false": "the verification gate runs the output anyway (--verify=off skips it)"},
    "--trainModel": {"false": "an inference model"},
}
# flags with no value ptqlite can honour -> why
REFUSED: dict[str, str] = {
    "--saveType": "ptqlite writes ONNX models only (.onnx); drop --saveType",
    "--device": "ptqlite writes an ONNX model for ONNX Runtime; the int8 preset comes from target_device in "
                "[full_quant_param]; drop --device",
    "--encryptKey": "ptqlite does not encrypt models; drop --encryptKey",
    "--decryptKey": "ptqlite reads unencrypted models only; drop --decryptKey",
    "--decryptMode": "ptqlite reads unencrypted models only; drop --decryptMode",
    "--cryptoLib": "ptqlite reads unencrypted models only; drop --cryptoLib",
    "--weightFile": "--weightFile belongs to Caffe models; ptqlite reads ONNX, so export the model to ONNX",
}
REASONS = {
    "--encryption": "ptqlite does not encrypt models",
    "--trainModel": "ptqlite converts inference models only",
}


@dataclass(frozen=True)
class LiteOptions:
    fp16: bool = False
    input_type: str | None = None  # "INT8" / "UINT8" when --inputDataType asks for integer inputs
    output_type: str | None = None
    optimize: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, values in ACCEPTED.items():
        parser.add_argument(flag, default="", help="converter_lite flag: " + ", ".join(values))
    for flag in REFUSED:
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)


INTEGER = ("INT8", "UINT8")
# the Python API's keyword for each flag it shares with the command line (ptqlite.convert(fp16=..., ...))
KEYWORDS = {"--fp16": "fp16", "--inputDataType": "input_data_type", "--outputDataType": "output_data_type"}


def check_value(flag: str, value: str, name: str | None = None) -> None:
    """UsageError (one line, naming `name`, default the flag) unless `value` is one converter_lite accepts here."""
    accepted = ACCEPTED[flag]
    if value and value not in accepted:
        reason = REASONS.get(flag, "")
        raise UsageError(f"{name or flag}={value}: expected one of {', '.join(accepted)}"
                         + (f" ({reason})" if reason else ""))


def read(args: argparse.Namespace) -> LiteOptions:
    """The converter_lite flags of the command line; UsageError (one line) for a value ptqlite cannot honour."""
    for flag, why in REFUSED.items():
        value = getattr(args, flag[2:])
        if value is not None:
            raise UsageError(f"{flag}={value}: {why}")
    values = {}
    for flag in ACCEPTED:
        value = getattr(args, flag[2:])
        check_value(flag, value)
        values[flag] = value
    return LiteOptions(fp16=values["--fp16"] == "on",
                       input_type=values["--inputDataType"] if values["--inputDataType"] in INTEGER else None,
                       output_type=values["--outputDataType"] if values["--outputDataType"] in INTEGER else None,
                       optimize=values["--optimize"])


def from_keywords(fp16: bool, input_data_type: str, output_data_type: str) -> LiteOptions:
    """The same options as the Python API's keywords; the messages are the command line's, naming the keyword."""
    if not isinstance(fp16, bool):
        raise UsageError(f"fp16={fp16!r}: expected True or False")
    for flag, value in (("--inputDataType", input_data_type), ("--outputDataType", output_data_type)):
        if not isinstance(value, str) or not value:
            raise UsageError(f"{KEYWORDS[flag]}={value!r}: expected one of {', '.join(ACCEPTED[flag])}")
        check_value(flag, value, KEYWORDS[flag])
    return LiteOptions(fp16=fp16, input_type=input_data_type if input_data_type in INTEGER else None,
                       output_type=output_data_type if output_data_type in INTEGER else None)


def check_for_config(lite: LiteOptions, config: QuantConfig, keywords: bool = False) -> None:
    """The options that depend on the config's mode (messages name the flags, or the API's keywords)."""
    for flag, value in (("--inputDataType", lite.input_type), ("--outputDataType", lite.output_type)):
        if value and config.quant_type != "FULL_QUANT":
            raise UsageError(f"{KEYWORDS[flag] if keywords else flag}={value}: needs quant_type=FULL_QUANT in the "
                             f"config ({config.quant_type} keeps float activations, so there are no integer codes "
                             "at the model's boundary)")


def integer_boundaries(result: ConversionResult, model: onnx.ModelProto, config: QuantConfig, lite: LiteOptions,
                       shapes: dict[str, list[int]] | None, input_format: str | None,
                       samples: Iterable[dict[str, np.ndarray]] | None = None) -> None:
    """INT8/UINT8 graph inputs/outputs (io_types.py), their scales in the notes. The ranges come from `samples`
    (the Python API's in-memory data) or else the config's calibration data."""
    from .data import calibration_set
    from .io_types import METADATA_KEY, quantize_io
    from .model import set_input_shapes
    from .runtime import cpu_session

    if samples is None:
        shaped = model
        if shapes:
            shaped = onnx.ModelProto()
            shaped.CopyFrom(model)
            set_input_shapes(shaped, shapes)
        samples = calibration_set(config, shaped, input_format)
    done = quantize_io(result.model, lite.input_type, lite.output_type, samples)
    cpu_session(result.model, "with integer inputs/outputs", spinning=False)  # a load check of what is written
    result.notes += [b.describe() for b in done]
    if done:
        result.notes.append(f"callers quantize inputs as clamp(round(x / scale) + zero_point) and read outputs as "
                            f"(y - zero_point) * scale; the parameters are in metadata_props '{METADATA_KEY}' "
                            "(JSON); the verification compared the model before this change of its boundary")

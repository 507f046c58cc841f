"""converter_lite's other flags: accepted where the value means nothing for an ONNX output or is what ptqlite does
anyway, honoured where ptqlite can (--fp16=on, --inputDataType/--outputDataType INT8/UINT8), refused in one line
otherwise (docs/spec.md, "Command line")."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .errors import UsageError

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


def read(args: argparse.Namespace) -> LiteOptions:
    """The converter_lite flags of the command line; UsageError (one line) for a value ptqlite cannot honour."""
    for flag, why in REFUSED.items():
        value = getattr(args, flag[2:])
        if value is not None:
            raise UsageError(f"{flag}={value}: {why}")
    values = {}
    for flag, accepted in ACCEPTED.items():
        value = getattr(args, flag[2:])
        if value and value not in accepted:
            reason = REASONS.get(flag, "")
            raise UsageError(f"{flag}={value}: expected one of {', '.join(accepted)}" + (f" ({reason})" if reason else ""))
        values[flag] = value
    integer = ("INT8", "UINT8")
    return LiteOptions(fp16=values["--fp16"] == "on",
                       input_type=values["--inputDataType"] if values["--inputDataType"] in integer else None,
                       output_type=values["--outputDataType"] if values["--outputDataType"] in integer else None,
                       optimize=values["--optimize"])

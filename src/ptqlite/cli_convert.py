"""Quantize a model as a config file says (the converter_lite command line)."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

from . import lite_flags
from .config import load_config
from .convert import (
    convert,
    discard_checked_copy,
    discard_output,
    discard_reports,
    publish_output,
    publish_reports,
    streaming_refusal,
)
from .errors import UsageError
from .model import (
    SUPPORTED_FMKS,
    check_fmk,
    external_locations,
    iter_tensors,
    load_model,
    parse_input_shapes,
    save_model,
    stored_bytes,
    tensor_bytes,
    too_large_for_one_file,
    weight_free_copy,
)
from .paths import check_input_file, check_not_special, check_output_file, is_devnull
from .result import ConversionResult, Verification
from .stream import has_external_data, trim_heap
from .verify import SYNTHETIC_NOTE, describe, is_synthetic, run_gate, verification_inputs


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by convert and analyze."""
    parser.add_argument("--fmk", required=True, help=f"model framework: {', '.join(SUPPORTED_FMKS)}")
    parser.add_argument("--modelFile", required=True, help="input model file")
    parser.add_argument("--configFile", required=True, help="quantization config (INI, see docs/spec.md)")
    parser.add_argument("--inputShape", default="", help='fixed input shapes, e.g. "in:1,3,224,224;in2:1,10"')
    parser.add_argument("--inputDataFormat", default="", choices=["", "NCHW", "NHWC"],
                        help="layout of 4-D model inputs for calibration data (default: read from the model)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--outputFile", required=True, help="output model path (.onnx is added if missing)")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("--verify", default="on",
                        help="on (default): run the output next to the float model before writing it; off: skip")
    parser.add_argument("--verifyFloor", default="",
                        help="a min output cosine below this number in (0, 1] is an error instead of a warning")
    lite_flags.add_arguments(parser)


def load_inputs(args: argparse.Namespace, apply_shapes: bool = True, lazy=None):
    """The config and the model; --inputShape is checked and, with apply_shapes, written into the model.
    `lazy(config)` true: the model's external data stays in its files (a streaming conversion)."""
    check_fmk(args.fmk)  # before the config, so a wrong framework is the error a user sees first
    shapes = parse_input_shapes(args.inputShape) if args.inputShape else None
    check_input_file(args.configFile, "--configFile")  # a FIFO would block the read
    config = load_config(args.configFile)
    model = load_model(args.modelFile, args.fmk, shapes, apply_shapes=apply_shapes,
                       lazy=bool(lazy and lazy(config)))
    return config, model


def verify_options(args: argparse.Namespace) -> tuple[bool, float | None]:
    """--verify and --verifyFloor: (run the gate, explicit floor or None)."""
    if args.verify not in ("on", "off"):
        raise UsageError(f"--verify={args.verify}: expected on or off")
    if not args.verifyFloor:
        return args.verify == "on", None
    try:
        floor = float(args.verifyFloor)
    except ValueError:
        floor = float("nan")
    if not 0.0 < floor <= 1.0:  # also refuses nan
        raise UsageError(f"--verifyFloor={args.verifyFloor}: expected a number in (0, 1]")
    if args.verify == "off":
        raise UsageError(f"--verifyFloor={args.verifyFloor}: needs --verify=on")
    return True, floor


def analyze_command(args: argparse.Namespace) -> str:
    """The `ptqlite analyze` command line for the same model, config and shapes."""
    parts = ["ptqlite", "analyze", f"--fmk={args.fmk}", f"--modelFile={shlex.quote(args.modelFile)}",
             f"--configFile={shlex.quote(args.configFile)}"]
    if args.inputShape:
        parts.append(f"--inputShape={shlex.quote(args.inputShape)}")
    if args.inputDataFormat:
        parts.append(f"--inputDataFormat={args.inputDataFormat}")
    return " ".join(parts)


def output_path(text: str) -> Path:
    """`--outputFile=out/m` writes out/m.onnx; a name already ending in .onnx is kept."""
    path = Path(text)
    return path if path.suffix.lower() == ".onnx" else path.with_name(path.name + ".onnx")


def run(args: argparse.Namespace) -> int:
    check_fmk(args.fmk)
    if not args.outputFile.strip():
        raise UsageError("--outputFile is empty; expected the output model's path, e.g. --outputFile=out/model.onnx")
    # /dev/null: convert and check everything, write nothing (a dry run); the summary says so.
    discard = is_devnull(args.outputFile)
    out = Path(os.devnull) if discard else output_path(args.outputFile)
    if not discard:
        check_not_special(args.outputFile, "--outputFile")
        if out.exists() and Path(args.modelFile).exists() and os.path.samefile(out, args.modelFile):
            raise UsageError(f"--outputFile={args.outputFile}: would overwrite the input model; choose another path")
        check_output_file(out, "--outputFile")
    verify, floor = verify_options(args)
    lite = lite_flags.read(args)
    shapes = parse_input_shapes(args.inputShape) if args.inputShape else None
    # Streaming (stream.py): the weights stay in the input's data files and are read one at a time; the output
    # is written while the pass runs. Not for a dry run, which has no folder to write the data file in.
    config, model = load_inputs(args, apply_shapes=False, lazy=lambda c: not discard and args.fmk == "ONNX"
                                and not streaming_refusal(c, shapes, args.modelFile, lite.fp16))
    lite_flags.check_for_config(lite, config)
    # the input's size for the summary, from the loaded model's entries (the pass may change them in place)
    source_bytes = stored_bytes(args.modelFile, model if args.fmk == "ONNX" else None)
    streamed = has_external_data(model, iter_tensors)
    if not discard:
        _check_input_data_kept(model, Path(args.modelFile), out)
    # The gate runs here, once the loaded float model is dropped, where its float side can be loaded from the file
    # (an ONNX model as loaded, no --inputShape or debug reports, no integer boundaries that read it afterwards):
    # the output's ONNX Runtime session then loads without the float model's weights held beside it.
    gate_here = (verify and not streamed and args.fmk == "ONNX" and not shapes and not lite.input_type
                 and not lite.output_type and not config.common.debug_info_save_path)
    # With --inputShape the pass works on the loaded model itself and the gate reads the float model from the file
    # (no copy of the weights beside it); integer boundaries read the float model afterwards. With --verify=off
    # nothing reads it afterwards either (unless integer boundaries do), so the pass may work on it too.
    given_up = (bool(shapes) and not streamed and args.fmk == "ONNX" and not lite.input_type
                and not lite.output_type)
    # the gate's inputs are read from the model's graph inputs: kept without the weights, since the pass works on
    # `model` itself (in_place)
    inputs_of = weight_free_copy(model) if gate_here else None
    result = convert(model, config, input_format=args.inputDataFormat or None, model_path=args.modelFile,
                     defer_reports=True, input_shapes=shapes, verify=verify and not gate_here, verify_floor=floor,
                     analyze_command=analyze_command(args), float16=lite.fp16,
                     stream_to=out if streamed else None,
                     in_place=gate_here or given_up or (not verify and not lite.input_type and not lite.output_type),
                     keep_checked_copy=gate_here)
    try:
        if gate_here:
            started = time.perf_counter()
            del model
            trim_heap()
            inputs = verification_inputs(inputs_of, config, args.inputDataFormat or None)
            # the float model from the input checks' copy (its weights mapped from a data file), else from the file
            float_file = str(result.checked_copy or args.modelFile)
            run_gate(None, None, float_file, result, config, {"input_format": args.inputDataFormat or None},
                     floor, analyze_command(args), None, None, inputs=inputs)
            result.seconds += time.perf_counter() - started
    finally:
        discard_checked_copy(result)
    refusal = "" if streamed or discard or args.fmk != "ONNX" else streaming_refusal(config, shapes, args.modelFile,
                                                                                      lite.fp16)
    if refusal and stored_bytes(args.modelFile) > os.path.getsize(args.modelFile):  # it has external data
        result.notes.append(f"not streamed: {refusal}, so the model was loaded whole with its external data "
                            "(memory grows with the model)")
    if shapes and args.fmk == "PYTORCH":
        result.notes.append("the TorchScript model is traced at the --inputShape shapes, so the output has them too")
    if lite.optimize == "ascend_oriented" and config.quant_type == "FULL_QUANT" and config.full.target_device != "ASCEND":
        result.notes.append(f"--optimize=ascend_oriented: the ASCEND int8 preset comes from target_device=ASCEND in "
                            f"[full_quant_param]; this config uses {config.full.target_device}")
    if lite.input_type or lite.output_type:
        lite_flags.integer_boundaries(result, model, config, lite, shapes, args.inputDataFormat or None)
    try:
        if result.staged_output is not None:
            publish_output(result)
        elif not discard:
            save_model(result.model, out)
        publish_reports(result)  # only once the model is in place
    finally:
        discard_output(result)
        discard_reports(result)
    if not args.quiet:
        print(summary(result, Path(args.modelFile), None if discard else out, source_bytes))
    return 0


def _check_input_data_kept(model, source: Path, out: Path) -> None:
    """Refuse an output whose data file would replace one of the input's external-data files."""
    data = out.with_name(out.name + ".data")
    if not data.exists():
        return
    for location in external_locations(model):
        own = source.parent / location
        if own.exists() and os.path.samefile(own, data):
            raise UsageError(f"--outputFile={out}: its data file {data} is the input model's external data; "
                             "choose another output name")


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def summary(result: ConversionResult, source: Path, out: Path | None, before: int | None = None) -> str:
    """What the conversion did; `out` None when nothing was written (--outputFile=/dev/null). Sizes include
    external-data files; `before`: the input's (stored_bytes), measured from the file when not given."""
    before = stored_bytes(source) if before is None else before
    if out is None:
        model = result.model
        after = tensor_bytes(model) if too_large_for_one_file(model) else model.ByteSize()
    else:
        after = stored_bytes(out)
    lines = [f"{result.quant_type}: {source} -> {out or os.devnull + ' (nothing written)'}",
             f"quantized {len(result.quantized)} tensors, skipped {len(result.skipped)}"]
    for q in result.quantized:
        lines.append(f"  quantized {q.tensor} ({q.op_type} {', '.join(q.nodes)}): {q.bits} bit {q.scheme}, "
                     f"{q.storage}, {q.bytes_before} -> {q.bytes_after} bytes, relative error {q.relative_error:.4f}")
    for s in result.skipped:
        lines.append(f"  skipped {s.tensor} ({s.op_type} {', '.join(s.nodes)}): {s.reason}")
    lines += [f"  note: {n}" for n in result.notes]
    lines += verification_lines(result.verification)
    size = "output size" if out is None else "file size"
    lines.append(f"{size} {_mb(before)} -> {_mb(after)} ({after / before:.3f}x) in {result.seconds:.2f} s")
    return "\n".join(lines)


def verification_lines(verification: Verification | None) -> list[str]:
    if verification is None:
        return ["not verified (--verify=off)"]
    if verification.not_loaded:
        why = f"; the float model was not run either: {verification.skipped}" if verification.skipped else ""
        return [f"NOT verified: the gate did not load the output, since {verification.not_loaded}{why}"]
    if verification.ran_alone:
        found = "; ".join(f"output '{name}' has NaN/Inf on {count} of {verification.ran_alone} sample(s)"
                          for name, count in verification.non_finite.items()) or "every output finite"
        return [(f"verified that ONNX Runtime loads the output and runs it on {verification.inputs} ({found}); "
                 f"not compared with the float model: {verification.skipped}")]
    if verification.skipped and not verification.outputs:
        return [f"verified that ONNX Runtime loads the output; not compared with the float model: {verification.skipped}"]
    lines = [f"verified in ONNX Runtime against the float model on {verification.inputs}:"]
    lines += [f"  {describe(check)}" for check in verification.outputs]
    if verification.unfolded:
        lines.append(f"  note: in a session without constant folding, since {verification.unfolded}")
    if is_synthetic(verification):
        lines.append(f"  note: {SYNTHETIC_NOTE}")
    if verification.skipped:
        lines.append(f"  not compared further: {verification.skipped}")
    if verification.other_shapes and not verification.shape_problem:
        lines.append(f"  the output keeps the model's own input shapes and also runs at {verification.other_shapes}")
    return lines

"""The conversion flow: check the inputs, copy the model, prepare it, run the pass for the configured quant mode."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from .config import QuantConfig
from .errors import ConversionError, UsageError
from .model import (
    check_input_shapes,
    constants_to_initializers,
    iter_initializers,
    iter_tensors,
    lift_subgraph_constants,
    name_unnamed_nodes,
    restore_io_shapes,
    set_input_shapes,
    too_large_for_one_file,
    weight_free_copy,
)
from .paths import check_output_folder, publish_folder, remove_quietly, stage_folder, write_error
from .plan import WEIGHT_SLOTS, expand_skips, weight_tensors
from .result import ConversionResult, SkippedTensor
from .runtime import cpu_session, temp_model_file
from .stream import StagedOutput, heap_temporaries, reading_from, trim_heap
from .targets import target as target_preset
from .validate import checked_samples, one_line, validate_with_copy

log = logging.getLogger(__name__)

# A pass: run(model, config, **options) -> ConversionResult, on the copy that convert() made.
QuantPass = Callable[..., ConversionResult]
# quant mode -> the ops whose constant weights it quantizes (for the "nothing to quantize" warning)
_WEIGHT_OPS = {"WEIGHT_QUANT": tuple(WEIGHT_SLOTS), "DYNAMIC_QUANT": ("MatMul", "Gemm", "Gather")}


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


def convert(model: onnx.ModelProto, config: QuantConfig, *, model_path: str | Path | None = None,
            validate: bool = True, defer_reports: bool = False, input_shapes: dict[str, list[int]] | None = None,
            verify: bool = True, verify_floor: float | None = None, analyze_command: str | None = None,
            float16: bool = False, stream_to: str | Path | None = None, in_place: bool = False,
            keep_checked_copy: bool = False, **options: Any) -> ConversionResult:
    """Quantize a copy of `model` as `config` says; `model` itself is left untouched.

    The input rules (validate.py) are checked first unless validate=False (for callers that convert the same,
    already checked model again). `model_path` is the file the model came from: messages name it, and the checks
    of models over 2 GB read it. With defer_reports the debug reports stay in a temp folder until
    publish_reports(result) (the CLI publishes them after the model is written). `input_shapes` (--inputShape)
    fix input shapes for calibration and the pass's analysis only: the output keeps the model's own input and
    output shapes. `verify` runs the gate of verify.py before the result is returned (a collapse below
    `verify_floor` is an error when a floor is given, else a warning suggesting `analyze_command`). `float16`
    (--fp16=on) stores the model's float32 constants that stay unquantized as float16 (fp16.py). Other options
    are passed to the pass (e.g. input_format="NHWC" for calibration images, progress=False, samples=[...]).

    `stream_to` (a streaming conversion, stream.py): `model` was loaded from `model_path` without its external
    data (model.load_model(lazy=True)); the output is written to temp files beside `stream_to` while the pass runs
    and the gate checks it there; publish_output(result) renames them into place (discard_output on failure).
    Only where streaming_refusal(...) is "".

    `in_place` (the CLI, which then runs the gate itself from the model file, verify=False): the caller gives up
    `model`, and the pass works on it instead of on a copy (one copy of the weights less while the pass runs). Only
    without --inputShape, debug reports or --fp16; otherwise ignored. `keep_checked_copy`: the input checks' copy of
    the model (its weights in a data file that ONNX Runtime maps) stays in result.checked_copy for the caller's gate,
    which removes it with discard_checked_copy(result); without it, convert's own gate runs the float model from that
    copy where it is the model the gate compares with (no --inputShape), and the copy is removed before returning.
    With --inputShape (the CLI on an ONNX file, where `model` is what `model_path` holds), `in_place` lets the
    pass work on `model` itself with the fixed shapes, and the gate loads the float model from `model_path`
    (not without debug reports or --fp16, which read the float model afterwards, nor over 2 GB).
    """
    if stream_to is not None:
        refusal = streaming_refusal(config, input_shapes, model_path, float16)
        if refusal:
            raise UsageError(f"cannot stream this conversion: {refusal}")
        staged = StagedOutput(Path(stream_to))
        try:
            result = _convert(model, config, model_path, validate, defer_reports, input_shapes, verify,
                              verify_floor, analyze_command, float16, staged, False, options, keep=keep_checked_copy)
        except BaseException:
            staged.discard()
            raise
        result.staged_output = staged
        return result
    given_up = (in_place and bool(input_shapes) and model_path is not None and not float16
                and not config.common.debug_info_save_path and not too_large_for_one_file(model))
    in_place = (in_place and not verify and not input_shapes and not float16
                and not config.common.debug_info_save_path)
    return _convert(model, config, model_path, validate, defer_reports, input_shapes, verify, verify_floor,
                    analyze_command, float16, None, in_place, options, given_up, keep_checked_copy)


def streaming_refusal(config: QuantConfig, input_shapes: dict[str, list[int]] | None,
                      model_path: str | Path | None, float16: bool = False) -> str:
    """Why a conversion cannot stream ("" when it can): WEIGHT_QUANT (fixed bit width or mixed bit, auto_tune
    too: each init_scale it tries runs from a temp file whose weights ONNX Runtime maps) and DYNAMIC_QUANT read
    each weight on its own; FULL_QUANT runs the float model in memory, debug reports need it whole, --inputShape
    runs it with other shapes, and --fp16 rewrites the weights it does not quantize."""
    if config.quant_type not in ("WEIGHT_QUANT", "DYNAMIC_QUANT"):
        return f"{config.quant_type} runs the float model in memory"
    if config.common.debug_info_save_path:
        return "the debug reports run the float model in memory"
    if input_shapes:
        return "--inputShape runs the float model in memory with the given shapes"
    if model_path is None:
        return "the model was not loaded from a file"
    if float16:
        return "--fp16=on rewrites every float weight"
    return ""


def _convert(model: onnx.ModelProto, config: QuantConfig, model_path: str | Path | None, validate: bool,
             defer_reports: bool, input_shapes: dict[str, list[int]] | None, verify: bool,
             verify_floor: float | None, analyze_command: str | None, float16: bool, staged: StagedOutput | None,
             in_place: bool, options: dict[str, Any], given_up: bool = False, keep: bool = False) -> ConversionResult:
    started = time.perf_counter()
    source = str(model_path) if model_path else f"model '{model.graph.name or '(unnamed graph)'}'"
    notes, copy = validate_with_copy(model, source, model_path) if validate else ([], None)
    try:
        result = _checked(model, config, model_path, defer_reports, input_shapes, verify, verify_floor,
                          analyze_command, float16, staged, in_place, options, given_up, notes, copy, source)
    except BaseException:
        _remove_copy(copy)
        raise
    if keep:
        result.checked_copy = copy
    else:
        _remove_copy(copy)
    result.seconds = time.perf_counter() - started
    return result


def _remove_copy(copy: Path | None) -> None:
    if copy is not None:
        shutil.rmtree(copy.parent, ignore_errors=True)


def discard_checked_copy(result: ConversionResult) -> None:
    """Remove the input checks' copy of the float model that convert(keep_checked_copy=True) left."""
    copy, result.checked_copy = result.checked_copy, None
    _remove_copy(copy)


def _checked(model: onnx.ModelProto, config: QuantConfig, model_path: str | Path | None, defer_reports: bool,
             input_shapes: dict[str, list[int]] | None, verify: bool, verify_floor: float | None,
             analyze_command: str | None, float16: bool, staged: StagedOutput | None, in_place: bool,
             options: dict[str, Any], given_up: bool, notes: list[str], copy: Path | None,
             source: str) -> ConversionResult:
    """The conversion after the input checks (`copy`: their copy of the model, or None)."""
    quant_pass = pass_for(config)
    trim_heap()  # the input check's ONNX Runtime session left its load-time scratch in the heap
    heap_temporaries()  # the pass's temporaries from the heap, whatever the checks freed before it
    report_folder = config.common.debug_info_save_path
    if report_folder:
        check_output_folder(Path(report_folder), "debug_info_save_path")
    if "samples" in options:
        options["samples"] = checked_samples(options["samples"])
    result_notes: list[str] = []
    # The float model as the pass sees it (fixed shapes): calibration, the gate and the reports run on it.
    reference = runnable = model
    light = None  # given up: the model's own graph without its weights (the gate reads them from model_path)
    if input_shapes:
        if given_up:
            light = weight_free_copy(model)
            reference = runnable = model  # its inputs take the fixed shapes: no copy of the weights
        else:
            reference = runnable = _copy(model)
        check_input_shapes(reference, input_shapes, source)
        set_input_shapes(reference, input_shapes)
        # given up with the gate on: the float model with the fixed shapes goes to a temp file now, while it is
        # the model as loaded, so that the gate needs no copy of it in memory; the load check reads that file
        float_file = _fixed_shape_file(reference) if light is not None and verify else None
        refused = "not checked"  # until the check returns: an exception out of it removes the file too
        try:
            refused = _refused_with_shapes(reference, float_file)
        finally:
            if refused and float_file is not None:  # the gate will not read it
                float_file.unlink(missing_ok=True)
                float_file = None
        if refused and light is not None:  # the model's own inputs back; the fixed shapes go on a copy
            for value, own in zip(model.graph.input, light.graph.input, strict=True):
                value.CopyFrom(own)
            light = None
            reference = _copy(model)
            set_input_shapes(reference, input_shapes)
        if refused:
            # Some control flow does not survive fixed shapes: the pass works on the model's own shapes and only
            # the calibration data is read at the given ones.
            from .data import calibration_set, has_calibration_data  # OpenCV loads only when data is read

            runnable = model
            if "samples" not in options and has_calibration_data(config):
                options["samples"] = calibration_set(config, reference, options.get("input_format"))
            result_notes.append("ONNX Runtime refuses the model with the --inputShape shapes "
                                f"({refused}), so the conversion works on its own shapes and reads the "
                                "calibration data at the given ones")
    else:
        float_file = None
    shaped = runnable is not model or light is not None  # the pass works on the --inputShape shapes
    try:
        if shaped:
            # The copy with the fixed shapes is convert's own: the pass works on it, and the gate's float model is
            # made again once the pass is done, so that no third copy of the weights is held while the pass runs.
            work, reference, runnable = reference, None, None
            if light is not None:
                model = light  # from here on `model` gives the own shapes only
        else:
            work = runnable if in_place else _copy(runnable)  # in place: the caller gave the model up (convert's doc)
        constants_to_initializers(work)
        # Weights of If/Loop/Scan bodies move to the main graph (the bodies read them from the outer scope), so every
        # pass plans them like any other.
        lift_subgraph_constants(work)
        # Unnamed nodes (common in converted models) get their first output's name, so skip_quant_node can list them.
        name_unnamed_nodes(work)
        config = expand_skips(work, config)  # patterns and op types -> the node names every pass reads
        weights = weight_tensors(work)
        named = _copy(work) if report_folder else None  # the reports match tensors by the names the pass sees
        log.info("%s", describe_mode(config))
        base = Path(model_path).parent if staged is not None else None
        with reading_from(base, staged.sink) if staged is not None else contextlib.nullcontext():
            # With --inputShape the pass also gets the model's own shapes, for graphs that ONNX Runtime runs only
            # with them
            result = quant_pass(work, config, **options, own_shapes=model if shaped else None)
        _log_decisions(result)
        _account_for_every_weight(result, weights, config)
        result.notes += notes + result_notes
        warning = nothing_quantized(config, result)
        if warning:
            result.warnings.append(warning)
            log.warning("%s", warning)
        fixed = restore_io_shapes(result.model, model, result.notes) if shaped else None
        if float16:
            _store_float16(result, model)  # the float32 constants of the input (its shapes do not matter)
        if staged is None:
            # The working copy still holds the float weights the pass replaced (protobuf frees a message's memory only
            # with the whole message): the output goes on as a copy of its own, so the gate's session of it is not
            # loaded beside a dead copy of the weights. The bytes are the same.
            result.model = _copy(result.model)
            del work
            trim_heap()
        if shaped and verify:
            reference = runnable = _copy(model)
            set_input_shapes(reference, input_shapes)
            if float_file is not None:
                runnable = str(float_file)  # `reference`, without the weights, gives the gate's inputs
        quant_file = None
        if staged is not None:  # the output's files, under temp names: the gate loads it from there
            with reading_from(base, staged.sink):
                quant_file = str(staged.finish(result.model, base, iter_tensors, iter_initializers))
            runnable = str(model_path)
        elif copy is not None and runnable is model:
            # the checks' copy is the float model the gate compares with: its session maps the weights
            runnable = str(copy)
        if verify:
            from .verify import run_gate

            run_gate(model, reference, runnable, result, config, options, verify_floor, analyze_command, input_shapes,
                     fixed, quant_file, original_file=str(model_path) if light is not None else None)
        if report_folder:
            result.float_model = result.float_model or named
            _write_reports(result.float_model, result, config, options, Path(report_folder))
            if not defer_reports:
                publish_reports(result)
        return result
    finally:
        if float_file is not None:
            float_file.unlink(missing_ok=True)


def _store_float16(result: ConversionResult, source: onnx.ModelProto) -> None:
    from .fp16 import float32_constants, store_float16

    count, saved, too_large = store_float16(result.model, float32_constants(source))
    note = (f"fp16: {count} float32 constants left unquantized are stored as float16 ({saved} bytes less)" if count
            else "fp16: no float32 constant is left unquantized, so nothing is stored as float16")
    if too_large:
        note += f"; {len(too_large)} stay float32 (values beyond float16's range: {', '.join(too_large[:3])})"
    result.notes.append(note)
    log.info("%s", note)


def describe_mode(config: QuantConfig) -> str:
    """The mode and the options that decide what the pass does, in one line (logged with -v)."""
    common = config.common
    if config.is_mixed_bit:
        mixed = config.mixed_bit
        return (f"WEIGHT_QUANT mixed bit: init_scale {mixed.init_scale:g}"
                f"{', auto_tune searches it' if mixed.auto_tune else ''}, bias_correction "
                f"{str(config.weight.bias_correction).lower()}")
    if config.quant_type == "WEIGHT_QUANT":
        weight = config.weight
        blocks = f", blocks of {weight.block_size}" if weight.block_size else ""
        return (f"WEIGHT_QUANT fixed {common.bit_num} bit: {'per channel' if weight.per_channel else 'per tensor'}"
                f"{blocks}, dequant_strategy {weight.dequant_strategy}, bias_correction "
                f"{str(weight.bias_correction).lower()}, enable_encode {str(common.enable_encode).lower()}")
    if config.quant_type == "FULL_QUANT":
        full = config.full
        return (f"FULL_QUANT int8: target_device {full.target_device}, activations {full.activation_quant_method}, "
                f"weights {'per channel' if full.per_channel else 'per tensor'}, bias_correction "
                f"{str(full.bias_correction).lower()}, latency_aware {str(full.latency_aware).lower()}")
    return (f"DYNAMIC_QUANT int8: quant_strategy {config.dynamic.quant_strategy}, latency_aware "
            f"{str(config.dynamic.latency_aware).lower()}")


def _log_decisions(result: ConversionResult) -> None:
    """-v: what the pass decided (its notes and the counts); -vv: every tensor too."""
    log.info("%s: %d weights quantized, %d kept float", result.quant_type, len(result.quantized),
             len(result.skipped))
    for note in result.notes:
        log.info("%s", note)
    for q in result.quantized:
        log.debug("quantized %s (%s %s): %d bit %s, %s, %d -> %d bytes, relative error %.4f", q.tensor, q.op_type,
                  ", ".join(q.nodes), q.bits, q.scheme, q.storage, q.bytes_before, q.bytes_after, q.relative_error)
    for s in result.skipped:
        log.debug("kept float %s (%s %s): %s", s.tensor, s.op_type, ", ".join(s.nodes), s.reason)


def _account_for_every_weight(result: ConversionResult, weights: dict[str, tuple[str, tuple[str, ...]]],
                              config: QuantConfig) -> None:
    """List as skipped, with the reason, every float weight that the pass neither quantized nor skipped (an op
    type the mode does not quantize), so that "quantized N, skipped M" covers every weight of the model."""
    seen = {t.tensor for t in result.quantized} | {t.tensor for t in result.skipped}
    for name, (op, nodes) in weights.items():
        if name not in seen:
            result.skipped.append(SkippedTensor(name, op, nodes, f"{config.quant_type} does not quantize {op} "
                                                "weights"))


def _refused_with_shapes(model: onnx.ModelProto, path: Path | None = None) -> str:
    """ONNX Runtime's one-line reason for refusing `model` (the input with the --inputShape shapes; loaded from
    `path` when it is already written there), or ""."""
    if path is None and too_large_for_one_file(model):
        return ""  # cannot be loaded from memory; the pass finds out itself
    try:
        cpu_session(model if path is None else str(path), "with the --inputShape shapes", spinning=False,
                    optimize=False)
    except ConversionError as exc:
        return one_line(str(exc).partition("shapes (")[2].removesuffix(")") or str(exc))
    return ""


def _fixed_shape_file(model: onnx.ModelProto) -> Path:
    """`model` (the float model with the --inputShape shapes) in a new temp file."""
    try:
        return temp_model_file(model, "ptqlite-float-")
    except OSError as exc:
        raise write_error(Path(exc.filename or tempfile.gettempdir()), "the float model for the gate", exc) from None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def quantize(model: onnx.ModelProto, config: QuantConfig, **options: Any) -> onnx.ModelProto:
    """Python API: the quantized model only."""
    return convert(model, config, **options).model


def _write_reports(model: onnx.ModelProto, result: ConversionResult, config: QuantConfig, options: dict,
                   target: Path) -> None:
    """Debug reports into a temp folder (result.pending_reports); nothing of them remains on any failure."""
    from .report import debug_report

    staging = stage_folder(target)
    try:
        debug_report(model, result, config, options.get("input_format"), options.get("samples"), folder=staging,
                     progress=options.get("progress"))
    except OSError as exc:
        remove_quietly(staging)
        raise write_error(target, "the debug reports", exc) from None
    except BaseException:
        remove_quietly(staging)
        raise
    result.pending_reports = (staging, target)


def publish_reports(result: ConversionResult) -> None:
    """Move debug reports waiting in their temp folder into debug_info_save_path."""
    if result.pending_reports is None:
        return
    from .report import is_report_file

    staging, target = result.pending_reports
    result.pending_reports = None
    try:
        publish_folder(staging, target, is_report_file)
    except OSError as exc:
        raise write_error(target, "the debug reports", exc) from None


def publish_output(result: ConversionResult) -> None:
    """Rename the files of a streaming conversion into place (data file first)."""
    if result.staged_output is not None:
        staged, result.staged_output = result.staged_output, None
        staged.publish(result.model, iter_tensors)


def discard_output(result: ConversionResult) -> None:
    """Remove the temp files of a streaming conversion that was not published."""
    if result.staged_output is not None:
        result.staged_output.discard()
        result.staged_output = None


def discard_reports(result: ConversionResult) -> None:
    """Drop debug reports that were never published (the model could not be written)."""
    if result.pending_reports is not None:
        remove_quietly(result.pending_reports[0])
        result.pending_reports = None


def nothing_quantized(config: QuantConfig, result: ConversionResult) -> str | None:
    """One sentence when the mode changed nothing in the model, saying why; None when it quantized something."""
    mode = config.quant_type
    if result.quantized:
        return None
    if mode == "FULL_QUANT":
        if any(n.op_type == "QuantizeLinear" for n in result.model.graph.node):
            return None
        slower = [s for s in result.skipped if s.reason.startswith("kept float by latency-aware planning")]
        if slower:
            return (f"FULL_QUANT kept all {len(slower)} weighted layers float: their int8 form ran slower than float on "
                    "this CPU (latency-aware planning); [full_quant_param] latency_aware=false keeps them int8, "
                    "WEIGHT_QUANT makes the file smaller at float speed")
        preset = target_preset(config.full.target_device)
        return (f"FULL_QUANT found nothing to run in int8: no node of this model is one of the ops target_device "
                f"{preset.name} quantizes ({'/'.join(sorted(preset.compute_ops))}); the output equals the float "
                "model")
    ops = _WEIGHT_OPS[mode]
    candidates = [s for s in result.skipped if s.op_type in ops]  # the others are ops the mode leaves alone
    slower = [s for s in candidates if s.reason.startswith("kept float by latency-aware planning")]
    if slower and len(slower) == len(candidates):
        return (f"{mode} kept all {len(slower)} MatMul/Gemm weights float: their int8 form ran no faster than "
                "float on this CPU (latency-aware planning); [dynamic_quant_param] latency_aware=false keeps them int8, "
                "WEIGHT_QUANT makes the file smaller at float speed")
    if candidates:
        return (f"{mode} quantized nothing: all {len(candidates)} candidate weight(s) were skipped (reasons in "
                "the summary); the output equals the float model")
    others = " or ".join(m for m in ("FULL_QUANT", "WEIGHT_QUANT") if m != mode)
    return f"{mode} quantizes {'/'.join(ops)} weights; this model has none: try {others}"

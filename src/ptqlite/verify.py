"""The verification gate: before a conversion reports success, the quantized model is loaded in ONNX Runtime and
run next to the float model, and each graph output is compared.

- Inputs: the first VERIFY_SAMPLES calibration samples when the config has calibration data (or the samples given
  to convert()), else SYNTHETIC_SAMPLES seeded synthetic inputs (runtime.REFERENCE_VALUES), and Verification.inputs
  says which. Fixed-bit WEIGHT_QUANT at LOW_BITS or fewer bits checked on synthetic inputs only gets a warning that
  says so: such inputs can hide what few bits lose on real data, and no floor on them tells the two apart.
- Float outputs: cosine similarity per sample over the elements where the float output is finite; a NaN/Inf in
  the quantized output where the float one is finite, or a different shape, scores 0. Integer and bool outputs:
  the fraction of equal elements ("agreement").
- An output that does not load or does not run where the float model runs is a VerificationError (exit 1).
- Models over 2 GB run from files (an in-memory one is written to a temp folder with external data first). The
  float model's session runs without weight prepacking where every tensor of MIN_BYTES or more is read in place
  from its external data (FloatPlan): its weights stay memory-mapped file pages instead of allocated copies. A
  float model over stream.WHOLE_LOAD_BYTES is compared only when the memory its session allocates
  (compare_memory: COMPARE_FACTOR times its allocated bytes, MAPPED_FACTOR times its mapped ones, plus
  COMPARE_RESERVE) fits in the memory available (MemAvailable), so a mapped float model larger than the memory
  is still compared (its pages are read from disk again); else the output runs alone on the same inputs and its
  outputs must be finite (Verification.non_finite), and the summary says why it was not compared.
- The output's session is made only when what loading it needs (loadmem.predict_load: its tensors and every value
  ONNX Runtime's constant folding materialises at load, the float weights a mixed-bit output decodes to among
  them) plus LOAD_RESERVE fits in the memory available, asked before the float model runs and again just before
  the output loads. Else, where a session without constant folding fits (loadmem.predict_unfolded: the tensors
  and the decoded values, computed on every run), the output is compared in one (the same kernels compute the
  same values; Verification.unfolded says why, and convert() warns that the default load needs more memory);
  else the gate does not load it (nor, when known first, the float model), the output is NOT
  verified (Verification.not_loaded says why, with both figures) and convert() warns.
- Slices: the whole-output cosine is dominated by the output's largest values (a detector's box coordinates in
  pixels beside its 0..1 class scores), so each float output is also cut along every short axis (2 to MAX_SLICES
  entries, at least MIN_SLICE_VALUES values per entry and sample); each slice whose float norm is under
  SMALL_SLICE of the largest slice's is compared on its own, pooled over the samples; the worst is recorded.
- An output collapses when its min cosine is below the floor (FLOORS per mode unless --verifyFloor gives one), its
  worst slice is below SLICE_FLOOR, its agreement is below AGREEMENT_FLOOR, or it turns finite values
  non-finite. convert() warns about a collapse, or fails with a floor given explicitly. docs/spec.md ("Verification") has the rule and how the floors were chosen.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .config import QuantConfig
from .errors import ConversionError, PtqError, VerificationError
from .loadmem import folded_bytes, predict_load, predict_unfolded
from .model import (
    IoShapes,
    external_locations,
    graph_inputs,
    inline_bytes,
    iter_initializers,
    iter_tensors,
    save_model,
    stored_bytes,
    tensor_bytes,
    too_large_for_one_file,
)
from .result import ConversionResult, OutputCheck, Verification
from .runtime import (
    REFERENCE_VALUES,
    InputSpec,
    cpu_session,
    model_input_specs,
    session_feeds,
    synthetic_inputs,
)
from .stream import MIN_BYTES, external_bytes, is_external, loads_whole, read_in_place, trim_heap

log = logging.getLogger(__name__)

VERIFY_SAMPLES = 8
SYNTHETIC_SAMPLES = 2
# A text recogniser at 4 bits measured 0.973 on the synthetic inputs but 0.84 on rendered text, while healthy 4-bit
# classifiers measure 0.91-0.93 there: at LOW_BITS or fewer the gate says that synthetic inputs cannot vouch for the
# output. docs/spec.md ("Verification") has the figures.
LOW_BITS = 4
# Min output cosine below which an output counts as collapsed, per mode: well below the lowest min cosine of any
# bundled or bench config on ResNet20 and MobileNet V2 (bench/verify_cosines.py) and of MiniLM (docs/results.md);
# docs/spec.md "Verification" gives the figures.
FLOORS = {"FULL_QUANT": 0.9, "DYNAMIC_QUANT": 0.95, "WEIGHT_QUANT": 0.9, "WEIGHT_QUANT mixed bit": 0.85}
AGREEMENT_FLOOR = 0.5
# Slices: along axes of 2..MAX_SLICES entries whose slices hold at least MIN_SLICE_VALUES values in one sample (a
# classifier's [1, 1000] logits have no such axis: one value per class and sample); below SLICE_FLOOR the slice has
# collapsed. docs/spec.md ("Verification") gives the figures behind it.
MAX_SLICES = 128
MIN_SLICE_VALUES = 16
SLICE_FLOOR = 0.8
# Only slices whose float norm is under SMALL_SLICE times the largest slice's are scored on their own: the others
# already weigh in the whole-output cosine.
SMALL_SLICE = 0.1
# The gate holds the float model's ONNX Runtime session and then the output's, never both. A session that
# prepacks allocates every weight (its load peak was 1.02x the model's bytes on the 3 GB decoder); one without
# prepacking on weights read in place from a data file allocated 4 MB for the decoder's 2.99 GB (docs/results.md,
# "The gate's float model mapped"): its weights are file pages the kernel drops and reads again under pressure.
# A float model over stream.WHOLE_LOAD_BYTES is run only when COMPARE_FACTOR times its allocated bytes,
# MAPPED_FACTOR times its mapped ones and COMPARE_RESERVE fit in the memory available when the gate starts; else
# the gate could push the machine out of memory at the end of a long run.
COMPARE_FACTOR = 1.5
MAPPED_FACTOR = 0.02
COMPARE_RESERVE = 512 << 20
# The output's session: constant folding holds every value it makes until the whole graph is folded, so an output
# whose weights decode to float at load takes several times its float model's memory to load (a mixed-bit output
# of a 1.1 GB decoder 4.2 GB, and the 3 GB decoder's passed 15 GB). It is loaded only when loadmem.predict_load's
# bytes plus LOAD_RESERVE (the runs' activations, the process's own growth) fit in the memory available then; else
# loading it could get the conversion killed for memory, with no output and no message.
LOAD_RESERVE = 512 << 20
_PURPOSE = "to verify the output"


_LOW, _HIGH = REFERENCE_VALUES.float_range
SYNTHETIC_NOTE = (f"the config has no calibration data, so the gate ran on synthetic inputs (floats uniform in "
                  f"[{_LOW}, {_HIGH}], seed {REFERENCE_VALUES.seed}, integer and bool inputs 1), which may not "
                  "represent real data")


def is_synthetic_source(source: str) -> bool:
    return "synthetic inputs" in source


def is_synthetic(verification: Verification) -> bool:
    return is_synthetic_source(verification.inputs)


def mode_label(config: QuantConfig) -> str:
    return "WEIGHT_QUANT mixed bit" if config.is_mixed_bit else config.quant_type


def default_floor(config: QuantConfig) -> float:
    return FLOORS[mode_label(config)]


def low_bit(config: QuantConfig) -> bool:
    return config.quant_type == "WEIGHT_QUANT" and not config.is_mixed_bit and config.common.bit_num <= LOW_BITS


def verification_inputs(model: onnx.ModelProto, config: QuantConfig, input_format: str | None = None,
                        samples: Iterable[dict[str, np.ndarray]] | None = None
                        ) -> tuple[list[dict[str, np.ndarray]], str]:
    """The inputs the gate runs on and a phrase naming them. `model` is the float model with the --inputShape
    shapes, as the pass calibrated it."""
    from .data import calibration_set, has_calibration_data  # OpenCV loads only when data is read

    if samples is not None:
        given = list(itertools.islice(iter(samples), VERIFY_SAMPLES))
        if given:
            # convert() reads the config's files into `samples` itself when the fixed shapes need it
            kind = "calibration samples" if has_calibration_data(config) else "of the given samples"
            return given, f"{len(given)} {kind}"

    if has_calibration_data(config):
        data = list(itertools.islice(iter(calibration_set(config, model, input_format)), VERIFY_SAMPLES))
        return data, f"{len(data)} calibration samples"
    return (synthetic_inputs(model_input_specs(model), REFERENCE_VALUES, SYNTHETIC_SAMPLES),
            f"{SYNTHETIC_SAMPLES} synthetic inputs")



def available_memory() -> int:
    """Bytes of memory available to new work (/proc/meminfo MemAvailable; free pages where it is missing)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


@dataclass(frozen=True)
class FloatPlan:
    """How the gate's session holds the float model: `size` its bytes with external data, `mapped` the bytes of
    its tensors ONNX Runtime reads in place from their data files (stream.read_in_place), `held` the bytes of its
    tensors of MIN_BYTES or more that are not (inline, or a data file the runtime copies)."""

    size: int
    mapped: int = 0
    held: int = 0
    # bytes ONNX Runtime's constant folding makes from its constants at load (loadmem): 0 on the float models
    # measured, a float32 copy of float16 weights behind Casts
    folded: int = 0

    @property
    def prepacking(self) -> bool:
        """Whether the session prepacks: unless every large tensor is read in place, the weights are allocated
        anyway, and prepacked ones run as the output's session does."""
        return not self.mapped or self.held > 0

    @property
    def allocated(self) -> int:
        """Bytes of the model the session allocates (prepacked: all of them)."""
        return self.size if self.prepacking else self.size - self.mapped


def float_plan(model: onnx.ModelProto | str) -> FloatPlan:
    """The FloatPlan of a float model file (its graph read without the external data), or of an in-memory model:
    one over 2 GB as save_model writes it for the session (tensors of MIN_BYTES or more in a page-aligned data
    file), else all of it allocated."""
    if isinstance(model, str):
        stat = os.stat(model)
        return _file_plan(model, stat.st_size, stat.st_mtime_ns)
    size = tensor_bytes(model)
    if not too_large_for_one_file(model):
        return FloatPlan(size, folded=folded_bytes(model) if not loads_whole(size) else 0)
    # save_model moves initializers of MIN_BYTES or more to the data file; Constant values stay in the graph
    moved = sum(n for n in map(inline_bytes, iter_initializers(model.graph)) if n >= MIN_BYTES)
    large = sum(n for n in map(inline_bytes, iter_tensors(model.graph)) if n >= MIN_BYTES)
    return FloatPlan(size, moved, large - moved, folded_bytes(model))


@functools.lru_cache(maxsize=4)
def _file_plan(model: str, file_size: int, _mtime_ns: int) -> FloatPlan:
    """float_plan of a file, read once while it is unchanged (size and mtime in the key): the gate asks for the
    plan of each float file before and while it loads it, and a file whose weights are inline is read whole
    (all-MiniLM-L6-v2: 90 MB parsed for each ask)."""
    try:
        loaded = onnx.load(model, load_external_data=False)
    except Exception:  # noqa: BLE001  (a file onnx cannot read: the session reports it)
        return FloatPlan(stored_bytes(model))
    base = Path(model).parent
    size = file_size + sum((base / loc).stat().st_size for loc in external_locations(loaded)
                           if (base / loc).is_file())
    mapped = held = 0
    for tensor in iter_tensors(loaded.graph):
        if read_in_place(tensor):
            mapped += external_bytes(tensor)
        else:
            nbytes = external_bytes(tensor) if is_external(tensor) else inline_bytes(tensor)
            held += nbytes if nbytes >= MIN_BYTES else 0
    return FloatPlan(size, mapped, held, folded_bytes(loaded) if not loads_whole(size) else 0)


def compare_memory(plan: FloatPlan) -> int:
    """Memory the gate asks for before it runs the float model as `plan` says."""
    mapped = 0 if plan.prepacking else plan.mapped
    return int(plan.allocated * COMPARE_FACTOR + mapped * MAPPED_FACTOR) + plan.folded + COMPARE_RESERVE


def too_large_to_compare(plan: FloatPlan) -> str:
    """Why the gate does not run the float model of `plan` ("" when it does)."""
    if loads_whole(plan.size):
        return ""
    need, have = compare_memory(plan), available_memory()
    if need <= have:
        return ""
    held = "" if plan.prepacking else f" ({plan.mapped / 1e9:.2f} GB of it mapped from its data files)"
    return (f"the float model takes {plan.size / 1e9:.2f} GB with its external data{held}; running it would need "
            f"about {need / 1e9:.1f} GB of memory and {have / 1e9:.1f} GB is available")


def too_large_to_load(model: onnx.ModelProto | str) -> str:
    """Why the gate does not load the output `model` ("" when it does): what its session would need beside the
    memory available now."""
    estimate = predict_load(model)
    need, have = estimate.total + LOAD_RESERVE, available_memory()
    if need <= have:
        return ""
    folded = (f", plus {estimate.folded / 1e9:.2f} GB of values that ONNX Runtime's constant folding computes from "
              "them at load" if estimate.folded else "")
    return (f"loading it in ONNX Runtime would need about {need / 1e9:.1f} GB of memory (its tensors "
            f"{estimate.initializers / 1e9:.2f} GB{folded}) and {have / 1e9:.1f} GB is available")


def too_large_to_run_unfolded(model: onnx.ModelProto | str) -> bool:
    """Whether the output's session without constant folding (loadmem.predict_unfolded) and LOAD_RESERVE would
    not fit in the memory available either, or would not need less than the default session."""
    if isinstance(model, str):  # the graph once, for both predictions
        model = onnx.load(model, load_external_data=False)
    estimate = predict_load(model)
    unfolded = predict_unfolded(model, estimate)
    return unfolded >= estimate.total or unfolded + LOAD_RESERVE > available_memory()


def unfolded_message(verification: Verification) -> str:
    """One line: the gate compared the output in a session without constant folding, and why."""
    return (f"the output was compared in an ONNX Runtime session without constant folding, since {verification.unfolded}; "
            "with ONNX Runtime's defaults it loads only where that memory is available, or run it with constant "
            "folding off (Python: InferenceSession(..., disabled_optimizers=['ConstantFolding'])), which "
            "decodes its weights on every run")


def not_loaded_message(verification: Verification) -> str:
    """One line: the gate did not load the output, so the output was written unverified."""
    return (f"the output was written but NOT verified: the gate did not load it, since {verification.not_loaded}; "
            "check it where that memory is available, e.g. with: ptqlite benchmark --modelFile=OUTPUT "
            "--baselineFile=MODEL")


@contextlib.contextmanager
def _loadable(model: onnx.ModelProto | str):
    """`model` as ONNX Runtime can load it, and "": a file or a model up to 2 GB as it is, a larger in-memory model
    written with its tensors in external data to a temp folder, removed on exit. None and the reason when it cannot
    be written there."""
    if isinstance(model, str) or not too_large_for_one_file(model):
        yield model, ""
        return
    folder = Path(tempfile.mkdtemp(prefix="ptqlite-verify-"))
    try:
        size, free = tensor_bytes(model), shutil.disk_usage(folder).free
        if free < size + (64 << 20):
            yield None, (f"is over 2 GB, so ONNX Runtime loads it from a file, and the temp folder {folder.parent} "
                         f"has {free / 1e9:.1f} GB free for its {size / 1e9:.1f} GB")
            return
        try:
            path = str(save_model(model, folder / "model.onnx"))
        except PtqError as exc:  # a disk that fills up meanwhile
            path, why = None, f"is over 2 GB and could not be written to a temp folder for ONNX Runtime ({_one_line(exc)})"
        else:
            why = ""
        yield path, why
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text[:400] + ("..." if len(text) > 400 else "")


def _runtime_message(exc: ConversionError) -> str:
    """The runtime's own words from cpu_session's error, on one line."""
    return _one_line(str(exc).partition(f"{_PURPOSE} (")[2].removesuffix(")") or str(exc))


def compare(reference, value) -> tuple[str, float, bool, bool]:
    """(kind, score, non_finite, shape_mismatch) of one output on one sample."""
    ref, out = np.asarray(reference), np.asarray(value)
    if ref.dtype.kind not in "fc":
        if ref.shape != out.shape:
            return "agreement", 0.0, False, True
        return "agreement", float(np.mean(ref == out)) if ref.size else 1.0, False, False
    if ref.shape != out.shape:
        return "cosine", 0.0, False, True
    finite = np.isfinite(ref)
    kept = out[finite]
    if kept.dtype.kind in "fc" and not np.isfinite(kept).all():
        return "cosine", 0.0, True, False
    a, b = ref[finite].astype(np.float64).ravel(), kept.astype(np.float64).ravel()
    na, nb = float(np.sqrt(np.sum(a * a))), float(np.sqrt(np.sum(b * b)))
    if na == 0.0 or nb == 0.0:
        return "cosine", 1.0 if na == nb else 0.0, False, False
    return "cosine", float(np.clip(np.sum(a * b) / (na * nb), -1.0, 1.0)), False, False


def slice_cosines(references: list[np.ndarray], values: list[np.ndarray]) -> tuple[float, str] | None:
    """The lowest cosine of any small slice of a float output along a short axis (see MAX_SLICES and
    SMALL_SLICE), each slice's values pooled over the samples, and where it is ("axis 1 index 8 of 22"); None when
    the output has no such slice.
    Samples whose shapes differ, or with NaN/Inf where the float output is finite, are left to compare(); the float
    output's own NaN/Inf and slices that are all zero in float are not scored."""
    pairs = [(np.asarray(r), np.asarray(v)) for r, v in zip(references, values, strict=True)]
    pairs = [(r, v) for r, v in pairs if r.dtype.kind == "f" and r.shape == v.shape and r.ndim >= 2]
    if not pairs or len({r.shape for r, _ in pairs}) != 1:
        return None
    shape = pairs[0][0].shape
    worst: tuple[float, str] | None = None
    for axis, size in enumerate(shape):
        if not 2 <= size <= MAX_SLICES or int(np.prod(shape)) // size < MIN_SLICE_VALUES:
            continue
        dot, ref_sq, out_sq = np.zeros(size), np.zeros(size), np.zeros(size)
        for reference, value in pairs:
            finite = np.isfinite(reference)
            if not np.isfinite(value[finite]).all():
                continue
            a = np.moveaxis(np.where(finite, reference, 0.0), axis, 0).reshape(size, -1).astype(np.float64)
            b = np.moveaxis(np.where(finite, value, 0.0), axis, 0).reshape(size, -1).astype(np.float64)
            dot += np.sum(a * b, axis=1)
            ref_sq += np.sum(a * a, axis=1)
            out_sq += np.sum(b * b, axis=1)
        norms = np.sqrt(ref_sq)
        # Only slices far smaller than the largest are hidden in the whole-output cosine (a detector's scores
        # beside its pixel coordinates); slices of similar size (the tokens of a transformer) are weighed there.
        scored = (ref_sq > 0) & (norms < SMALL_SLICE * norms.max())
        if not scored.any():
            continue
        both = np.sqrt(ref_sq * out_sq)
        cosines = np.where(both > 0, dot / np.where(both > 0, both, 1.0), 0.0)
        index = int(np.flatnonzero(scored)[np.argmin(cosines[scored])])
        value = float(np.clip(cosines[index], -1.0, 1.0))
        if worst is None or value < worst[0]:
            worst = value, f"axis {axis} index {index} of {size}"
    return worst


def other_shape_inputs(original: onnx.ModelProto, input_shapes: dict[str, list[int]]
                       ) -> tuple[dict[str, np.ndarray], str] | None:
    """One synthetic sample in which every dim that --inputShape fixed but the model leaves symbolic is doubled
    (doubling keeps sizes a stride divides), and its shapes as text; None when no such dim exists."""
    specs, text, changed = [], [], False
    for spec, value in zip(model_input_specs(original), graph_inputs(original), strict=True):
        given = input_shapes.get(value.name)
        dims = list(value.type.tensor_type.shape.dim)
        if given is None:
            specs.append(spec)
            continue
        shape = []
        for position, size in enumerate(given):
            symbolic = position >= len(dims) or dims[position].dim_value <= 0
            if size > 0 and symbolic:
                shape.append(2 * size)
                changed = True
            else:
                shape.append(size if size > 0 else 1)
        specs.append(InputSpec(spec.name, tuple(shape), spec.dtype))
        text.append(f"{spec.name}:{','.join(map(str, shape))}")
    if not changed:
        return None
    return synthetic_inputs(specs, REFERENCE_VALUES)[0], ";".join(text)


def _other_shape_problem(quant, original: onnx.ModelProto | str, feeds: dict[str, np.ndarray], label: str) -> str:
    """What goes wrong when the quantized model runs at `label`'s shapes where the float model runs ("" if
    nothing, or if the float model itself does not run there)."""
    try:
        reference = _float_session(original)
        expected = reference.run(None, session_feeds(reference, feeds))
    except Exception:  # noqa: BLE001  (the float model does not run there either: nothing to learn)
        return ""
    try:
        got = dict(zip([o.name for o in quant.get_outputs()], quant.run(None, session_feeds(quant, feeds)),
                       strict=True))
    except Exception as exc:  # noqa: BLE001
        return f"at {label} it fails where the float model runs ({_one_line(exc)})"
    for info, value in zip(reference.get_outputs(), expected, strict=True):
        if info.name in got and np.shape(got[info.name]) != np.shape(value):
            return (f"at {label} output '{info.name}' has shape {list(np.shape(got[info.name]))} where the float "
                    f"model's has {list(np.shape(value))}")
    return ""


def verify(float_model: onnx.ModelProto | str, quant_model: onnx.ModelProto | str,
           inputs: list[dict[str, np.ndarray]], source: str, floor: float,
           other_shape: tuple[onnx.ModelProto | str, dict[str, np.ndarray], str] | None = None) -> Verification:
    """Load `quant_model` and compare it with `float_model` on `inputs` (either may be a model file: a streaming
    conversion; models over 2 GB run from files). A float model too large for the memory available
    (too_large_to_compare) is not run: the output runs alone and its float outputs must be finite. Raises
    VerificationError when the quantized model does not load, does not run where the float model runs, or lacks
    one of the float model's outputs. `other_shape` (the original float model, one sample at other input shapes,
    their text) also runs both there and records a failure or a different output shape in shape_problem."""
    result = Verification(source, len(inputs), floor)
    # An output that does not fit now, with constant folding or without, will not after the float model's run
    # either: neither session is made. It is asked again just before the output loads, when the memory available
    # may have shrunk.
    why = too_large_to_load(quant_model)
    if why and too_large_to_run_unfolded(quant_model):
        result.not_loaded = why
        return result
    with contextlib.ExitStack() as stack:
        too_large = too_large_to_compare(float_plan(float_model))
        if not too_large:
            float_source, no_room = stack.enter_context(_loadable(float_model))
            too_large = f"the float model {no_room}" if float_source is None else ""
        if too_large:
            _run_alone(result, quant_model, inputs, source, too_large, stack)
            return result
        # The float model runs first and its session goes before the output is loaded: the two sessions (each
        # the size of its model and its load-time scratch) are never held together.
        names, expected, stopped = _float_outputs(float_source, inputs, source, other_shape)
        trim_heap()
        quant_source, no_room = stack.enter_context(_loadable(quant_model))
        if quant_source is None:
            result.not_loaded = f"the output {no_room}"
            return result
        quant = _output_session(result, quant_source, float_source)
        if quant is None:
            return result
        return _compare(result, quant, names, expected, stopped, inputs, source, floor, other_shape)


def _run_alone(result: Verification, quant_model: onnx.ModelProto | str, inputs: list[dict[str, np.ndarray]],
               source: str, why: str, stack: contextlib.ExitStack) -> None:
    """The output without the float model: it must load and run on every input; its float outputs with NaN/Inf
    are counted in result.non_finite."""
    result.skipped = why
    quant_source, no_room = stack.enter_context(_loadable(quant_model))
    if quant_source is None:
        result.not_loaded = f"the output {no_room}"
        return
    quant = _output_session(result, quant_source, None)
    if quant is None:
        return
    names = [o.name for o in quant.get_outputs()]
    for number, feeds in enumerate(inputs):
        try:
            values = quant.run(None, session_feeds(quant, feeds))
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"the quantized model fails in ONNX Runtime on sample {number} of the {source}, "
                                    f"so nothing was written: {_one_line(exc)}") from None
        for name, value in zip(names, values, strict=True):
            array = np.asarray(value)
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                result.non_finite[name] = result.non_finite.get(name, 0) + 1
    result.ran_alone = len(inputs)


def _compare(result: Verification, quant, names: list[str] | None, expected: list[list[np.ndarray]], stopped: str,
             inputs: list[dict[str, np.ndarray]], source: str, floor: float,
             other_shape: tuple[onnx.ModelProto | str, dict[str, np.ndarray], str] | None) -> Verification:
    """Score the output's session `quant` against the float model's outputs `expected` (names None: the float
    model did not load, `stopped` says why)."""
    if names is None:  # the float model does not load: the output was only checked to load
        result.skipped = stopped
        return result
    quant_names = {o.name for o in quant.get_outputs()}
    missing = [n for n in names if n not in quant_names]
    if missing:
        raise VerificationError(f"the quantized model lacks the float model's output(s) {', '.join(missing)}")
    if stopped:
        result.samples = len(expected)
        result.skipped = stopped
        if not expected:
            return result
    scores: dict[str, list[tuple[str, float, bool, bool]]] = {n: [] for n in names}
    pairs: dict[str, tuple[list, list]] = {n: ([], []) for n in names}
    for number, (feeds, values) in enumerate(zip(inputs, expected)):
        try:
            got = dict(zip([o.name for o in quant.get_outputs()],
                           quant.run(None, session_feeds(quant, feeds)), strict=True))
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"the quantized model fails in ONNX Runtime on sample {number} of the {source}, "
                              f"where the float model runs, so nothing was written: {_one_line(exc)}") from None
        for name, value in zip(names, values, strict=True):
            scores[name].append(compare(value, got[name]))
            pairs[name][0].append(value)
            pairs[name][1].append(got[name])
    for name, values in scores.items():
        kind = values[0][0] if values else "cosine"
        numbers = [v[1] for v in values] or [1.0]
        check = OutputCheck(name, kind, float(np.mean(numbers)), float(np.min(numbers)),
                            sum(v[2] for v in values), sum(v[3] for v in values))
        if kind == "cosine":
            worst = slice_cosines(*pairs[name])
            if worst is not None:
                check.slice_min, check.slice_where = worst
        check.collapsed = bool(check.non_finite or check.shape_mismatch
                               or (kind == "cosine" and check.min < floor)
                               or (check.slice_min is not None and check.slice_min < SLICE_FLOOR)
                               or (kind == "agreement" and check.mean < AGREEMENT_FLOOR))
        result.outputs.append(check)
    if other_shape is not None:
        original, feeds, label = other_shape
        result.other_shapes = label
        result.shape_problem = _other_shape_problem(quant, original, feeds, label)
    return result


def _output_session(result: Verification, quant_source: onnx.ModelProto | str,
                    float_source: onnx.ModelProto | str | None):
    """The output's session with ONNX Runtime's defaults where its load fits in the memory available; else,
    where what the output's constant folding materialises is what does not fit, a session without constant
    folding (the decoders then run on every run: the same kernels, so the same values, in the memory of their
    results only; result.unfolded says why); else None, with result.not_loaded saying why."""
    why = too_large_to_load(quant_source)
    if not why:
        return _quant_session(quant_source, float_source)
    if too_large_to_run_unfolded(quant_source):
        result.not_loaded = why
        return None
    result.unfolded = why
    return _quant_session(quant_source, float_source, constant_folding=False)


def _quant_session(quant_model: onnx.ModelProto | str, float_model: onnx.ModelProto | str | None,
                   constant_folding: bool = True):
    """The output's session; one that does not load is a VerificationError (saying whether the float model
    loads either, unless `float_model` is None: too large to load)."""
    try:
        return cpu_session(quant_model, _PURPOSE, spinning=False, constant_folding=constant_folding)
    except ConversionError as exc:
        message = _runtime_message(exc)
    if float_model is None:
        raise VerificationError(f"the quantized model does not load in ONNX Runtime, so nothing was written: {message}")
    try:
        _float_session(float_model)
        either = ""
    except ConversionError as float_exc:
        either = f" (nor does the float model: {_runtime_message(float_exc)})"
    raise VerificationError(f"the quantized model does not load in ONNX Runtime, so nothing was written: "
                            f"{message}{either}")


def _float_session(float_model: onnx.ModelProto | str):
    """The float model's session (the reference only, never the output's: users run that with the defaults),
    without prepacking where every large tensor of its file is read in place (FloatPlan)."""
    prepacking = float_plan(float_model).prepacking if isinstance(float_model, str) else True
    return cpu_session(float_model, _PURPOSE, spinning=False, prepacking=prepacking)


def _float_outputs(float_model: onnx.ModelProto | str, inputs: list[dict[str, np.ndarray]], source: str,
                   other_shape: tuple[onnx.ModelProto | str, dict[str, np.ndarray], str] | None
                   ) -> tuple[list[str] | None, list[list[np.ndarray]], str]:
    """(output names, outputs per sample, why it stopped early or "") of the float model on `inputs`; names is
    None when the float model does not load. The session is gone when this returns."""
    try:
        reference = _float_session(float_model)
    except ConversionError as exc:
        if other_shape is None:
            return None, [], f"the float model does not load in ONNX Runtime ({_one_line(exc)})"
        # The float model with the fixed --inputShape shapes does not load (control flow whose inferred shapes
        # break), but the model with its own shapes runs the same inputs.
        try:
            reference = _float_session(other_shape[0])
        except ConversionError:
            return None, [], f"the float model does not load in ONNX Runtime ({_one_line(exc)})"
    names = [o.name for o in reference.get_outputs()]
    expected: list[list[np.ndarray]] = []
    for number, feeds in enumerate(inputs):
        try:
            expected.append(reference.run(None, session_feeds(reference, feeds)))
        except Exception as exc:  # noqa: BLE001  (onnxruntime's errors for inputs the model rejects)
            if number == 0:
                return names, expected, f"the float model does not run on the {source} ({_one_line(exc)})"
            # e.g. an input the model rejects only from some sample on: the samples compared so far still count
            return names, expected, (f"the float model does not run on sample {number} of the {source} "
                                     f"({_one_line(exc)})")
    return names, expected, ""


def likely_cause(config: QuantConfig) -> str:
    """What most often makes `config`'s mode collapse, and what to try."""
    if config.quant_type == "FULL_QUANT":
        method = config.full.activation_quant_method
        if method != "MAX_MIN":
            return (f"activation ranges clipped by activation_quant_method={method} (try MAX_MIN) or a layer that "
                    "does not tolerate int8")
        return "an activation or layer that does not tolerate int8 (or calibration data unlike the real inputs)"
    if config.quant_type == "DYNAMIC_QUANT":
        return "a MatMul/Gemm input whose outliers int8 cannot cover"
    if config.is_mixed_bit:
        return f"init_scale={config.mixed_bit.init_scale:g} lets some layer lose too much"
    return f"bit_num={config.common.bit_num} is too few bits for some layer"


def describe(check: OutputCheck) -> str:
    """One output's line of the summary, e.g. "output 'logits': cosine mean 0.999513, min 0.998102"."""
    if check.kind == "agreement":
        text = f"output '{check.name}': agreement mean {check.mean:.6f}, min {check.min:.6f} (exact match)"
    else:
        text = f"output '{check.name}': cosine mean {check.mean:.6f}, min {check.min:.6f}"
        if check.slice_min is not None:
            text += f"; worst slice ({check.slice_where}) {check.slice_min:.6f}"
    if check.non_finite:
        text += f", NaN/Inf where the float output is finite on {check.non_finite} sample(s)"
    if check.shape_mismatch:
        text += f", shape differs from the float output on {check.shape_mismatch} sample(s)"
    return text + (" COLLAPSED" if check.collapsed else "")


def collapse_message(verification: Verification, config: QuantConfig, analyze_command: str,
                     explicit_floor: bool = False) -> str:
    """One line: which outputs collapsed, the likely cause and the analyze command that finds the layers."""
    worst = ", ".join(f"'{o.name}' ({o.kind} min {o.min:.4f}"
                      + (f", slice {o.slice_where} {o.slice_min:.4f} below {SLICE_FLOOR:g}"
                         if o.slice_min is not None and o.slice_min < SLICE_FLOOR else "")
                      + (", NaN/Inf" if o.non_finite else "") + (", shape differs" if o.shape_mismatch else "")
                      + ")" for o in verification.collapsed)
    text = (f"the quantized model's output collapsed against the float model on {verification.inputs}: {worst}, "
            + (f"below --verifyFloor={verification.floor:g}" if explicit_floor
               else f"below the floor {verification.floor:g} for {mode_label(config)}")
            + f"; likely cause: {likely_cause(config)}")
    if is_synthetic(verification):
        text += "; the inputs were synthetic, so give calibration data for a real check"
    return text + f"; find the layers responsible with: {analyze_command}"


def non_finite_message(verification: Verification, config: QuantConfig, analyze_command: str) -> str:
    """One line: the output, run without the float model, gave NaN/Inf."""
    outputs = ", ".join(f"'{name}' on {count} of {verification.ran_alone} sample(s)"
                        for name, count in verification.non_finite.items())
    return (f"the quantized model's output has NaN/Inf on the {verification.inputs}: {outputs} (not compared with "
            f"the float model: {verification.skipped}); likely cause: {likely_cause(config)}; find the layers "
            f"responsible with: {analyze_command}")


def low_bit_message(verification: Verification, config: QuantConfig, analyze_command: str) -> str:
    """One line: a LOW_BITS-or-fewer WEIGHT_QUANT output was checked on synthetic inputs only."""
    worst = min(o.min for o in verification.outputs)
    bits = config.common.bit_num
    return (f"bit_num={bits} was verified on synthetic inputs only (min output cosine {worst:.4f}), which can miss "
            f"what {bits} bits lose on real data (a text recogniser measured 0.973 on them and 0.844 on real text); "
            "verify on real inputs by giving calibration data ([data_preprocess_param] calibrate_path: WEIGHT_QUANT "
            "reads it for this check and for block_size's search), or find the layers that lose most with: "
            f"{analyze_command}")


def run_gate(original: onnx.ModelProto, reference: onnx.ModelProto, runnable: onnx.ModelProto,
             result: ConversionResult, config: QuantConfig, options: dict, floor: float | None,
             analyze_command: str | None, input_shapes: dict[str, list[int]] | None, fixed: IoShapes | None,
             quant_file: str | None = None,
             inputs: tuple[list[dict[str, np.ndarray]], str] | None = None, original_file: str | None = None) -> None:
    """The gate as convert() runs it on `result` (`reference`: the float model with the fixed shapes, which the
    inputs are made for; `runnable`: the float model that runs, `reference` unless ONNX Runtime refuses it with
    the fixed shapes; `fixed`: what restore_io_shapes replaced, None when nothing was). The output must load and
    run in ONNX Runtime; a collapse is a warning, or an error when `floor` was given. With --inputShape the output, which has the
    model's own shapes again, also runs at other shapes; an output that works only at the fixed shapes keeps
    them, and a note says why. A streaming conversion gives `runnable` as the float model's file and the output
    as `quant_file` (its temp file), so neither model is held in memory beside ONNX Runtime's sessions. `inputs`
    (what verification_inputs gave, with `runnable` the float model's file) lets the caller drop the float model
    before the gate runs. `original_file`: the file `original` came from, which runs at the other shapes where
    `original` holds no weights (model.weight_free_copy)."""
    inputs, source = inputs or verification_inputs(reference, config, options.get("input_format"),
                                                   options.get("samples"))
    limit = default_floor(config) if floor is None else floor
    other = other_shape_inputs(original, input_shapes) if fixed is not None else None
    try:
        result.verification = verify(runnable, quant_file or result.model, inputs, source, limit,
                                     (original_file or original, *other) if other else None)
        problem = result.verification.shape_problem
    except VerificationError as exc:
        if fixed is None:
            raise
        problem = f"with the model's own input shapes {str(exc).replace(', so nothing was written', '')}"
        fixed.put_back(result.model)
        result.verification = verify(runnable, result.model, inputs, source, limit)
    if problem:
        fixed.put_back(result.model)
        result.notes.append(f"the output keeps the --inputShape shapes, since {problem}")
    command = analyze_command or f"ptqlite analyze --fmk=ONNX --modelFile=MODEL --configFile={config.source}"
    # a collapse or NaN/Inf is an error under --verifyFloor, else a warning; the low-bit caution is always a warning,
    # and so is an output the gate did not load: it is written unverified, as with --verify=off (exit 0), but said
    if result.verification.unfolded:  # verified, but the default load needs more memory than this machine has
        result.warnings.append(unfolded_message(result.verification))
        log.warning("%s", result.warnings[-1])
    if result.verification.not_loaded:
        message, fatal = not_loaded_message(result.verification), False
    elif result.verification.collapsed:
        message = collapse_message(result.verification, config, command, explicit_floor=floor is not None)
        fatal = floor is not None
    elif result.verification.non_finite:
        message, fatal = non_finite_message(result.verification, config, command), floor is not None
    elif is_synthetic(result.verification) and low_bit(config) and result.verification.outputs:
        message, fatal = low_bit_message(result.verification, config, command), False
    else:
        return
    if fatal:
        raise ConversionError(message)
    result.warnings.append(message)
    log.warning("%s", message)

"""Input rules checked before any work (docs/architecture.md, "Input rules"): the model is valid ONNX that ONNX
Runtime loads, it is not already quantized, and its weights and the calibration samples are finite numbers.

Each check only refuses (a ModelError or DataError, exit 2, one line naming the model, tensor or file); none
changes the model.
"""

from __future__ import annotations

import logging
import operator
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ConversionError, DataError, ModelError
from .model import iter_graphs, iter_tensors, stored_bytes, too_large_for_one_file, write_split
from .plan import WEIGHT_SLOTS
from .runtime import cpu_session
from .stream import all_finite_external, external_bytes, has_external_data, loads_whole, over_whole_load

log = logging.getLogger(__name__)

# Ops that only appear in a model someone has quantized already (standard and com.microsoft domains).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "QGemm",
    "QAttention", "QEmbedLayerNormalization", "GatherBlockQuantized", "QuantizeWithOrder", "DequantizeWithOrder",
    "QuantizeBFP", "DequantizeBFP", "QMoE",
})
_QUANTIZED_PREFIXES = ("QLinear", "QOrdered")
# ±Inf is refused only where quantization reads a constant: weights and normalisation parameters. Elsewhere
# -inf is an ordinary value (attention masks: Add / Where with -inf).
_WEIGHT_READERS = frozenset(WEIGHT_SLOTS) | {"BatchNormalization", "InstanceNormalization", "LayerNormalization",
                                             "GroupNormalization", "PRelu"}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def validate_model(model: onnx.ModelProto, source: str, path: str | Path | None = None) -> list[str]:
    """Refuse a model that breaks an input rule; returns notes (checks that could not run and why).

    `source` names the model in messages; `path`, when given, is the file it was loaded from, which the
    checks of models over 2 GB use (protobuf cannot serialise those in memory)."""
    notes, copy = validate_with_copy(model, source, path)
    if copy is not None:
        shutil.rmtree(copy.parent, ignore_errors=True)
    return notes


def validate_with_copy(model: onnx.ModelProto, source: str, path: str | Path | None = None
                       ) -> tuple[list[str], Path | None]:
    """validate_model, and the model file the checks read where they wrote the model for them (model.write_split,
    in a new temp folder the caller removes with the file's folder; None where they did not): the same model, its
    large weights in a page-aligned data file beside it, which ONNX Runtime maps instead of allocating (the gate's
    float session can run it)."""
    _check_opsets(model, source)
    if path is not None and has_external_data(model, iter_tensors):
        return _validate_streamed(model, source, Path(path)), None
    large = too_large_for_one_file(model)
    if large and path is None:
        notes = [("the ONNX checker and the ONNX Runtime load check did not run: the model is over 2 GB and was "
                  "given in memory, not as a file")]
        refuse_quantized(model, source)
        check_weights_finite(model, source)
        return notes, None
    if large:  # a model over 2 GB cannot be serialised in memory: both checks read its file
        _check_inputs_shaped(model, source)
        _check_onnx(str(path), source)
        refuse_quantized(model, source)
        check_weights_finite(model, source)
        _check_runtime(str(path), source)
        return [], None
    copy = None if has_external_data(model, iter_tensors) else _split_copy(model)
    if copy is None:  # tensors in external data that only the caller can resolve, or no room for the copy
        _check_onnx(model, source)
        refuse_quantized(model, source)
        check_weights_finite(model, source)
        _check_runtime(model, source)
        return [], None
    try:
        # The checker and ONNX Runtime read the split copy: the checker the graph alone (from a model it holds
        # the weights twice, in the serialisation and in its parse: MiniLM's check peaked at 2.9x the model),
        # ONNX Runtime with the weights mapped, not allocated.
        _check_inputs_shaped(model, source)
        checked = copy
        if any(_shapeless(value) for value in model.graph.output):
            checked = copy.with_name(_CHECKED)  # names the same data file
            graph = onnx.load(str(copy), load_external_data=False)
            checked.write_bytes(_with_output_shapes(graph).SerializeToString())
        _check_onnx(str(checked), source)
        refuse_quantized(model, source)
        check_weights_finite(model, source)
        _check_runtime(str(copy), source, copy=True)
    except BaseException:
        shutil.rmtree(copy.parent, ignore_errors=True)
        raise
    return [], copy


_CHECKED = "checked.onnx"


def _split_copy(model: onnx.ModelProto) -> Path | None:
    """`model` written by model.write_split into a new temp folder (None when it cannot be written there)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="ptqlite-check-"))
    except OSError:
        return None
    try:
        return write_split(model, folder)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _validate_streamed(model: onnx.ModelProto, source: str, path: Path) -> list[str]:
    """The input rules for a model whose weights stayed in external data: the checker reads the model file
    (it checks the data files exist and hold the tensors), NaN/Inf are scanned tensor by tensor from memory maps,
    and ONNX Runtime loads the model only up to stream.WHOLE_LOAD_BYTES."""
    for value in model.graph.input:
        if _shapeless(value):
            raise ModelError(f"{source}: input '{value.name}' has no shape; give one with --inputShape, e.g. "
                             f"--inputShape=\"{value.name}:1,3,224,224\"")
    _check_onnx(str(path), source)
    refuse_quantized(model, source)
    check_weights_finite(model, source, path.parent)
    size = stored_bytes(path)
    if not loads_whole(size):
        return [f"the ONNX Runtime load check of the input did not run: {over_whole_load(size)}"]
    _check_runtime(str(path), source)
    return []


def _check_opsets(model: onnx.ModelProto, source: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not 1 <= entry.version <= newest:
            raise ModelError(f"{source}: opset {entry.version} of the default ONNX domain is unknown "
                             f"(known: 1 to {newest}); re-export the model with a released opset")


def _check_onnx(model: onnx.ModelProto | str, source: str) -> None:
    """The full ONNX checker, strict shape inference included.

    The checker wants a shape on every graph input and output; ONNX Runtime does not. A missing output shape is
    accepted (the check runs on a copy whose outputs get their inferred shapes); a missing input shape is refused
    with the flag that gives one."""
    if isinstance(model, onnx.ModelProto):
        _check_inputs_shaped(model, source)
        if any(_shapeless(value) for value in model.graph.output):
            model = _with_output_shapes(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        hint = ""
        if "existing shape differ" in str(exc):  # ONNX Runtime only warns; the passes would trust the stale shapes
            hint = ("; the shapes recorded in the model (value_info, graph outputs) contradict what its ops compute: "
                    "remove the stale ones (e.g. del model.graph.value_info[:]) and convert again")
        raise ModelError(f"{source}: not a valid ONNX model ({one_line(str(exc))}){hint}") from None


def _check_inputs_shaped(model: onnx.ModelProto, source: str) -> None:
    for value in model.graph.input:
        if _shapeless(value):
            raise ModelError(f"{source}: input '{value.name}' has no shape; give one with --inputShape, e.g. "
                             f"--inputShape=\"{value.name}:1,3,224,224\"")


def _shapeless(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape")


def _with_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose shapeless outputs carry the shapes inference gives them (outputs it cannot shape
    are left out of the copy; the runtime load still sees them)."""
    try:
        probe = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  (the strict check that follows reports the real problem)
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
    keep = [value for value in probe.graph.output if not _shapeless(value)]
    del probe.graph.output[:]
    probe.graph.output.extend(keep)
    return probe


def _check_runtime(model: onnx.ModelProto | str, source: str, copy: bool = False) -> None:
    """ONNX Runtime's load check; `copy`: `model` is the split copy's file, whose name the message leaves out, and
    the session does not prepack (a load check needs no packed copies of the weights: MiniLM +54 MB)."""
    try:
        cpu_session(model, "as given", spinning=False, optimize=False, prepacking=not copy)
    except ConversionError as exc:
        text = str(exc).replace(f"Load model from {model} failed:", "") if copy else str(exc)
        raise ModelError(f"{source}: {one_line(text)}") from None


def one_line(text: str) -> str:
    """A checker or runtime message on one line, without the runtime's error code and C++ source location."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/\S+\.(?:h|cc|cpp):\d+ [^()]*\((?:[^()]|\([^()]*\))*\) ", "", text)
    text = re.sub(r"\s*==> Context:\s*", "; ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\.(\)*)$", r"\1", text)


def quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of quantized ops anywhere in the model (subgraphs included)."""
    return [n for g in iter_graphs(model.graph) for n in g.node
            if n.op_type in QUANTIZED_OPS or n.op_type.startswith(_QUANTIZED_PREFIXES)]


def refuse_quantized(model: onnx.ModelProto, source: str) -> None:
    """Every mode refuses a model that already has quantized ops: quantizing around them stacks a second
    rounding on the first, and the passes would read their integer weights as weights to skip."""
    nodes = quantized_nodes(model)
    if not nodes:
        return
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    listed = ", ".join(f"{count} {op}" for op, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    first = nodes[0].name or nodes[0].output[0]
    raise ModelError(f"{source}: the model is already quantized ({listed}; first: '{first}'); ptqlite "
                     "quantizes float models: convert the float original instead")


def check_weights_finite(model: onnx.ModelProto, source: str, base: Path | None = None) -> None:
    """NaN in any float constant, or ±Inf in a constant that a weighted or normalisation op reads, refuses the
    model: quantization turns it into a scale of NaN or Inf and the whole layer's output with it. Tensors in
    external data are scanned from their data files (in `base`, the model file's folder), a chunk at a time;
    without `base` they are not checked."""
    weight_names = {name for g in iter_graphs(model.graph) for n in g.node if n.op_type in _WEIGHT_READERS
                    for name in n.input}
    for graph in iter_graphs(model.graph):
        where = "" if graph is model.graph else f" (in subgraph '{graph.name}')"
        for tensor in graph.initializer:
            _check_tensor(tensor, tensor.name, tensor.name in weight_names, source, where, base)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    name = node.output[0] if node.op_type == "Constant" and node.output else f"{node.name}.{attr.name}"
                    _check_tensor(attr.t, name, name in weight_names, source, where, base)


def _check_tensor(tensor: onnx.TensorProto, name: str, is_weight: bool, source: str, where: str,
                  base: Path | None) -> None:
    if tensor.data_type not in _FLOAT_TYPES:
        return
    if tensor.data_location == TensorProto.EXTERNAL:
        if base is None:
            return
        size = external_bytes(tensor) // np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        nan, inf = all_finite_external(tensor, base)
    else:
        values = numpy_helper.to_array(tensor)
        if values.dtype not in (np.float32, np.float64, np.float16):
            values = values.astype(np.float32)  # bfloat16
        if values.size == 0 or _all_finite(values):
            return
        size = values.size
        nan = int(np.isnan(values).sum())
        inf = int(np.isinf(values).sum())
    if nan:
        raise ModelError(f"{source}: weight '{name}'{where} has {nan} NaN value(s) of {size}; expected "
                         "finite numbers (the float model itself computes NaN there)")
    if inf and is_weight:
        raise ModelError(f"{source}: weight '{name}'{where} has {inf} infinite value(s) of {size}; "
                         "expected finite numbers")


def _all_finite(values: np.ndarray) -> bool:
    # one float64 sum is cheap and is finite exactly when no value is NaN or Inf (float32 sums cannot overflow it)
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(np.add.reduce(values.ravel(), dtype=np.float64)):
            return True
    return bool(np.isfinite(values).all())


def check_sample_finite(sample: dict[str, np.ndarray], where: str) -> None:
    """Refuse a calibration sample with NaN or Inf: one such value sets an activation range to NaN/Inf."""
    for name, value in sample.items():
        array = np.asarray(value)
        if array.dtype.kind != "f" or array.size == 0:
            continue
        if _all_finite(array):
            continue
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise DataError(f"{where}: calibration data for input '{name}' has {bad} NaN/Inf value(s) of "
                            f"{array.size}; expected finite numbers")


class _Checked:
    """In-memory samples checked on each pass (re-iterable when the samples are)."""

    def __init__(self, samples: Iterable[dict[str, np.ndarray]]):
        self.samples = samples

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index, sample in enumerate(self.samples):
            check_sample_finite(sample, f"calibration sample {index}")
            yield sample

    def __length_hint__(self) -> int:  # the samples' count where known, for the progress bars
        total = operator.length_hint(self.samples, -1)
        return NotImplemented if total < 0 else total


class _SizedChecked(_Checked):
    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]


def checked_samples(samples: Iterable[dict[str, np.ndarray]] | None):
    """In-memory calibration samples (Python API) with the finiteness check: a list or tuple is checked now and
    returned as is; any other iterable is wrapped and checked while it is read."""
    if samples is None:
        return None
    if isinstance(samples, Sequence):
        for index, sample in enumerate(samples):
            check_sample_finite(sample, f"calibration sample {index}")
        return samples
    return _SizedChecked(samples) if hasattr(samples, "__len__") else _Checked(samples)

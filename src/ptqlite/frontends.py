"""--fmk=TFLITE and --fmk=TF: TFLite files, TensorFlow SavedModel folders and frozen graphs become an ONNX
ModelProto in memory through tf2onnx (the optional `ptqlite[tf]` extra, which brings TensorFlow: tf2onnx imports
it even for TFLite files). CAFFE and MINDIR have no maintained converter to ONNX, so they are refused with how to
export the model to ONNX instead (docs/frontends.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import onnx

from .errors import ModelError, PtqError, UsageError
from .paths import check_input_file

TF_FMKS = ("TF", "TFLITE")
# One line each (exit 2): what to do instead, since ptqlite cannot read these.
EXPORT_HINTS = {
    "CAFFE": "--fmk=CAFFE: ptqlite cannot read Caffe models (no maintained Caffe-to-ONNX converter exists); "
             "convert the model to ONNX first (load its weights in a framework that exports ONNX, e.g. PyTorch), "
             "then pass --fmk=ONNX (docs/frontends.md)",
    "MINDIR": "--fmk=MINDIR: ptqlite cannot read MindIR files (MindSpore exports ONNX only from the network "
              "itself); run mindspore.export(net, input, file_name='model', file_format='ONNX') on the network "
              "and pass --fmk=ONNX (docs/frontends.md)",
}
OPSET = 17  # the opset --fmk=PYTORCH exports too; every pass handles it
_TFLITE_ID = b"TFL3"  # the flatbuffer file identifier, bytes 4..8 of every .tflite file
_NATIVE_NOTICES = ("INFO: Created TensorFlow Lite", "WARNING: All log messages before absl::InitializeLog()")
_NOT_OUTPUTS = {"Const", "NoOp", "Placeholder", "PlaceholderWithDefault", "Assert", "SaveV2", "RestoreV2"}


def check_frontend(fmk: str) -> None:
    """Refuse a framework ptqlite knows of but cannot read, with how to export the model to ONNX."""
    if fmk in EXPORT_HINTS:
        raise UsageError(EXPORT_HINTS[fmk])


def fmk_for_path(path: str | Path) -> str:
    """The framework a model path implies (Python API, when no fmk is given): .tflite, a folder or .pb (TF),
    else ONNX."""
    path = Path(path)
    if path.suffix.lower() == ".tflite":
        return "TFLITE"
    if path.is_dir() or path.suffix.lower() == ".pb":
        return "TF"
    return "ONNX"


def load_tensorflow(path: str | Path, fmk: str) -> onnx.ModelProto:
    """The TFLite file (fmk TFLITE) or the SavedModel folder / frozen GraphDef (fmk TF) at `path` as ONNX.
    The file is checked before TensorFlow is imported, so a wrong path fails fast and without the extra."""
    path = Path(path)
    if fmk == "TFLITE":
        _check_tflite(path)
        tf2onnx = _import_converter(fmk)
        return _checked(path, "TFLite model", lambda: tf2onnx.convert.from_tflite(str(path), opset=OPSET)[0])
    saved_model = _saved_model_folder(path)
    if saved_model is None:
        check_input_file(str(path), "--modelFile")
        if not path.is_file():
            raise ModelError(f"{path}: model file not found; --fmk=TF expects a SavedModel folder or a frozen "
                             "graph (.pb)")
    tf2onnx = _import_converter(fmk)
    if saved_model is not None:
        return _checked(path, "SavedModel", lambda: _convert_saved_model(tf2onnx, saved_model))
    return _checked(path, "frozen graph", lambda: _convert_frozen_graph(tf2onnx, path))


def _check_tflite(path: Path) -> None:
    check_input_file(str(path), "--modelFile")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found; --fmk=TFLITE expects a .tflite file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] != _TFLITE_ID:
        raise ModelError(f"{path}: not a TFLite model (no '{_TFLITE_ID.decode()}' file identifier at byte 4)")


def _saved_model_folder(path: Path) -> Path | None:
    """The SavedModel folder `path` names (the folder, or its saved_model.pb), None for anything else."""
    if path.is_dir():
        if not any((path / name).is_file() for name in ("saved_model.pb", "saved_model.pbtxt")):
            raise ModelError(f"{path}: is a folder without saved_model.pb; --fmk=TF expects a SavedModel folder "
                             "or a frozen graph (.pb)")
        return path
    if path.name == "saved_model.pb" and (path.parent / "variables").is_dir():
        return path.parent
    return None


def _import_converter(fmk: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up lines on stderr
    try:
        import tensorflow as tf
        import tf2onnx
        import tf2onnx.convert
        import tf2onnx.tf_loader
    except ImportError as exc:
        raise UsageError(f"--fmk={fmk} needs tf2onnx and TensorFlow: pip install 'ptqlite[tf]' "
                         f"({exc.name or exc} is missing)") from None
    tf.get_logger().setLevel(logging.ERROR)  # deprecation warnings from tf2onnx's TF1-style freezing
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    return tf2onnx


def _checked(path: Path, kind: str, convert) -> onnx.ModelProto:
    """Run the conversion; a converter failure or an op it left unconverted is one line naming the file."""
    try:
        with warnings.catch_warnings(), _native_notices_dropped():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice, which tf2onnx uses
            model = convert()
    except PtqError:  # a refusal of ours, already one line
        raise
    except Exception as exc:  # noqa: BLE001  (TensorFlow and tf2onnx raise many types for a bad model)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: tf2onnx could not convert the {kind} ({first})") from None
    unknown = sorted({n.op_type for n in model.graph.node
                      if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)})
    if unknown:
        raise ModelError(f"{path}: tf2onnx has no ONNX conversion for {', '.join(unknown)} in the {kind}; "
                         "see docs/frontends.md for the supported ops")
    return model


@contextlib.contextmanager
def _native_notices_dropped():
    """TensorFlow's C++ code writes notices straight to file descriptor 2 (the TFLite interpreter tf2onnx runs
    prints "INFO: Created TensorFlow Lite XNNPACK delegate"): collect what it writes and pass on all but those."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as collected:
        os.dup2(collected.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            collected.seek(0)
            text = collected.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not line.startswith(_NATIVE_NOTICES)]
            sys.stderr.write("".join(kept))


def _convert_saved_model(tf2onnx, folder: Path) -> onnx.ModelProto:
    # The serving signature's names become the ONNX input/output names (tensors_to_rename), as tf2onnx's CLI does.
    graph_def, inputs, outputs, _tables, renames = tf2onnx.tf_loader.from_saved_model(
        str(folder), None, None, return_initialized_tables=True, return_tensors_to_rename=True)
    return tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs, opset=OPSET,
                                          tensors_to_rename=renames)[0]


def _convert_frozen_graph(tf2onnx, path: Path) -> onnx.ModelProto:
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as exc:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise ModelError(f"{path}: not a readable TensorFlow frozen graph ({exc})") from None
    inputs, outputs = graph_ends(graph_def)
    if not inputs or not outputs:
        raise ModelError(f"{path}: the frozen graph has no Placeholder input or no output node")
    graph_def, inputs, outputs = tf2onnx.tf_loader.from_graphdef(str(path), inputs, outputs)
    renames = {name: name.removesuffix(":0") for name in (*inputs, *outputs)}  # 'x:0' -> 'x', as TF users name them
    return tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs, opset=OPSET,
                                          tensors_to_rename=renames)[0]


def graph_ends(graph_def) -> tuple[list[str], list[str]]:
    """A frozen graph's inputs (its Placeholders) and outputs (nodes no other node reads), as 'name:0' tensors:
    a frozen graph names neither, and converter_lite takes none either."""
    read = {name.lstrip("^").split(":")[0] for node in graph_def.node for name in node.input}
    inputs = [f"{n.name}:0" for n in graph_def.node if n.op == "Placeholder"]
    outputs = [f"{n.name}:0" for n in graph_def.node if n.name not in read and n.op not in _NOT_OUTPUTS]
    return inputs, outputs

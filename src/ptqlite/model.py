"""Load and save ONNX models, the fmk front-ends, and small graph helpers shared by the passes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ConversionError, ModelError, UsageError
from .frontends import TF_FMKS, check_frontend, load_tensorflow
from .opset import raise_opset
from .paths import check_input_file, remove_quietly, remove_stale_temps, temp_path, write_error
from .stream import is_external, read_array

SUPPORTED_FMKS = ("ONNX", "PYTORCH", *TF_FMKS)
_TWO_GB = 2**31 - 1


def check_fmk(fmk: str) -> None:
    """Fail with the supported front-ends unless `fmk` is one of them (CAFFE, MINDIR: how to export to ONNX)."""
    check_frontend(fmk)
    if fmk not in SUPPORTED_FMKS:
        raise UsageError(f"--fmk={fmk}: expected one of {', '.join(SUPPORTED_FMKS)}")


def load_model(path: str | Path, fmk: str = "ONNX", input_shapes: dict[str, list[int]] | None = None,
               apply_shapes: bool = True, lazy: bool = False) -> onnx.ModelProto:
    """Read a model with the front-end for `fmk`; the file itself is never modified. `input_shapes` are checked
    against the model's inputs and, with `apply_shapes`, written into it (convert() instead applies them to its
    working copy only, so the output keeps the model's own shapes: docs/spec.md, "--inputShape"). With `lazy`
    (ONNX), tensors in external data stay there: the model holds their references only (a streaming
    conversion reads them one at a time, stream.py)."""
    path = Path(path)
    check_fmk(fmk)
    if fmk in TF_FMKS:  # a SavedModel is a folder: the front-end checks the path itself
        model = load_tensorflow(path, fmk)
    else:
        check_input_file(str(path), "--modelFile")
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        model = _load_torchscript(path, input_shapes) if fmk == "PYTORCH" else _load_onnx(path, lazy)
    if not model.graph.node:
        raise ModelError(f"{path}: the model graph has no nodes")
    if input_shapes:
        check_input_shapes(model, input_shapes, str(path))
        if apply_shapes:
            set_input_shapes(model, input_shapes)
    return model


def _load_onnx(path: Path, lazy: bool = False) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=not lazy)
    except Exception as exc:  # noqa: BLE001  (onnx raises many types for a corrupt file)
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from None


def _load_torchscript(path: Path, input_shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    try:
        import torch
    except ImportError:
        raise UsageError("--fmk=PYTORCH needs PyTorch: pip install 'ptqlite[torch]'") from None
    if not input_shapes:
        raise UsageError("--fmk=PYTORCH needs --inputShape to trace the model, e.g. --inputShape=\"x:1,3,224,224\"")
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001  (torch raises many types for a bad file)
        raise ModelError(f"{path}: not a readable TorchScript file ({exc})") from None
    names = list(input_shapes)
    args = tuple(torch.zeros(*shape) for shape in input_shapes.values())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.onnx")
        try:
            torch.onnx.export(module, args, out, input_names=names, opset_version=17, dynamo=False)
        except TypeError:  # older torch without the dynamo flag
            torch.onnx.export(module, args, out, input_names=names, opset_version=17)
        except Exception as exc:  # noqa: BLE001  (any export failure is reported the same way)
            raise ModelError(f"{path}: torch.onnx.export failed ({exc})") from None
        return onnx.load(out)


def parse_input_shapes(text: str) -> dict[str, list[int]]:
    """'in:1,3,224,224;in2:1,10' -> {'in': [1,3,224,224], 'in2': [1,10]}."""
    shapes: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, dims = part.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",")]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v < 1 and v != -1 for v in values):
            raise UsageError(f"--inputShape part '{part}': expected name:d1,d2,... with positive integers")
        shapes[name] = values
    if not shapes:
        raise UsageError(f"--inputShape='{text}': expected name:d1,d2,...[;name2:...]")
    return shapes


def check_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]], source: str) -> None:
    """Every name in `shapes` is an input of `model` and has the input's rank (when the model gives one)."""
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UsageError(f"--inputShape: {source} has no input '{name}'; its inputs are {', '.join(inputs)}")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) and len(shape.dim) != len(dims):
            raise UsageError(f"--inputShape: input '{name}' has rank {len(shape.dim)}, got {len(dims)} dims")


def set_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Write `shapes` (checked by check_input_shapes) into the model's inputs; -1 stays a symbolic dim."""
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, dims in shapes.items():
        shape = inputs[name].type.tensor_type.shape
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = max(0, d)
            if d < 0:
                shape.dim[-1].dim_param = "N"


def restore_io_shapes(output: onnx.ModelProto, original: onnx.ModelProto, notes: list[str]) -> IoShapes:
    """Give the output's inputs and outputs the original model's types (dims and dim_params) and drop the shape
    annotations the pass added (inferred from the fixed shapes). An input whose fixed dims --inputShape changed
    keeps the given shape (the user asked for it), the outputs then keep theirs too, and `notes` says so.
    Returns what it replaced."""
    graph = output.graph
    fixed = IoShapes(*([_copy_value(v) for v in values] for values in (graph.input, graph.output, graph.value_info)))
    declared = {v.name: v for v in (*original.graph.input, *original.graph.output)}
    changed = []
    for value in graph.input:
        if value.name in declared and not _compatible(declared[value.name], value):
            changed.append(f"'{value.name}' {_dims_text(value)} (the model fixes {_dims_text(declared[value.name])})")
    if changed:
        notes.append(f"--inputShape changes dims the model fixes, so the output takes the given shapes: "
                     f"{', '.join(changed)}")
    for value in graph.input:
        if value.name in declared and _compatible(declared[value.name], value):
            value.type.CopyFrom(declared[value.name].type)
    if not changed:  # with an input the user reshaped, the model's own output shapes may not hold
        for value in graph.output:
            if value.name in declared:
                value.type.CopyFrom(declared[value.name].type)
    own = {v.name for v in original.graph.value_info}
    kept = [_copy_value(v) for v in graph.value_info if v.name in own]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return fixed


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim]


def _dims_text(value: onnx.ValueInfoProto) -> str:
    return ",".join("?" if d is None else str(d) for d in _dims(value))


def _compatible(original: onnx.ValueInfoProto, fixed: onnx.ValueInfoProto) -> bool:
    """The fixed shape is one the original input admits (every fixed dim of the original kept)."""
    if not original.type.tensor_type.HasField("shape"):
        return True
    before, after = _dims(original), _dims(fixed)
    return len(before) == len(after) and all(b is None or b == a for b, a in zip(before, after, strict=True))


def _copy_value(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    return copy


class IoShapes:
    """Inputs, outputs and value_info of a graph as the pass wrote them (with the --inputShape shapes), to put
    back where the output works only with those."""

    def __init__(self, inputs, outputs, value_info):
        self.inputs, self.outputs, self.value_info = inputs, outputs, value_info

    def put_back(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        for field, values in ((graph.input, self.inputs), (graph.output, self.outputs),
                              (graph.value_info, self.value_info)):
            del field[:]
            field.extend(values)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not also initializers (IR < 4 models list both)."""
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


# Above this many bytes of tensor data the output keeps its tensors in `<name>.data`: protobuf cannot serialise
# a message over 2 GB, and the graph itself needs room next to the tensors. Decided from summed tensor sizes,
# because ModelProto.ByteSize() itself raises past 2 GB.
EXTERNAL_DATA_THRESHOLD = _TWO_GB - 2**28
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inline, as onnx.save_model does


def write_file(path: str | Path, data: bytes) -> None:
    """Write `data` to a new file (the one place save_model writes the model through)."""
    with open(path, "wb") as handle:
        handle.write(data)


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write atomically: a temp file beside the target (`.<name>.ptqlite-tmp-<pid>`), then rename; nothing is
    left behind on any error or interrupt. Models whose tensors sum past EXTERNAL_DATA_THRESHOLD keep them in
    `<name>.data` beside the model. `model` is unchanged afterwards."""
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    tmp, tmp_data = temp_path(path), temp_path(data_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        remove_stale_temps(data_path)
        if too_large_for_one_file(model):
            with _external_data(model, tmp_data, data_path.name):
                write_file(tmp, model.SerializeToString(deterministic=True))
            os.replace(tmp_data, data_path)
        else:
            write_file(tmp, model.SerializeToString(deterministic=True))
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, "the output model", exc) from None
    except Exception as exc:  # noqa: BLE001  (serialisation raises several types)
        raise ConversionError(f"{path}: could not write the output model ({exc})") from None
    finally:  # also on KeyboardInterrupt / SIGTERM: no temp file survives
        remove_quietly(tmp)
        remove_quietly(tmp_data)
    return path


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The external-data files the model's tensors name (relative to the model file's folder)."""
    return {entry.value for t in iter_tensors(model.graph) for entry in t.external_data if entry.key == "location"}


def stored_bytes(path: str | Path, model: onnx.ModelProto | None = None) -> int:
    """Bytes a model takes on disk: the file plus the external-data files its tensors name (a SavedModel
    folder: all its files). `model`: the ONNX model as loaded from `path`, whose external-data entries are read
    instead of parsing the file again (which holds a model without external data whole in memory)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    total = path.stat().st_size
    if model is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001  (the size of the file itself is still right)
            return total
    locations = external_locations(model)
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def too_large_for_one_file(model: onnx.ModelProto) -> bool:
    """True when the model must keep its tensors in external data (it cannot be serialised in one message)."""
    return tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Summed data size of every tensor of the model (subgraphs included), from dims and dtype: cheap, and
    defined for models too large to serialise."""
    return sum(_nbytes(t) for t in iter_tensors(model.graph))


def inline_bytes(tensor: onnx.TensorProto) -> int:
    """Data size of a tensor held in its message (0 for one in external data), from dims and dtype."""
    return _nbytes(tensor)


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
# types whose typed-field values become raw bytes one numpy element each (sub-byte types are packed: left inline)
_PLAIN_TYPES = {getattr(onnx.TensorProto, n) for n in ("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32",
                                                         "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")}


def _little_endian_bytes(tensor: onnx.TensorProto) -> bytes:
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    return numpy_helper.to_array(tensor).astype(dtype).tobytes()


@contextlib.contextmanager
def _external_data(model: onnx.ModelProto, data_file: Path, location: str):
    """Move the data of every large initializer into `data_file` (the model then names `location`) for as long
    as the block runs, one tensor at a time (no second copy of the model); the data is read back afterwards, so
    the model serialises to the same bytes as before."""
    # (tensor, offset, length, had data_location, the tensor itself when its values were in typed fields)
    moved: list[tuple[onnx.TensorProto, int, int, bool, onnx.TensorProto | None]] = []
    try:
        with open(data_file, "wb") as handle:
            for tensor in iter_initializers(model.graph):
                raw_form = tensor.HasField("raw_data")
                if ((not raw_form and tensor.data_type not in _PLAIN_TYPES)
                        or tensor.data_location == onnx.TensorProto.EXTERNAL or _nbytes(tensor) < _EXTERNAL_MIN_BYTES):
                    continue
                original = None
                if not raw_form:  # rare (exporters write raw_data): keep the typed values to put back
                    original = onnx.TensorProto()
                    original.CopyFrom(tensor)
                raw = tensor.raw_data if raw_form else _little_endian_bytes(tensor)
                handle.seek(-handle.tell() % 4096, os.SEEK_CUR)  # page-aligned, so runtimes can map it
                offset = handle.tell()
                handle.write(raw)
                moved.append((tensor, offset, len(raw), tensor.HasField("data_location"), original))
                for name in ("raw_data", *_TYPED_FIELDS):
                    tensor.ClearField(name)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                del raw
        yield
    finally:
        with open(data_file, "rb") if moved else contextlib.nullcontext() as handle:
            for tensor, offset, length, had_location, original in moved:
                if original is not None:
                    tensor.CopyFrom(original)
                    continue
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                if had_location:
                    tensor.data_location = onnx.TensorProto.DEFAULT
                handle.seek(offset)
                tensor.raw_data = handle.read(length)


def iter_graphs(graph: onnx.GraphProto):
    """`graph` and every subgraph in it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def weight_free_copy(model: onnx.ModelProto, largest: int = 1024) -> onnx.ModelProto:
    """A copy of `model` in which every initializer of more than `largest` values keeps only its name, type and
    dims (an external-data stub naming no file). Shape inference reads the values of small constants only
    (shapes, axes, pads) and onnx's infer_shapes serialises the model and parses its answer back: on the whole
    model that held four copies of the weights at once."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= largest:
            light.graph.initializer.append(tensor)
            continue
        stub = light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="weight-free copy (no file)")
    return light


def write_by_tensor(model: onnx.ModelProto, file) -> None:
    """`model` serialised into the binary `file` one initializer at a time, for a parser (ONNX Runtime's, onnx's)
    to read back, not as the output's bytes: first the model without the main graph's initializers, then each
    initializer as a ModelProto of its own holding a graph with that one tensor. Protobuf parses concatenated
    messages as one, merged: the repeated initializer field grows by each, in order, so the file parses to the
    same model. SerializeToString of the whole model makes its encoding buffer (grown by copying) and then a bytes
    copy of it, three times the weights in fresh memory, each page a fault; a tensor at a time reuses memory."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    file.write(skeleton.SerializeToString())
    del skeleton
    for tensor in model.graph.initializer:
        data = tensor.SerializeToString()
        inner = _GRAPH_INITIALIZER_TAG + _varint(len(data))  # GraphProto field 5, length-delimited
        file.write(_MODEL_GRAPH_TAG + _varint(len(inner) + len(data)) + inner)  # ModelProto field 7
        file.write(data)


SPLIT_MODEL = "model.onnx"  # write_split's file names in its folder
SPLIT_DATA = "model.onnx.data"
_SPLIT_MIN_BYTES = 1024  # smaller tensors stay in the graph, as onnx.save_model does
_SPLIT_ALIGN = 4096  # tensors start on page boundaries, so ONNX Runtime maps them


def write_split(model: onnx.ModelProto, folder: str | Path) -> Path:
    """`model` written into `folder` for a parser to read back (onnx's checker, ONNX Runtime), not as an output:
    the graph in SPLIT_MODEL and the bytes of each main-graph initializer of 1 KB or more in SPLIT_DATA, page-aligned,
    one tensor at a time (the largest tensor is the only copy made). ONNX Runtime maps such tensors instead of
    allocating them, and the checker reads the graph alone. A tensor that the data file would not hold exactly as it
    is (values in typed fields, a byte count that disagrees with its dims, strings, sub-byte types, external data)
    stays in the graph, so every parser meets the same model and refuses it in the same words. Returns the model
    file."""
    folder = Path(folder)
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    with open(folder / SPLIT_DATA, "wb") as data:
        for tensor in model.graph.initializer:
            stub = skeleton.graph.initializer.add()
            size = _nbytes(tensor) if tensor.data_type in _PLAIN_TYPES else 0
            raw = tensor.raw_data if size >= _SPLIT_MIN_BYTES and _raw_only(tensor) else b""
            if len(raw) != size or not raw:
                stub.CopyFrom(tensor)
                continue
            data.write(b"\0" * (-data.tell() % _SPLIT_ALIGN))
            offset = data.tell()
            data.write(raw)
            del raw
            for name in ("name", "data_type", "doc_string"):
                if tensor.HasField(name):  # proto2: an empty string set is a field present
                    setattr(stub, name, getattr(tensor, name))
            stub.dims.extend(tensor.dims)
            stub.metadata_props.extend(tensor.metadata_props)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", SPLIT_DATA), ("offset", str(offset)), ("length", str(size))):
                stub.external_data.add(key=key, value=value)
    path = folder / SPLIT_MODEL
    path.write_bytes(skeleton.SerializeToString())
    return path


def _raw_only(tensor: onnx.TensorProto) -> bool:
    """Whether the tensor's values are in raw_data alone (inline, no typed field or segment beside it)."""
    return (tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL
            and not tensor.HasField("segment") and not tensor.string_data
            and not any(len(getattr(tensor, name)) for name in _TYPED_FIELDS))


_MODEL_GRAPH_TAG = bytes([7 << 3 | 2])
_GRAPH_INITIALIZER_TAG = bytes([5 << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        # (is_repeated in newer protobuf releases, label in older ones)
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def remove_initializers(graph: onnx.GraphProto, names: set[str] | dict) -> None:
    """Delete the named initializers of `graph` in place; the others keep their order. Not `del initializer[:]`
    and `extend(kept)`: extend copies every kept tensor into the message again, and protobuf frees the old ones
    only with the whole message (a second copy of a model's weights held until the conversion ends)."""
    for position in reversed([i for i, t in enumerate(graph.initializer) if t.name in names]):
        del graph.initializer[position]


def iter_initializers(graph: onnx.GraphProto):
    for g in iter_graphs(graph):
        yield from g.initializer


def iter_tensors(graph: onnx.GraphProto):
    """Every tensor stored in the model: initializers and tensor attributes (Constant values), subgraphs
    included."""
    for g in iter_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


# ---------------------------------------------------------------- graph helpers


# A node that holds subgraphs (If, Loop, Scan) reads the outer names its bodies use: consumers list it with this slot.
IMPLICIT_INPUT = -1


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of an If/Loop/Scan (or any node with graph attributes)."""
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def all_nodes(graph: onnx.GraphProto):
    """Every node of `graph` and of its subgraphs, depth first, each with the graph it belongs to."""
    for node in graph.node:
        yield node, graph
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The names `graph`'s nodes read that `graph` does not define: from an outer scope when it is a subgraph."""
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    defined |= {o for node in graph.node for o in node.output}
    read = {n for node in graph.node for n in node.input if n}
    for node in graph.node:
        for sub in subgraphs(node):
            read |= outer_reads(sub)
    return read - defined


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names |= {*node.input, *node.output, node.name}
        for sub in subgraphs(node):
            names |= _all_names(sub)
    return names


class GraphIndex:
    """Lookups over one graph: initializers by name, consumers and producer of each tensor. A node with
    subgraphs is listed as a consumer (slot IMPLICIT_INPUT) of every outer name its bodies read, and unique names
    avoid the names of every subgraph too."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, slot))
            for sub in subgraphs(node):
                for name in sorted(outer_reads(sub)):
                    self.consumers[name].append((node, IMPLICIT_INPUT))
            for name in node.output:
                self.producer[name] = node
        self.graph_input_names = {i.name for i in graph.input}
        self.graph_output_names = {o.name for o in graph.output}
        self._used = _all_names(graph)

    def array(self, name: str) -> np.ndarray:
        """The initializer's values; one in external data (a streaming conversion) is a read-only memory map."""
        tensor = self.initializers[name]
        if is_external(tensor):
            return read_array(tensor)
        return numpy_helper.to_array(tensor)

    def unique_name(self, base: str) -> str:
        name, counter = base, 1
        while name in self._used:
            name = f"{base}_{counter}"
            counter += 1
        self._used.add(name)
        return name


class ProbeAdditions:
    """Nodes, int64 constants and graph outputs appended to a model for the time a probe session takes to load,
    and removed again by remove(): a probe that worked on a copy of the model would cost its size once more, at
    the peak of a conversion's memory (calibration, bias correction, the activation-weighted block search)."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.mark = len(self.graph.node), len(self.graph.initializer), len(self.graph.output)
        self._index: GraphIndex | None = None  # made on the first name asked for: outputs() alone needs none

    @property
    def index(self) -> GraphIndex:
        if self._index is None:
            self._index = GraphIndex(self.graph)
        return self._index

    def node(self, op: str, inputs: list[str], tag: str, **attrs) -> str:
        """Append one op named after `tag` (made unique); returns its output's name."""
        out = self.index.unique_name(tag)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, values: list[int], tag: str) -> str:
        """Append an int64 initializer (shapes, axes, slice bounds); returns its name."""
        name = self.index.unique_name(tag)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def outputs(self, names) -> None:
        """Make `names` graph outputs (type and shape left to the runtime)."""
        self.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)

    def remove(self) -> None:
        """Take out everything appended since this object was made."""
        nodes, initializers, outputs = self.mark
        del self.graph.node[nodes:]
        del self.graph.initializer[initializers:]
        del self.graph.output[outputs:]


def subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names read inside subgraphs (If/Loop/Scan bodies, nested ones too)."""
    names: set[str] = set()
    for node in graph.node:
        for sub in subgraphs(node):
            names |= {name for n in sub.node for name in n.input} | subgraph_inputs(sub)
    return names


def lift_subgraph_constants(model: onnx.ModelProto) -> int:
    """Move the initializers and Constant tensors of If/Loop/Scan bodies into the main graph, whose names the
    bodies read from the outer scope, so that their weights are planned and quantized like any other. Only names
    defined once in the whole model move (elsewhere moving would shadow or be shadowed), and never a body's
    formal input. Returns how many tensors moved."""
    graph = model.graph
    definitions: Counter[str] = Counter()

    # count and lift are given themselves (`again`) rather than calling themselves by name: a closure that names
    # itself is a reference cycle, holding what it captured until Python's cycle collector runs
    def count(g: onnx.GraphProto, again) -> None:
        definitions.update(t.name for t in g.initializer)
        definitions.update(i.name for i in g.input)
        for node in g.node:
            definitions.update(o for o in node.output if o)
            for sub in subgraphs(node):
                again(sub, again)

    count(graph, count)
    lifted: list[onnx.TensorProto] = []

    def lift(sub: onnx.GraphProto, again) -> None:
        formal = {i.name for i in sub.input}
        keep = [t for t in sub.initializer if definitions[t.name] > 1 or t.name in formal]
        lifted.extend(t for t in sub.initializer if definitions[t.name] == 1 and t.name not in formal)
        del sub.initializer[:]
        sub.initializer.extend(keep)
        nodes = []
        for node in sub.node:
            for inner in subgraphs(node):
                again(inner, again)
            if (node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value"
                    and definitions[node.output[0]] == 1):
                tensor = onnx.TensorProto()
                tensor.CopyFrom(node.attribute[0].t)
                tensor.name = node.output[0]
                lifted.append(tensor)
            else:
                nodes.append(node)
        del sub.node[:]
        sub.node.extend(nodes)

    for node in graph.node:
        for sub in subgraphs(node):
            lift(sub, lift)
    graph.initializer.extend(lifted)
    return len(lifted)


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn Constant nodes that hold a tensor into initializers, so weights exported as Constant nodes are
    quantized like any other weight."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def name_unnamed_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node (subgraphs included) the name of its first output (made unique), so
    skip_quant_node can name it and reports can show it. Returns how many nodes were named."""
    nodes = [node for node, _ in all_nodes(model.graph)]
    used = {n.name for n in nodes if n.name}
    named = 0
    for node in nodes:
        if node.name:
            continue
        base = next((o for o in node.output if o), node.op_type)
        name, counter = base, 1
        while name in used:
            name, counter = f"{base}_{counter}", counter + 1
        node.name = name
        used.add(name)
        named += 1
    return named


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def ensure_opset(model: onnx.ModelProto, minimum: int) -> None:
    """Raise the default-domain opset to `minimum` when it is lower, without serialising the weights (opset.py:
    the opset_import alone when no op of the model changed meaning in between, else onnx's version converter on
    the weight-free graph)."""
    if opset_version(model) >= minimum:
        return
    raise_opset(model, minimum)

"""Load and save ONNX models, the fmk front-ends, and small graph helpers shared by the passes."""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ConversionError, ModelError, UsageError

SUPPORTED_FMKS = ("ONNX", "PYTORCH")
_TWO_GB = 2**31 - 1


def check_fmk(fmk: str) -> None:
    """Fail with the supported front-ends unless `fmk` is one of them."""
    if fmk not in SUPPORTED_FMKS:
        raise UsageError(f"--fmk={fmk}: expected one of {', '.join(SUPPORTED_FMKS)}")


def load_model(path: str | Path, fmk: str = "ONNX", input_shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """Read a model with the front-end for `fmk`; the file itself is never modified."""
    path = Path(path)
    check_fmk(fmk)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if fmk == "PYTORCH":
        model = _load_torchscript(path, input_shapes)
    else:
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001  (onnx raises many types for a corrupt file)
            raise ModelError(f"{path}: not a readable ONNX model ({exc})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: the model graph has no nodes")
    if input_shapes:
        set_input_shapes(model, input_shapes, str(path))
    return model


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


def set_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]], source: str) -> None:
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UsageError(f"--inputShape: {source} has no input '{name}'; its inputs are {', '.join(inputs)}")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) and len(shape.dim) != len(dims):
            raise UsageError(f"--inputShape: input '{name}' has rank {len(shape.dim)}, got {len(dims)} dims")
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = max(0, d)
            if d < 0:
                shape.dim[-1].dim_param = "N"


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not also initializers (IR < 4 models list both)."""
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write atomically: a temp file beside the target, then rename. Models over 2 GB keep their tensors in
    `<name>.data` beside the model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    data_name = path.name + ".data"
    tmp_data = None
    try:
        if model.ByteSize() > _TWO_GB:
            tmp_data = path.parent / f".{data_name}.tmp"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            os.replace(tmp_data, path.parent / data_name)
            # The model refers to the data file by the name it had while being written; fix the reference.
            saved = onnx.load(tmp, load_external_data=False)
            for tensor in _all_tensors(saved):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(saved, tmp)
        else:
            with open(tmp, "wb") as handle:
                handle.write(model.SerializeToString(deterministic=True))
        # mkstemp creates the file private (0600); give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001  (clean up and report whatever stopped the write)
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.remove(leftover)
        raise ConversionError(f"{path}: could not write the output model ({exc})") from None
    return path


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


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
        return numpy_helper.to_array(self.initializers[name])

    def unique_name(self, base: str) -> str:
        name, counter = base, 1
        while name in self._used:
            name = f"{base}_{counter}"
            counter += 1
        self._used.add(name)
        return name


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

    def count(g: onnx.GraphProto) -> None:
        definitions.update(t.name for t in g.initializer)
        definitions.update(i.name for i in g.input)
        for node in g.node:
            definitions.update(o for o in node.output if o)
            for sub in subgraphs(node):
                count(sub)

    count(graph)
    lifted: list[onnx.TensorProto] = []

    def lift(sub: onnx.GraphProto) -> None:
        formal = {i.name for i in sub.input}
        keep = [t for t in sub.initializer if definitions[t.name] > 1 or t.name in formal]
        lifted.extend(t for t in sub.initializer if definitions[t.name] == 1 and t.name not in formal)
        del sub.initializer[:]
        sub.initializer.extend(keep)
        nodes = []
        for node in sub.node:
            for inner in subgraphs(node):
                lift(inner)
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
            lift(sub)
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
    """Raise the default-domain opset to `minimum` when it is lower, via onnx's version converter."""
    if opset_version(model) >= minimum:
        return
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, minimum)
    except Exception as exc:  # noqa: BLE001  (the converter raises many types)
        raise ConversionError(f"cannot raise the model's opset to {minimum} ({exc})") from None
    model.CopyFrom(converted)

"""Sessions of large in-memory models load from a temp file written a tensor at a time (model.write_by_tensor):
the file parses to the same model, and no serialisation of the whole model is made."""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

from ptqlite import runtime
from ptqlite.model import write_by_tensor


def _model() -> onnx.ModelProto:
    """MatMul -> Add -> If whose branches read an outer initializer, a Constant node, metadata, a doc string."""
    r = np.random.default_rng(0)
    branches = [helper.make_graph([helper.make_node("Mul", ["h", f"k_{side}"], [f"y_{side}"])], side, [],
                                  [helper.make_tensor_value_info(f"y_{side}", T.FLOAT, [1, 16])],
                                  [nh.from_array(np.full((16,), 2.0 if side == "then" else 3.0, np.float32),
                                                 f"k_{side}")])
                for side in ("then", "else")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Constant", [], ["c"], value=nh.from_array(np.ones(16, np.float32))),
             helper.make_node("Add", ["m", "c"], ["h"], name="add"),
             helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1])]
    inits = [nh.from_array(r.normal(size=(8, 16)).astype(np.float32), "W"), nh.from_array(np.float32(0), "zero"),
             nh.from_array(np.arange(5, dtype=np.int64), "unused_ints")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 16])], inits, doc_string="doc")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    helper.set_model_props(model, {"key": "value"})
    return model


def test_the_file_parses_to_the_same_model():
    model = _model()
    buffer = io.BytesIO()
    write_by_tensor(model, buffer)
    back = onnx.ModelProto()
    back.ParseFromString(buffer.getvalue())
    assert back == model
    assert [t.name for t in back.graph.initializer] == ["W", "zero", "unused_ints"]  # in their order


def test_a_large_model_is_staged_without_a_whole_serialisation(monkeypatch):
    model = _model()
    feeds = {"x": np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)}
    expected = runtime.cpu_session(model, "from bytes").run(None, feeds)[0]  # small: loaded from its bytes
    monkeypatch.setattr(runtime, "FILE_LOAD_BYTES", 64)  # W's 512 bytes make it "large"
    staged = []
    real = runtime.temp_model_file
    monkeypatch.setattr(runtime, "temp_model_file",
                        lambda data, prefix: staged.append(type(data)) or real(data, prefix))
    whole, serialise = [], onnx.ModelProto.SerializeToString
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString",
                        lambda self, **k: whole.append(self) or serialise(self, **k))
    got = runtime.cpu_session(model, "from a file").run(None, feeds)[0]
    assert staged == [onnx.ModelProto]
    assert not any(len(m.graph.initializer) for m in whole)  # only the model without its initializers
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- model.write_split (the input checks' copy)


def _split_model() -> onnx.ModelProto:
    """_model() with initializers the data file takes (raw, 1 KB or more, in order) and ones it leaves in the graph:
    typed float_data, a byte count that disagrees with the dims, a string tensor, a small one."""
    model = _model()
    r = np.random.default_rng(2)
    big = nh.from_array(r.normal(size=(16, 16)).astype(np.float32), "big")
    big.doc_string = "kept"
    ints = nh.from_array(np.arange(300, dtype=np.int64), "ints")
    typed = helper.make_tensor("typed", T.FLOAT, [300], r.normal(size=300).astype(np.float32).tolist())
    short = onnx.TensorProto(name="short", data_type=T.FLOAT, dims=[300], raw_data=b"\0" * 1100)  # 1200 expected
    strings = helper.make_tensor("strings", T.STRING, [300], [b"s"] * 300)
    model.graph.initializer.extend([big, ints, typed, short, strings])
    return model


def test_split_copy_parses_to_the_same_model_with_large_raw_tensors_mapped(tmp_path):
    from ptqlite.model import SPLIT_DATA, write_split
    from ptqlite.stream import read_in_place

    model = _split_model()
    path = write_split(model, tmp_path)
    graph = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in graph.graph.initializer if t.data_location == T.EXTERNAL]
    assert external == ["big", "ints"]  # W (8x16 floats, 512 bytes) stays in the graph
    assert all(read_in_place(t) for t in graph.graph.initializer if t.name in external)
    assert all(t.external_data[0].value == SPLIT_DATA for t in graph.graph.initializer if t.name in external)
    back = onnx.load(str(path))
    for tensor in back.graph.initializer:
        tensor.ClearField("data_location")  # onnx sets DEFAULT on the tensors it read back
    assert back == model
    feeds = {"x": np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)}
    from ptqlite import runtime

    light = onnx.ModelProto.FromString(model.SerializeToString())
    for name in ("short", "strings"):  # not loadable in ONNX Runtime; the file keeps them as they are
        index = [t.name for t in light.graph.initializer].index(name)
        del light.graph.initializer[index]
    expected = runtime.cpu_session(light, "in memory", prepacking=False).run(None, feeds)[0]
    got = runtime.cpu_session(str(write_split(light, tmp_path)), "split", prepacking=False).run(None, feeds)[0]
    assert np.array_equal(got, expected)

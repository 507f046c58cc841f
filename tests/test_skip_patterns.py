"""skip_quant_node patterns (fnmatch) and skip_quant_op_type: which nodes stay float, in every mode, from the INI
file, the Python API's dict config and the command line."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from helpers import full_config, samples
from onnx import TensorProto, helper, numpy_helper

import ptqlite
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.errors import ConfigError

CONVS = ["/layer1/conv_a", "/layer1/conv_b", "/layer2/conv", "conv[0]", "conv0"]


def model() -> onnx.ModelProto:
    """Five 3x3 convolutions of 32 channels in a chain (names with slashes and brackets), then a Gemm."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, name in enumerate(CONVS):
        inits.append(numpy_helper.from_array(rng.normal(size=(32, 32 if i else 3, 3, 3)).astype(np.float32) * 0.1,
                                             f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=name, pads=[1, 1, 1, 1]))
        x = f"c{i}"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="/head/fc", transB=1)]
    inits.append(numpy_helper.from_array(rng.normal(size=(10, 32)).astype(np.float32), "fc_w"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weight_config(extra: str) -> str:
    return f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num=8\nmin_quant_weight_channel=0\n{extra}\n"


def skipped_nodes(result) -> dict[str, str]:
    return {node: s.reason for s in result.skipped for node in s.nodes}


@pytest.mark.parametrize("entry, expected", [
    ("/layer1/*", {"/layer1/conv_a", "/layer1/conv_b"}),
    ("/layer?/conv*", {"/layer1/conv_a", "/layer1/conv_b", "/layer2/conv"}),
    ("*conv_[ab]", {"/layer1/conv_a", "/layer1/conv_b"}),
    ("/layer2/conv", {"/layer2/conv"}),  # an exact name, as before
    ("conv[0]", {"conv[0]"}),  # an exact name with brackets keeps its meaning (as a pattern it would mean conv0)
    ("conv[!x]", {"conv0"}),  # no node has this name: a pattern
    ("/layer2/conv,/head/*", {"/layer2/conv", "/head/fc"}),
])
def test_skip_quant_node_patterns(entry, expected):
    result = convert(model(), parse_config(weight_config(f"skip_quant_node={entry}")), verify=False)
    skipped = skipped_nodes(result)
    assert set(skipped) == expected
    assert all(reason.startswith("skip_quant_node lists ") for reason in skipped.values())
    quantized = {n for q in result.quantized for n in q.nodes}
    assert quantized == set(CONVS) - expected | ({"/head/fc"} - expected)


def test_a_pattern_that_matches_nothing_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ptqlite"):
        result = convert(model(), parse_config(weight_config("skip_quant_node=/layer9/*")), verify=False)
    assert not result.skipped and len(result.quantized) == 6
    assert "skip_quant_node: the pattern '/layer9/*' matches no node name" in caplog.text


def test_skip_quant_op_type_weight_quant():
    result = convert(model(), parse_config(weight_config("skip_quant_op_type=Gemm")), verify=False)
    assert set(skipped_nodes(result)) == {"/head/fc"}
    assert {n for q in result.quantized for n in q.nodes} == set(CONVS)


def test_skip_quant_op_type_full_quant_computes_those_nodes_in_float():
    config = full_config(common="skip_quant_op_type=Conv")
    result = convert(model(), config, samples=samples((1, 3, 8, 8), count=4), progress=False, verify=False)
    graph = result.model.graph
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 5
    for conv in convs:  # float weights, and no DequantizeLinear in front of them
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in conv.input)
    assert {n for q in result.quantized for n in q.nodes} == {"/head/fc"}


def test_skip_quant_op_type_dynamic_quant():
    config = parse_config("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nskip_quant_op_type=Gemm\n")
    result = convert(model(), config, verify=False)
    assert not result.quantized and set(skipped_nodes(result)) >= {"/head/fc"}


def test_an_op_type_absent_from_the_model_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ptqlite"):
        result = convert(model(), parse_config(weight_config("skip_quant_op_type=MatMul")), verify=False)
    assert len(result.quantized) == 6
    assert "skip_quant_op_type: no node of this model is a MatMul" in caplog.text


def test_dict_config_takes_patterns_and_op_types_with_the_ini_messages():
    config = {"common_quant_param": {"quant_type": "WEIGHT_QUANT", "min_quant_weight_channel": 0,
                                     "skip_quant_node": ["/layer1/*"], "skip_quant_op_type": ["Gemm"]}}
    result = ptqlite.convert(model(), config, verify=False)
    assert set(skipped_nodes(result)) == {"/layer1/conv_a", "/layer1/conv_b", "/head/fc"}
    with pytest.raises(ConfigError) as bad:
        ptqlite.config_from_dict({"common_quant_param": {"quant_type": "WEIGHT_QUANT", "skip_quant_op_type": "gemm"}})
    assert str(bad.value) == ("config dict: [common_quant_param] skip_quant_op_type=gemm: expected ONNX op types "
                              "(exact case), e.g. Conv,Gemm; 'gemm' is not one (did you mean Gemm?)")

"""`ptqlite analyze`: ranks layers by their effect on output cosine and proposes a skip list that reaches a target."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import masked_attention_model
from onnx import TensorProto, helper, numpy_helper

from ptqlite import cli
from ptqlite.analyze import _shortest_prefix, _with_skip, analyze
from ptqlite.config import load_config
from ptqlite.convert import convert
from ptqlite.runtime import cosine_similarity, cpu_session, model_input_specs, synthetic_inputs

FRAGILE = "layer2"


def _chain(width: int = 32, layers: int = 4) -> onnx.ModelProto:
    """x -> (MatMul -> Tanh) x layers; layer2's weight has one huge outlier, so one scale per tensor leaves almost
    every other weight of that layer at zero."""
    rng = np.random.default_rng(7)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        w = rng.normal(0, 1 / np.sqrt(width), size=(width, width)).astype(np.float32)
        if f"layer{i}" == FRAGILE:
            w[0, 0] = 200.0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"layer{i}"),
                  helper.make_node("Tanh", [f"h{i}"], [f"a{i}"], name=f"tanh{i}")]
        current = f"a{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CONFIG = """[common_quant_param]
quant_type=WEIGHT_QUANT
bit_num=8
min_quant_weight_size=0
min_quant_weight_channel=0

[weight_quant_param]
per_channel=false
bias_correction=false
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analyze")
    model_path, config_path = folder / "chain.onnx", folder / "weight.cfg"
    onnx.save(_chain(), model_path)
    config_path.write_text(CONFIG)
    return model_path, config_path


def _output_cosine(model: onnx.ModelProto, quantized: onnx.ModelProto) -> float:
    (feeds,) = synthetic_inputs(model_input_specs(model))
    return cosine_similarity(cpu_session(model, "").run(None, feeds)[0], cpu_session(quantized, "").run(None, feeds)[0])


def test_fragile_layer_ranks_first_and_skip_reaches_target(setup):
    model_path, config_path = setup
    model, config = onnx.load(model_path), load_config(config_path)
    analysis = analyze(model, config, target=0.999, samples=1)
    assert analysis.base_cosine < 0.99  # the fragile layer really breaks the whole model
    assert analysis.all_skipped_cosine == pytest.approx(1.0)  # nothing quantized: the float model
    assert analysis.ranking[0].node == FRAGILE
    assert analysis.ranking[0].cos_only < 0.99  # alone it does the damage
    assert analysis.ranking[0].cos_without > 0.999  # and skipping it alone repairs it
    assert all(e.cos_only > 0.999 for e in analysis.ranking[1:])
    assert analysis.reached and analysis.skip == (FRAGILE,)
    # independent check: convert with the suggested line and measure again
    result = convert(model, _with_skip(config, analysis.skip))
    assert [s.tensor for s in result.skipped] == ["w2"]
    assert _output_cosine(model, result.model) >= 0.999
    assert any("synthetic" in n for n in analysis.notes)


def test_own_skip_list_is_kept(setup):
    model_path, config_path = setup
    model, config = onnx.load(model_path), load_config(config_path)
    analysis = analyze(model, _with_skip(config, ("layer0",)), target=0.999, samples=1, sweep="only")
    assert "layer0" not in [e.node for e in analysis.ranking]
    assert analysis.skip == ("layer0", FRAGILE)
    assert all(e.cos_without is None for e in analysis.ranking)


def test_cli_prints_ranking_and_skip_line(setup, capsys):
    model_path, config_path = setup
    code = cli.main(["analyze", "--fmk=ONNX", f"--modelFile={model_path}", f"--configFile={config_path}",
                     "--top", "2", "--samples", "1", "--targetCosine", "0.999"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[4].endswith(f"{FRAGILE} (MatMul)")  # rank 1 right after the header lines
    assert "skip_quant_node=layer2\n" in out
    ranked = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(ranked) == 2


def test_cli_rejects_bad_target(setup, capsys):
    model_path, config_path = setup
    code = cli.main(["analyze", "--fmk=ONNX", f"--modelFile={model_path}", f"--configFile={config_path}",
                     "--targetCosine", "1.5"])
    assert code == 2
    assert "--targetCosine=1.5" in capsys.readouterr().err


def test_unnamed_nodes_are_named_after_their_first_output(setup, tmp_path, capsys):
    model_path, config_path = setup
    model = onnx.load(model_path)
    for node in model.graph.node:
        node.name = ""
    unnamed = tmp_path / "unnamed.onnx"
    onnx.save(model, unnamed)
    named = tmp_path / "named.onnx"
    code = cli.main(["analyze", "--fmk=ONNX", f"--modelFile={unnamed}", f"--configFile={config_path}",
                     "--samples", "1", f"--namedModelFile={named}"])
    out = capsys.readouterr().out
    assert code == 0 and "skip_quant_node=h2\n" in out and "8 nodes had no name" in out
    named_model = onnx.load(named)
    assert [n.name for n in named_model.graph.node][:2] == ["h0", "a0"]
    result = convert(named_model, _with_skip(load_config(config_path), ("h2",)))
    assert [s.tensor for s in result.skipped] == ["w2"]


@pytest.mark.parametrize("needed", [0, 1, 2, 5, 7, 8, 13])
def test_shortest_prefix_finds_the_smallest_count(needed):
    calls = []

    def cosine_of(k):
        calls.append(k)
        return 0.9999 if k >= needed else 0.9

    count, cos = _shortest_prefix(cosine_of, 12, 0.999)
    if needed <= 12:
        assert (count, cos) == (needed, 0.9999)
    else:
        assert (count, cos) == (12, 0.9)
    assert len(set(calls)) <= 2 * 4 + 2  # galloping then bisecting, not one conversion per layer


def test_full_quant_op_type_sweep_finds_an_int8_softmax(tmp_path):
    """DSP keeps Softmax int8; with an additive mask of -1000 (above the -1e4 that marks a mask for the pass) its
    input range is mostly mask, which no layer skip fixes. The op-type sweep ranks Softmax (or the mask Add
    feeding it) first and the skip line uses it."""
    model = masked_attention_model(big=-1000.0)
    rng = np.random.default_rng(5)
    for name in ("x", "mask"):
        (tmp_path / name).mkdir()
    for i in range(4):
        mask = np.ones((1, 1, 8), np.float32)
        mask[..., 4 + i:] = 0
        rng.normal(0, 1, (1, 8, 16)).astype(np.float32).tofile(tmp_path / "x" / f"{i}.bin")
        mask.tofile(tmp_path / "mask" / f"{i}.bin")
    config_path = tmp_path / "full.cfg"
    config_path.write_text(f"""[common_quant_param]
quant_type=FULL_QUANT
bit_num=8
[data_preprocess_param]
calibrate_path=x:{tmp_path / 'x'},mask:{tmp_path / 'mask'}
calibrate_size=4
input_type=BIN
[full_quant_param]
target_device=DSP
""")
    config = load_config(config_path)
    analysis = analyze(model, config, target=0.97, samples=4)
    assert analysis.base_cosine < 0.9
    best = analysis.op_types[0]
    assert best.op_type in ("Softmax", "Add") and best.cosine > 0.97
    assert {e.op_type for e in analysis.op_types} >= {"Softmax", "Add", "Mul"}
    assert analysis.reached and set(best.nodes) <= set(analysis.skip)
    assert analysis.skip_cosine >= 0.97


def test_target_already_met_prints_no_empty_skip_line(setup, capsys, caplog):
    model_path, config_path = setup
    with caplog.at_level("DEBUG", logger="ptqlite"):
        code = cli.main(["analyze", "--fmk=ONNX", f"--modelFile={model_path}", f"--configFile={config_path}",
                         "--samples", "1", "--targetCosine", "0.5", "--sweep", "only", "-vv"])
    captured = capsys.readouterr()
    assert code == 0
    assert "skip_quant_node=" not in captured.out
    assert "already reaches 0.5 with every layer quantized: nothing to skip" in captured.out
    # off a terminal no progress lines on stderr; with -vv one log line per conversion, with a bar and an ETA
    assert "analyze: [" not in captured.err
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("analyze: [")]
    assert len(progress) >= 5 and all("ETA" in line and "conversions" in line for line in progress)


def test_progress_line_on_a_terminal(setup, capsys, monkeypatch):
    import sys

    model_path, config_path = setup
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main(["analyze", "--fmk=ONNX", f"--modelFile={model_path}", f"--configFile={config_path}",
                     "--samples", "1", "--targetCosine", "0.5", "--sweep", "only"]) == 0
    err = capsys.readouterr().err
    redrawn = [part for part in err.split("\r") if part.startswith("analyze: [")]
    assert len(redrawn) >= 5 and all("ETA" in part and "conversions" in part for part in redrawn)


def test_full_quant_variants_measure_statistics_once(monkeypatch):
    """Inside analyze the calibration statistics and layer corrections of one model are measured once."""
    from helpers import conv_model, full_config, samples

    from ptqlite.passes.full import statistics

    passes = []
    measure = statistics._measure
    monkeypatch.setattr(statistics, "_measure", lambda *a, **k: passes.append(a[3:]) or measure(*a, **k))
    model = conv_model()
    feeds = samples((1, 3, 16, 16), count=2)
    config = full_config(bias_correction=True)
    config = _with_skip(config, ())
    with statistics.reuse():
        first = [convert(model, _with_skip(config, skip), samples=feeds).model for skip in ((), ("conv2",), ())]
    calls = len(passes)
    passes.clear()
    plain = [convert(model, _with_skip(config, skip), samples=feeds).model for skip in ((), ("conv2",), ())]
    assert len(passes) > calls  # without reuse() every conversion measures again
    assert [m.SerializeToString() for m in first] == [m.SerializeToString() for m in plain]  # same models


def test_variants_planning_other_tensors_need_no_new_pass(monkeypatch):
    """The pass that measures ranges measures every float activation's: an "only this layer" variant, which plans
    tensors the full conversion did not (a Conv's own output when the Relu after it stays float), finds its
    ranges kept instead of paying another pass over the samples."""
    from helpers import conv_model, full_config, samples

    from ptqlite.passes.full import statistics

    passes = []
    measure = statistics._measure
    monkeypatch.setattr(statistics, "_measure", lambda *a, **k: passes.append(a[3:]) or measure(*a, **k))
    model, feeds = conv_model(), samples((1, 3, 16, 16), count=2)
    config = _with_skip(full_config(), ())
    with statistics.reuse():
        convert(model, config, samples=feeds)
        first = len(passes)
        only = [convert(model, _with_skip(config, [n for n in ("conv1", "conv2", "fc") if n != keep]),
                        samples=feeds).model for keep in ("conv1", "conv2")]
    assert first >= 1 and len(passes) == first
    plain = [convert(model, _with_skip(config, [n for n in ("conv1", "conv2", "fc") if n != keep]),
                     samples=feeds).model for keep in ("conv1", "conv2")]
    assert [m.SerializeToString() for m in only] == [m.SerializeToString() for m in plain]

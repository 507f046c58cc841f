"""DYNAMIC_QUANT latency-aware planning: where the int8 model times slower than float, the MatMul/Gemm layers
whose int8 form costs most by the cost model (latency.int8_net_cost) go back to float until it does not. The timings are patched here (conftest fixes
them for every other test); the inputs it times on are checked as built."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from helpers import cosine, run
from onnx import TensorProto as T
from onnx import helper
from onnx import numpy_helper as nh

from ptqlite import cli, latency
from ptqlite.config import parse_config
from ptqlite.convert import convert
from ptqlite.errors import ConfigError, DataError
from ptqlite.passes import dynamic

CONFIG = ("[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\nmin_quant_weight_size=0\n"
          "min_quant_weight_channel=0\n[dynamic_quant_param]\nquant_strategy={}\n")
# MatMul weights 16x8, 8x32, 32x64 and 64x16 on 128 rows: every one loses in int8 by the cost model, mm3 most
# (its input, 64 wide, is the largest to quantize), then mm2, mm1, mm0.
WIDTHS = (16, 8, 32, 64, 16)
ORDER = ["mm3", "mm2", "mm1", "mm0"]


def matmul_chain(shape=("batch", "seq", 16)) -> onnx.ModelProto:
    r = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(itertools.pairwise(WIDTHS)):
        inits.append(nh.from_array((r.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", T.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(prev, T.FLOAT, [*shape[:-1], WIDTHS[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _timings(monkeypatch, ratios):
    """Patched timing: the n-th measurement returns ratios[n] (the last one repeated); returns the calls."""
    calls = []

    def measure(float_model, quantized, feeds, own_shapes=None, clear_of=None):
        calls.append((quantized, feeds))
        return latency.Timing(1.0, ratios[min(len(calls), len(ratios)) - 1])

    monkeypatch.setattr(latency, "measure", measure)
    return calls


def _convert(strategy="ALWC", extra="", **options):
    return convert(matmul_chain(), parse_config(CONFIG.format(strategy) + extra), progress=False, **options)


def _integer_weights(model: onnx.ModelProto) -> set[str]:
    return {n.input[1].removesuffix("_quantized") for n in model.graph.node if n.op_type == "MatMulInteger"}


@pytest.mark.parametrize("strategy", ["ALWC", "ACWL"])
def test_costliest_layers_go_back_to_float_until_no_slower(monkeypatch, strategy):
    model = matmul_chain()
    layers = [(f"mm{i}", f"W{i}") for i in range(4)]
    costs = dynamic.layer_costs(model, layers, latency.timing_feeds(model), strategy)
    assert sorted(costs, key=lambda n: -costs[n]) == ORDER and all(c > 0 for c in costs.values())
    calls = _timings(monkeypatch, [1.3, 1.1, 0.9])  # all int8, 1 layer float, 2 layers float
    result = _convert(strategy)
    assert len(calls) == 3
    reasons = {t.tensor: t.reason for t in result.skipped}
    assert set(reasons) == {"W3", "W2"} and all(r.startswith("kept float by latency-aware") for r in reasons.values())
    assert {t.tensor for t in result.quantized} == {"W0", "W1"}
    assert _integer_weights(result.model) == {"W0", "W1"}
    assert {n.input[1] for n in result.model.graph.node if n.op_type == "MatMul"} == {"W2", "W3"}
    assert any("1.30x float" in note and "2 of 4 MatMul/Gemm layers kept float" in note and "now 0.90x" in note
               for note in result.notes)
    x = np.random.default_rng(1).normal(size=(1, 128, 16)).astype(np.float32)
    assert cosine(run(matmul_chain(), {"x": x})[0], run(result.model, {"x": x})[0]) > 0.99


def test_int8_that_is_faster_is_kept_and_the_shapes_are_said(monkeypatch):
    calls = _timings(monkeypatch, [0.6])
    result = _convert()
    assert len(calls) == 1 and len(result.quantized) == 4
    # no sample: batch 1, the dynamic sequence at latency.DYNAMIC_DIM, static dims as the model has them
    assert calls[0][1]["x"].shape == (1, latency.DYNAMIC_DIM, 16)
    assert any(note == "latency-aware planning: int8 runs 0.60x float on this machine (1 thread, x 1x128x16)"
               for note in result.notes)


def test_input_shape_fixes_the_timed_shapes(monkeypatch):
    calls = _timings(monkeypatch, [0.6])
    convert(matmul_chain(), parse_config(CONFIG.format("ALWC")), input_shapes={"x": [2, 7, 16]}, progress=False)
    assert calls[0][1]["x"].shape == (2, 7, 16)


def test_a_given_sample_is_timed(monkeypatch):
    calls = _timings(monkeypatch, [0.6])
    samples = [{"x": np.full((1, 5, 16), 0.5, np.float32)}]
    result = _convert(samples=samples)
    assert np.array_equal(calls[0][1]["x"], samples[0]["x"])
    assert any("(1 thread, first calibration sample)" in note for note in result.notes)


def test_when_no_candidate_is_as_fast_as_float_the_float_graph_wins_untimed(monkeypatch):
    """Before, the fastest timed candidate won (1.05x here) and the all-float one, timed like the others, could
    measure slower than that on noise (magika ACWL): the float graph is float's speed by definition."""
    calls = _timings(monkeypatch, [1.3, 1.2, 1.05, 1.1])
    result = _convert()
    assert len(calls) == 4  # every layer int8, then 1, 2 and 3 layers float; the 4th candidate is float itself
    assert not result.quantized and not _integer_weights(result.model)
    assert any("4 of 4 MatMul/Gemm layers kept float" in note and "the float graph" in note for note in result.notes)


def two_layers(small_n: int = 8) -> onnx.ModelProto:
    """x [1, 256, 256] read by a 256x1024 MatMul ("big": int8 gains by the cost model) and, unless small_n is 0,
    a 256 x small_n one ("small": int8 loses, its input costs more to quantize than its few columns save)."""
    r = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "B"], ["b"], name="big")]
    inits = [nh.from_array((r.normal(size=(256, 1024)) / 16).astype(np.float32), "B")]
    outputs = [helper.make_tensor_value_info("b", T.FLOAT, [1, 256, 1024])]
    if small_n:
        nodes.append(helper.make_node("MatMul", ["x", "S"], ["s"], name="small"))
        inits.append(nh.from_array((r.normal(size=(256, small_n)) / 16).astype(np.float32), "S"))
        outputs.append(helper.make_tensor_value_info("s", T.FLOAT, [1, 256, small_n]))
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", T.FLOAT, [1, 256, 256])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("strategy", ["ALWC", "ACWL"])
def test_within_the_noise_margin_int8_is_kept_where_the_cost_model_sees_no_loss(monkeypatch, strategy):
    model = two_layers(small_n=0)
    assert dynamic.layer_costs(model, [("big", "B")], latency.timing_feeds(model), strategy)["big"] < 0
    calls = _timings(monkeypatch, [1.04])  # measured twice (within the margin), 1.04x both times
    result = convert(model, parse_config(CONFIG.format(strategy)), progress=False)
    assert len(calls) == 2 and [t.tensor for t in result.quantized] == ["B"]


@pytest.mark.parametrize(("strategy", "ratios", "kept"), [
    ("ACWL", [1.04, 1.04, 0.98], {"B"}),  # 1.04x measured twice, then the loser in float: 0.98x, taken
    ("ALWC", [1.04, 1.04, 1.03], {"B"}),  # no slower than every layer int8 (1.04x): taken
    ("ACWL", [1.04, 1.04, 1.06], {"B", "S"}),  # slower than both: every layer stays int8
    ("ACWL", [0.97, 0.99], {"B"}),  # 0.97x is within the noise band too: the cost model decides, 0.99x checks
    ("ACWL", [0.97, 1.02], {"B", "S"}),  # ... and a candidate slower than float is not taken
])
def test_within_the_noise_band_the_layers_the_cost_model_says_lose_go_back_to_float(monkeypatch, strategy, ratios,
                                                                                    kept):
    """magika ACWL: 0.98-1.05x in conversions (kept int8), 1.06-1.08x in the benchmark; its Dense_0 loses."""
    model = two_layers()
    costs = dynamic.layer_costs(model, [("big", "B"), ("small", "S")], latency.timing_feeds(model), strategy)
    assert costs["big"] < 0 < costs["small"]
    calls = _timings(monkeypatch, ratios)
    result = convert(model, parse_config(CONFIG.format(strategy)), progress=False)
    assert len(calls) == len(ratios) and {t.tensor for t in result.quantized} == kept
    if kept == {"B"}:
        assert any("1 of 2 MatMul/Gemm layers kept float" in note and f"now {ratios[-1]:.2f}x" in note
                   for note in result.notes)


@pytest.mark.parametrize("strategy", ["ALWC", "ACWL"])
def test_within_the_noise_band_a_loss_too_small_to_notice_keeps_int8(monkeypatch, strategy):
    """ppocr_rec ACWL: nine layers estimated to lose 0.09 ms in all on a 34 ms model, timed 0.99x: before, the
    noise-band rule made the output the float graph, giving up its int8 file for nothing measurable."""
    model = two_layers()
    costs = dynamic.layer_costs(model, [("big", "B"), ("small", "S")], latency.timing_feeds(model), strategy)
    float_ms = costs["small"] / 1e6 / latency.NOTICEABLE_SHARE * 1.01  # the loss just under the share
    calls = []

    def measure(float_model, quantized, feeds, own_shapes=None, clear_of=None):
        calls.append(quantized)
        return latency.Timing(float_ms, 0.99 * float_ms)

    monkeypatch.setattr(latency, "measure", measure)
    result = convert(model, parse_config(CONFIG.format(strategy)), progress=False)
    assert len(calls) == 1 and {t.tensor for t in result.quantized} == {"B", "S"}
    assert any("int8 runs 0.99x float" in note for note in result.notes)


def test_outside_the_noise_band_faster_int8_is_never_changed(monkeypatch):
    calls = _timings(monkeypatch, [0.9])
    result = convert(two_layers(), parse_config(CONFIG.format("ACWL")), progress=False)
    assert len(calls) == 1 and {t.tensor for t in result.quantized} == {"B", "S"}


def test_a_ratio_within_the_margin_is_measured_again(monkeypatch):
    calls = _timings(monkeypatch, [1.04, 1.10, 0.9])  # the two pooled: 1.07x, slower; one layer float: 0.9x
    result = _convert("ACWL")
    assert len(calls) == 3 and {t.tensor for t in result.quantized} == {"W0", "W1", "W2"}
    assert any("int8 ran 1.07x float" in note for note in result.notes)


@pytest.mark.parametrize("factors", [(1.1, 0.95, 1.2, 0.9), (1.3, 1.3, 1.3, 1.3), (0.7, 0.7, 0.7, 1.6),
                                     (1.02, 1.02, 1.02, 1.02), (1.5, 0.6, 0.6, 0.6), (0.9, 1.01, 1.2, 1.0)])
def test_the_planned_model_is_never_slower_than_float_as_timed(monkeypatch, factors):
    """A timer where each int8 layer multiplies the model's time by its factor: whatever the factors, the model
    the planning keeps times at most the noise margin over float, and at most float itself where every layer
    int8 timed beyond it."""
    factor = {f"W{i}_quantized": f for i, f in enumerate(factors)}

    def ratio(model):
        return float(np.prod([factor.get(n.input[1], 1.0) for n in model.graph.node if n.op_type == "MatMulInteger"]))

    monkeypatch.setattr(latency, "measure", lambda f, q, feeds, own=None, **_: latency.Timing(1.0, ratio(q)))
    for strategy in ("ALWC", "ACWL"):
        result = _convert(strategy)
        all_int8 = float(np.prod(factors))
        assert ratio(result.model) <= (1.0 if all_int8 > latency.SLOWER else latency.SLOWER)
        assert ratio(result.model) <= max(1.0, all_int8)


def test_settled_pools_only_within_the_margin():
    again = [latency.Timing(1.0, 1.10)]
    assert latency.settled(latency.Timing(1.0, 0.9), lambda: pytest.fail("measured again")).ratio == 0.9
    assert latency.settled(latency.Timing(1.0, 1.2), lambda: pytest.fail("measured again")).ratio == 1.2
    assert latency.settled(latency.Timing(1.0, 1.04), lambda: again.pop()).ratio == pytest.approx(1.07)


def test_all_layers_float_is_said_as_such(monkeypatch):
    _timings(monkeypatch, [1.6, 1.5, 1.4, 1.3, 1.0])
    result = _convert()
    assert not result.quantized and not _integer_weights(result.model)
    assert any(w.startswith("DYNAMIC_QUANT kept all 4 MatMul/Gemm weights float: their int8 form ran no faster")
               for w in result.warnings)


def test_off_means_never_timed_and_the_same_output(monkeypatch):
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("timed although latency_aware=false"))
    off = _convert(extra="latency_aware=false\n")
    assert len(off.quantized) == 4 and not any("latency" in note for note in off.notes)
    monkeypatch.setattr(latency, "measure", lambda *a, **k: latency.Timing(1.0, 0.5))
    on = _convert()
    assert on.model.SerializeToString(deterministic=True) == off.model.SerializeToString(deterministic=True)


def test_latency_aware_is_a_boolean():
    with pytest.raises(ConfigError, match="latency_aware"):
        parse_config(CONFIG.format("ALWC") + "latency_aware=sometimes\n")
    assert parse_config(CONFIG.format("ALWC")).dynamic.latency_aware is True


def test_a_model_that_cannot_be_timed_keeps_every_layer_int8(monkeypatch):
    def refuse(*args, **kwargs):
        raise DataError("the model cannot run on the given inputs (sr must be 8000 or 16000)")

    monkeypatch.setattr(latency, "measure", refuse)
    result = _convert()
    assert len(result.quantized) == 4
    assert any(note.startswith("latency-aware planning skipped: the model cannot run") for note in result.notes)


def test_a_streaming_conversion_is_not_timed(tmp_path, monkeypatch, capsys):
    from onnx.external_data_helper import convert_model_to_external_data

    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("a streaming conversion was timed"))
    model = matmul_chain()
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="model.onnx.data",
                                   size_threshold=0)
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    config = tmp_path / "c.cfg"
    config.write_text(CONFIG.format("ALWC"))
    code = cli.main(["--fmk=ONNX", f"--modelFile={tmp_path / 'model.onnx'}", f"--configFile={config}",
                     f"--outputFile={tmp_path / 'out'}", "-v"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "latency-aware planning skipped: a streaming conversion" in captured.out + captured.err


@pytest.mark.parametrize(("strategy", "columns"), [("ACWL", 64), ("ALWC", 16)])
def test_many_rows_and_few_columns_rank_before_one_row(strategy, columns):
    """magika: Dense_0 [257, 64] on 2048 rows, Dense_1 [512, 214] on one row. Smallest first (by multiply-adds)
    put Dense_1 back to float first, which gains nothing; the cost model ranks Dense_0 first, whose int8 form
    quantizes 2048 x 257 input elements at run time for only 64 columns. The rows come from shape inference at
    the timed shapes (the dynamic sequence at 2048 here); Gemm's transB weight is [N, K]. ALWC's one fused
    quantizer is cheaper: 64 columns repay it (magika ALWC ran 0.98x float), 16 do not."""
    r = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "A"], ["a"], name="rows2048"),
             helper.make_node("Gemm", ["y", "B"], ["b"], name="row1", transB=1)]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", T.FLOAT, [1, "seq", 257]),
                                             helper.make_tensor_value_info("y", T.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info("a", T.FLOAT, None),
                               helper.make_tensor_value_info("b", T.FLOAT, None)],
                              [nh.from_array(r.normal(size=(257, columns)).astype(np.float32), "A"),
                               nh.from_array(r.normal(size=(214, 512)).astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.zeros((1, 2048, 257), np.float32), "y": np.zeros((1, 512), np.float32)}
    costs = dynamic.layer_costs(model, [("row1", "B"), ("rows2048", "A")], feeds, strategy)
    assert costs["rows2048"] == pytest.approx(latency.int8_net_cost(strategy, 2048, 257, columns))
    assert costs["row1"] == pytest.approx(latency.int8_net_cost(strategy, 1, 512, 214))
    assert costs["rows2048"] > costs["row1"]
    assert 2048 * 257 * columns > 512 * 214  # more multiply-adds: smallest first ranked it last


def test_the_cost_model_follows_its_terms():
    """Quantizing the input costs per element (rows x K), int8 saves per multiply-add (rows x K x N): a wide
    layer gains, the same layer with few columns loses, and ACWL's per-row quantization costs more than ALWC's."""
    for strategy in ("ALWC", "ACWL"):
        assert latency.int8_net_cost(strategy, 256, 512, 1024) < 0 < latency.int8_net_cost(strategy, 2048, 256, 8)
        assert latency.int8_net_cost(strategy, 2048, 257, 64) > latency.int8_net_cost(strategy, 2048, 257, 128)
    assert latency.int8_net_cost("ACWL", 2048, 257, 64) > 0 and latency.int8_net_cost("ALWC", 128, 384, 384) < 0
    assert latency.int8_net_cost("ACWL", 128, 384, 1536) < 0


def test_timing_inputs_without_a_sample():
    inputs = [helper.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("token_type_ids", T.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("wave", T.FLOAT, ["samples"]),
              helper.make_tensor_value_info("image", T.FLOAT, ["n", 3, 32, 32])]
    graph = helper.make_graph([], "inputs", inputs, [])
    feeds = latency.timing_feeds(helper.make_model(graph))
    assert {k: v.shape for k, v in feeds.items()} == {"input_ids": (1, 128), "attention_mask": (1, 128),
                                                     "token_type_ids": (1, 128), "wave": (128,),
                                                     "image": (1, 3, 32, 32)}
    ids = feeds["input_ids"]
    assert ids.dtype == np.int64 and ids.min() >= 1 and ids.max() < 1000 and len(np.unique(ids)) > 10
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()


def test_embedding_tables_of_full_quant_are_not_timed_by_the_dynamic_pass(monkeypatch):
    """FULL_QUANT runs the dynamic pass for Gather tables only: nothing there to time."""
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("Gather-only rewrite timed"))
    table = nh.from_array(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="g")], "emb",
                              [helper.make_tensor_value_info("ids", T.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = dynamic.run(model, parse_config(CONFIG.format("ALWC")), ops=("Gather",))
    assert [t.tensor for t in result.quantized] == ["table"]


def test_a_model_without_int8_matmuls_is_not_timed(monkeypatch):
    """A CNN has no MatMul/Gemm for DYNAMIC_QUANT: timing its unchanged graph only cost conversion time."""
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("nothing to decide, yet timed"))
    config = parse_config(CONFIG.format("ALWC").replace("bit_num=8\n", "bit_num=8\nskip_quant_node=mm0,mm1,mm2,mm3\n"))
    result = convert(matmul_chain(), config, progress=False)
    assert not result.quantized and not any("latency" in note for note in result.notes)


def test_rows_after_a_reshape_to_a_computed_shape():
    """MiniLM merges its attention heads with a Reshape to a shape built from Shape/Gather/Concat before each
    output projection: the rows there come from shape inference with data propagation (without it the layer
    counted one row, and the cost model called ACWL's projections losses)."""
    ints = lambda name, values: nh.from_array(np.array(values, np.int64), name)
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "i01"], ["lead"], axis=0),
             helper.make_node("Concat", ["lead", "minus1"], ["merged"], axis=0),
             helper.make_node("Reshape", ["x", "merged"], ["heads"]),
             helper.make_node("MatMul", ["heads", "W"], ["y"], name="out_proj")]
    w = nh.from_array(np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32), "W")
    graph = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", T.FLOAT, [1, "seq", 4, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)],
                              [ints("i01", [0, 1]), ints("minus1", [-1]), w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    costs = dynamic.layer_costs(model, [("out_proj", "W")], latency.timing_feeds(model), "ACWL")
    assert costs["out_proj"] == pytest.approx(latency.int8_net_cost("ACWL", latency.DYNAMIC_DIM, 32, 16))

"""DYNAMIC_QUANT (ALWC, ACWL) on small transformer-like graphs, against float and exact simulations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ptqlite.config import parse_config
from ptqlite.convert import convert

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "models" / "resnet20_cifar10.onnx"
STRATEGIES = ("ALWC", "ACWL")
D, FF, VOCAB = 32, 64, 50
# Tolerance of the quantized model against float: relative L2 error of the output. int8 on both operands
# gives about 1% per matrix product; the attention block chains four of them.
REL_TOL = 0.05


def config(strategy: str = "ALWC", extra: str = ""):
    return parse_config(
        f"[common_quant_param]\nquant_type=DYNAMIC_QUANT\nbit_num=8\n{extra}\n"
        f"[dynamic_quant_param]\nquant_strategy={strategy}\n",
        "test.cfg",
    )


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def transformer_block(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """Embedding Gather, Q/K/V projections, a two-activation attention MatMul, softmax, output Gemm-free
    projection with bias, and a feed-forward pair (MatMul + bias, Relu, MatMul)."""
    rng = np.random.default_rng(seed)
    w = {
        n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
        for n, s in [
            ("Wq", (D, D)),
            ("Wk", (D, D)),
            ("Wv", (D, D)),
            ("Wo", (D, D)),
            ("W1", (D, FF)),
            ("W2", (FF, D)),
        ]
    }
    inits = [_init(k, v) for k, v in w.items()]
    inits += [
        _init("table", rng.standard_normal((VOCAB, D)).astype(np.float32)),
        _init("bo", rng.standard_normal(D).astype(np.float32) * 0.1),
        _init("b1", rng.standard_normal(FF).astype(np.float32) * 0.1),
        _init("inv_sqrt_d", np.array(1 / np.sqrt(D), np.float32)),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["table", "ids"], ["x"], name="embed"),
        n("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
        n("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
        n("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
        n("MatMul", ["q", "kt"], ["scores_raw"], name="scores"),
        n("Mul", ["scores_raw", "inv_sqrt_d"], ["scores_scaled"], name="scale"),
        n("Softmax", ["scores_scaled"], ["probs"], axis=-1, name="softmax"),
        n("MatMul", ["probs", "v"], ["context"], name="context"),
        n("MatMul", ["context", "Wo"], ["attn_raw"], name="o_proj"),
        n("Add", ["attn_raw", "bo"], ["attn"], name="o_bias"),
        n("Add", ["attn", "x"], ["h"], name="residual"),
        n("MatMul", ["h", "W1"], ["ff_raw"], name="ff1"),
        n("Add", ["ff_raw", "b1"], ["ff_bias"], name="ff1_bias"),
        n("Relu", ["ff_bias"], ["ff_act"], name="relu"),
        n("MatMul", ["ff_act", "W2"], ["y"], name="ff2"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def gemm_model(trans_b: int, alpha: float = 1.0, beta: float = 1.0, seed: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    k, n_out = 24, 16
    weight = rng.standard_normal((n_out, k) if trans_b else (k, n_out)).astype(np.float32)
    inits = [_init("W", weight), _init("C", rng.standard_normal(n_out).astype(np.float32))]
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n_out])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def matmul_model(weight: np.ndarray, rank: int = 3) -> onnx.ModelProto:
    dims = ["B", "S", weight.shape[0]][-rank:]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("W", weight)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_model(model: onnx.ModelProto, feed: dict, optimize: bool = True, optimized_path: Path | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------- the transformer-like block


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 7), (3, 5), (2, 33)])
def test_block_matches_float(strategy, batch, seq):
    model = transformer_block()
    quantized = convert(model, config(strategy)).model
    ids = np.random.default_rng(batch * 100 + seq).integers(0, VOCAB, (batch, seq)).astype(np.int64)
    ref = run_model(model, {"ids": ids})
    y = run_model(quantized, {"ids": ids})
    assert y.shape == ref.shape == (batch, seq, D)
    assert rel_error(y, ref) < REL_TOL
    # Each row (token) is computed independently of the batch layout, apart from the per-tensor activation
    # range of ALWC: rows of one batch element must agree with the same sequence run alone (ACWL exactly).
    alone = run_model(quantized, {"ids": ids[:1]})
    if strategy == "ACWL":
        np.testing.assert_allclose(alone[0], y[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_block_structure(strategy):
    result = convert(transformer_block(), config(strategy))
    quantized = result.model
    onnx.checker.check_model(quantized, full_check=True)
    kinds = ops(quantized)
    # six constant-weight MatMuls become integer; the two activation x activation MatMuls stay float
    assert kinds.count("MatMulInteger") == 6
    float_matmuls = [n for n in quantized.graph.node if n.op_type == "MatMul"]
    assert sorted(n.name for n in float_matmuls) == ["context", "scores"]
    assert kinds.count("DynamicQuantizeLinear") == (6 if strategy == "ALWC" else 0)
    inits = {t.name: t for t in quantized.graph.initializer}
    for name in ("Wq", "Wk", "Wv", "Wo", "W1", "W2", "table"):
        assert name not in inits, f"float {name} should be gone"
    dtypes = {t.name: t.data_type for t in quantized.graph.initializer}
    assert dtypes["table_quantized"] == TensorProto.INT8
    # int8 weights whose neighbouring K pairs fit int16 (ALWC: widened per-column scales; ACWL: trimmed pairs)
    assert dtypes["Wq_quantized"] == TensorProto.INT8
    # ACWL: row codes by one Round per MatMul (each has its own equalizer), no QuantizeLinear: OpenVINO cannot run a
    # per-axis QuantizeLinear whose scale is computed at run time (test_portability.py); none for ALWC
    assert kinds.count("Round") == (6 if strategy == "ACWL" else 0)
    assert kinds.count("QuantizeLinear") == 0
    assert {q.tensor for q in result.quantized} == {"Wq", "Wk", "Wv", "Wo", "W1", "W2", "table"}
    assert not result.skipped
    float_bytes = sum(t.ByteSize() for t in transformer_block().graph.initializer)
    assert sum(t.ByteSize() for t in quantized.graph.initializer) < 0.4 * float_bytes


def test_alwc_fuses_into_integer_kernels(tmp_path):
    """ONNX Runtime must turn the ALWC pattern into its fused dynamic-quantization kernels."""
    quantized = convert(transformer_block(), config("ALWC")).model
    ids = np.zeros((1, 4), np.int64)
    run_model(quantized, {"ids": ids}, optimized_path=tmp_path / "opt.onnx")
    optimized = ops(onnx.load(str(tmp_path / "opt.onnx")))
    fused = optimized.count("DynamicQuantizeMatMul") + optimized.count("MatMulIntegerToFloat")
    assert fused == 6
    assert "MatMulInteger" not in optimized


def test_acwl_fuses_into_integer_kernels(tmp_path):
    """ACWL's product, cast and per-row scale become MatMulIntegerToFloat; its bias Adds stay outside."""
    quantized = convert(transformer_block(), config("ACWL")).model
    run_model(quantized, {"ids": np.zeros((1, 4), np.int64)}, optimized_path=tmp_path / "opt.onnx")
    optimized = onnx.load(str(tmp_path / "opt.onnx"))
    fused = [n for n in optimized.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 6 and "MatMulInteger" not in ops(optimized)
    assert all(len(n.input) <= 6 for n in fused), "a bias joined the fused kernel, which would scale it per row"


def test_acwl_bias_is_not_scaled_per_row():
    """A bias Add after an ACWL product must stay outside ONNX Runtime's MatMulIntegerToFloat fusion, which
    would scale the bias by the per-row activation scale."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    bias = (rng.standard_normal(8) * 5).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["t"], name="mm"),
            helper.make_node("Add", ["t", "b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("W", weight), _init("b", bias)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantized = convert(model, config("ACWL")).model
    # rows of very different magnitude: a per-row scale of 0.001 vs 1000
    x = rng.standard_normal((2, 4, 16)).astype(np.float32) * np.array([1e-3, 1, 10, 1e3], np.float32)[:, None]
    ref = x @ weight + bias
    y = run_model(quantized, {"x": x})
    row_error = np.abs(y - ref).max(-1) / np.abs(ref).max(-1)
    assert row_error.max() < 0.03


# ---------------------------------------------------------------- exact simulations of the integer arithmetic


def pair_safe_scale(w: np.ndarray) -> np.ndarray:
    """Per column of w [K, N]: max|w| / 127, widened so same-sign codes at K positions 2i, 2i+1 sum to at
    most 128 (any two codes of the column when K is odd)."""
    k = w.shape[0]
    if k % 2 == 0:
        pair = np.abs(w[0::2] + w[1::2]).max(axis=0)
    else:
        top = np.sort(np.maximum(w, 0), axis=0)[-2:].sum(axis=0)
        bottom = np.sort(np.maximum(-w, 0), axis=0)[-2:].sum(axis=0)
        pair = np.maximum(top, bottom)
    return np.maximum(np.abs(w).max(axis=0), pair.astype(np.float64)) / 127


def simulate_alwc(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear (uint8, per tensor) x per-column symmetric int8 weight (pair-safe scale), exact
    integer products in float64."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zero = np.clip(np.round(-lo / np.float32(scale)), 0, 255)
    xq = np.clip(np.round(x / np.float32(scale)) + zero, 0, 255) - zero
    w_scale = pair_safe_scale(w.astype(np.float64))
    wq = np.clip(np.sign(w) * np.floor(np.abs(w / w_scale) + 0.5), -127, 127)
    return (xq.astype(np.float64) @ wq) * (scale * w_scale)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(2, 40),
    st.integers(1, 24),
    st.integers(0, 2**32 - 1),
    st.floats(0.01, 100.0),
)
def test_alwc_equals_integer_simulation(batch, seq, k, n, seed, magnitude):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = (rng.standard_normal((batch, seq, k)) * magnitude + rng.uniform(-1, 1) * magnitude).astype(np.float32)
    y = run_model(convert(matmul_model(w), config("ALWC")).model, {"x": x})
    expected = simulate_alwc(x, w)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 9), st.integers(2, 40), st.integers(1, 24), st.integers(0, 2**32 - 1)
)
def test_acwl_close_to_float_for_every_row(batch, seq, k, n, seed):
    """Per-row activation scales: every row keeps its own precision, whatever the other rows hold."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    row_scale = 10.0 ** rng.uniform(-3, 3, (batch, seq, 1))
    x = (rng.standard_normal((batch, seq, k)) * row_scale).astype(np.float32)
    quantized = convert(matmul_model(w), config("ACWL")).model
    y = run_model(quantized, {"x": x})
    ref = x.astype(np.float64) @ w
    # int8 on both operands: error per row within a few percent of the row's largest |x| * sum |w|, plus what
    # the stored weight misses, |x| @ |codes * step * d - w|. That is half the per-tensor step times the
    # equalizer where nothing is trimmed, and more where a pair was trimmed to stay within int16 (with K = 2
    # the pair-safe step can be coarser than max |w| / 127).
    stored = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in quantized.graph.initializer}
    codes = next(v for n, v in stored.items() if n.endswith("_quantized")).reshape(k, n)
    d = next(v for n, v in stored.items() if n.endswith("_equalizer")).reshape(k, 1)
    step = next(v for n, v in stored.items() if n.endswith("_w_scale")).item()
    weight_miss = np.abs(x).astype(np.float64) @ np.abs(codes * step * d - w)
    bound = np.abs(x).max(-1, keepdims=True) * 0.03 * np.abs(w).sum(0) + weight_miss
    assert np.all(np.abs(y - ref) <= bound * 1.001 + 1e-6)


@pytest.mark.parametrize("k", [64, 63])
def test_acwl_no_int16_saturation(k):
    """ACWL on activations and weights that reach the largest codes: its int8 pairs must stay exact."""
    w = np.full((k, 8), 1.0, np.float32)
    w[:, 1] = -1.0
    w[0, 3] = 4.0  # one large weight: its pair is trimmed, the rest keeps the narrow scale
    x = np.full((1, 4, k), 1.0, np.float32)
    quantized = convert(matmul_model(w), config("ACWL")).model
    y = run_model(quantized, {"x": x})
    stored = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    codes = next(v for n, v in stored.items() if n.endswith("_quantized")).astype(np.float64)
    d = next(v for n, v in stored.items() if n.endswith("_equalizer")).astype(np.float64)
    w_scale = next(v for n, v in stored.items() if n.endswith("_w_scale")).item()
    assert np.abs(codes.reshape(-1, 2, 8) if k % 2 == 0 else codes).max() <= 127
    # exact integer result of the stored codes: per-row symmetric activation codes (half to even, as
    # QuantizeLinear rounds) against the int8 weight codes; a saturated int16 pair sum would miss it by far
    xe = x.astype(np.float64) * d
    row = np.abs(xe).max(-1, keepdims=True) / 127
    expected = (np.round(xe / row) @ codes) * row * w_scale
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(y, x @ w, rtol=0.05, atol=0.05 * np.abs(x @ w).max())


def test_pair_trimming_touches_only_pairs_over_128():
    from ptqlite.passes.dynamic import acwl_int8

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 6)).astype(np.float32)
    w[4, 2], w[5, 2] = 3.0, 2.9  # one same-sign pair far above the rest
    codes, params = acwl_int8(w)
    pairs = codes.reshape(-1, 2, 6).sum(axis=1)
    assert np.abs(pairs).max() <= 128 and np.abs(codes).max() <= 127
    plain = np.clip(np.round(w / params.scale), -127, 127)
    changed = codes != plain
    assert changed.sum() <= 2 and not changed[:4].any() and not changed[6:].any()


@pytest.mark.parametrize("k", [64, 63])
def test_no_int16_saturation(k):
    """Large activations against large weights: uint8 x int8 kernels without VNNI saturate 16-bit pair sums.
    The pair-safe int8 scales must give the exact integer result, and so must the uint8 storage."""
    w = np.full((k, 8), 1.0, np.float32)
    w[:, 1] = -1.0
    w[:, 2] = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)  # opposite signs in each pair never overflow
    x = np.full((1, 4, k), 1.0, np.float32)
    x[0, 0, 0] = 0.0  # keeps 0 in the range so the zero point is 0 and codes reach 255
    y = run_model(convert(matmul_model(w), config("ALWC")).model, {"x": x})
    expected = simulate_alwc(x, w)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, x @ w, rtol=1e-2, atol=1e-2)
    exact = run_model(convert(matmul_model(w), config("ALWC"), alwc_weights="uint8").model, {"x": x})
    np.testing.assert_allclose(exact, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_int8_pair_sums_fit_int16(strategy):
    """Every same-sign pair of neighbouring K codes of every weight sums to at most 128 in magnitude."""
    quantized = convert(transformer_block(), config(strategy)).model
    for name in ("Wq", "Wk", "Wv", "Wo", "W1", "W2"):
        stored = next(t for t in quantized.graph.initializer if t.name == f"{name}_quantized")
        codes = numpy_helper.to_array(stored)
        assert codes.dtype == np.int8 and np.abs(codes).max() >= 64
        pairs = codes.astype(np.int64).reshape(-1, 2, codes.shape[1]).sum(axis=1)
        assert np.abs(pairs).max() <= 128


# ---------------------------------------------------------------- Gemm, Gather, config rules


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("trans_b,alpha,beta", [(0, 1.0, 1.0), (1, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm(strategy, trans_b, alpha, beta):
    model = gemm_model(trans_b, alpha, beta)
    quantized = convert(model, config(strategy)).model
    assert "Gemm" not in ops(quantized)
    x = np.random.default_rng(5).standard_normal((6, 24)).astype(np.float32)
    assert rel_error(run_model(quantized, {"x": x}), run_model(model, {"x": x})) < 0.02


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gather_rows(strategy):
    model = transformer_block()
    quantized = convert(model, config(strategy)).model
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "table"))
    codes = numpy_helper.to_array(next(t for t in quantized.graph.initializer if t.name == "table_quantized"))
    scales = numpy_helper.to_array(next(t for t in quantized.graph.initializer if t.name == "table_scale"))
    assert codes.dtype == np.int8 and scales.shape == (VOCAB, 1)
    assert np.abs(codes).max() == 127
    # every element within half a step of its row
    assert np.all(np.abs(codes * scales - table) <= scales / 2 + 1e-7)


def test_skip_quant_node_and_no_size_filters():
    cfg = config(
        "ALWC", "skip_quant_node=ff2,embed\nmin_quant_weight_size=65535\nmin_quant_weight_channel=1000"
    )
    result = convert(transformer_block(), cfg)
    assert {q.tensor for q in result.quantized} == {"Wq", "Wk", "Wv", "Wo", "W1"}
    reasons = {s.tensor: s.reason for s in result.skipped}
    assert set(reasons) == {"W2", "table"} and all("skip_quant_node" in r for r in reasons.values())
    assert [n.name for n in result.model.graph.node if n.op_type == "MatMul"].count("ff2") == 1


def test_weight_shared_by_two_matmuls_is_stored_once():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
            helper.make_node("MatMul", ["a", "W"], ["y"], name="m2"),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("W", w)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = convert(model, config("ALWC"))
    assert [t.name for t in result.model.graph.initializer].count("W_quantized") == 1
    assert ops(result.model).count("MatMulInteger") == 2
    x = rng.standard_normal((3, 8)).astype(np.float32)
    assert rel_error(run_model(result.model, {"x": x}), x @ w @ w) < 0.03


def test_constant_first_input_stays_float():
    rng = np.random.default_rng(8)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["W", "x"], ["y"], name="left")],
        "left",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("W", rng.standard_normal((4, 8)).astype(np.float32))],
    )
    result = convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), config())
    assert ops(result.model) == ["MatMul"]
    assert "first input" in result.skipped[0].reason


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_old_opset_and_deterministic(strategy):
    model = transformer_block(opset=13)
    a = convert(model, config(strategy)).model
    b = convert(model, config(strategy)).model
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    assert rel_error(run_model(a, {"ids": ids}), run_model(model, {"ids": ids})) < REL_TOL


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bundled_resnet20(strategy):
    model = onnx.load(str(RESNET))
    result = convert(model, config(strategy))
    assert [q.op_type for q in result.quantized] == ["Gemm"]
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref, y = run_model(model, {"input": x}), run_model(result.model, {"input": x})
    assert np.all(y.argmax(1) == ref.argmax(1))
    assert rel_error(y, ref) < 0.02


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batched_weight_and_vector_activation(strategy):
    """A rank-3 weight [G, K, N] (scalar zero point, scales along N); a 1-D activation (scalar Gather)."""
    rng = np.random.default_rng(9)
    w3 = rng.standard_normal((3, 16, 8)).astype(np.float32)
    model = matmul_model(w3)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, "M", 16]))
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    assert rel_error(run_model(convert(model, config(strategy)).model, {"x": x}), x @ w3) < 0.02

    nodes = [
        helper.make_node("Gather", ["T", "i"], ["e"], name="g"),
        helper.make_node("MatMul", ["e", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vector",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("T", rng.standard_normal((10, 16)).astype(np.float32)), _init("W", w3[0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"i": np.array(3, np.int64)}
    y, ref = run_model(convert(model, config(strategy)).model, feed), run_model(model, feed)
    assert y.shape == ref.shape == (8,)
    assert rel_error(y, ref) < 0.02


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reported_bytes_count_everything_stored(strategy):
    """bytes_after = the stored initializers of the weight: codes, scales and (ACWL) the per-input-channel
    equalisation factors; it matches the bytes the conversion adds to the file."""
    k, n = 12, 20
    w = np.random.default_rng(3).standard_normal((k, n)).astype(np.float32)
    result = convert(matmul_model(w), config(strategy))
    (record,) = result.quantized
    expected = {"ALWC": k * n + 4 * n, "ACWL": k * n + 4 + 4 * k}[strategy]
    assert record.bytes_after == expected
    stored = {t.name: numpy_helper.to_array(t).nbytes for t in result.model.graph.initializer}
    weight_bytes = sum(v for name, v in stored.items() if name.startswith("W_") or name.endswith("w_scale"))
    assert weight_bytes == expected

"""Helpers shared by the test files: paths to the bundled example and ../shared/bench, small onnxruntime
wrappers, the FULL_QUANT test models and configs, the table of invalid config values."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqlite.cli import main
from ptqlite.config import QuantConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESNET20 = EXAMPLES / "models" / "resnet20_cifar10.onnx"
SHARED_BENCH = ROOT.parent / "shared" / "bench"
CACHE = ROOT / ".cache"


def shared_file(relative: str) -> Path:
    """A file of ../shared/bench, or skip the test when it is not there (users outside this workplace lack it)."""
    path = SHARED_BENCH / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/bench/{relative}, which is not present")
    if path.suffix == ".xz":
        target = CACHE / path.stem
        if not target.exists():
            CACHE.mkdir(exist_ok=True)
            tmp = target.with_suffix(".tmp")
            with lzma.open(path) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target)
        return target
    return path


def session(model: onnx.ModelProto | str | Path, optimized_path: Path | None = None, **options) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in options.items():
        setattr(so, key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_benchmark_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`ptqlite benchmark ARGS`: exit code, stdout, stderr."""
    code = main(["benchmark", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- FULL_QUANT test models


def initializer(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(np.float32), name)


def full_config(method: str = "MAX_MIN", per_channel: bool = True, bias_correction: bool = False,
                target: str = "CPU", skip: str = "", common: str = "") -> QuantConfig:
    """A FULL_QUANT config for tests that pass their samples to convert() (calibrate_path names no file)."""
    skip_line = f"skip_quant_node={skip}\n" if skip else ""
    return parse_config(f"""[common_quant_param]
quant_type=FULL_QUANT
bit_num=8
{skip_line}{common}
[data_preprocess_param]
calibrate_path=x:/nonexistent
calibrate_size=1
input_type=BIN
[full_quant_param]
activation_quant_method={method}
bias_correction={str(bias_correction).lower()}
per_channel={str(per_channel).lower()}
target_device={target}
""", "test.cfg")


def samples(shape: tuple[int, ...], count: int = 16, seed: int = 1, low: float = -1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(low, 1.0, shape).astype(np.float32)} for _ in range(count)]


def outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], fused: bool = True) -> np.ndarray:
    """Outputs over all feeds; fused=False runs QuantizeLinear/DequantizeLinear as they are (the exact
    arithmetic of the QDQ graph, independent of which int8 kernels this CPU has)."""
    options = {} if fused else {"graph_optimization_level": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    s = session(model, **options)
    return np.stack([s.run(None, f)[0] for f in feeds])


def conv_model(seed: int = 10) -> onnx.ModelProto:
    """Conv+Relu -> Conv -> Add(residual) -> Relu -> MaxPool -> GlobalAveragePool -> Flatten -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    rng = np.random.default_rng(seed)  # each model its own generator: tests must not depend on their order
    inits = [initializer("w1", rng.normal(0, 0.3, (16, 3, 3, 3))), initializer("b1", rng.normal(0, 0.1, 16)),
             initializer("w2", rng.normal(0, 0.1, (16, 16, 3, 3))), initializer("b2", rng.normal(0, 0.1, 16)),
             initializer("wf", rng.normal(0, 0.3, (10, 16))), initializer("bf", rng.normal(0, 0.1, 10))]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def depthwise_model(relu6: bool = True, seed: int = 0) -> onnx.ModelProto:
    """Conv -> ReLU6 -> depthwise Conv -> ReLU6 -> Conv, with channel ranges spread over 3 decades."""
    spread = np.logspace(-1.5, 1.5, 16)
    act = ["lo", "hi"] if relu6 else []
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand"),
        helper.make_node("Clip" if relu6 else "Relu", ["c1", *act], ["r1"], name="act_1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Clip" if relu6 else "Relu", ["c2", *act], ["r2"], name="act_2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="project"),
    ]
    rng = np.random.default_rng(seed)
    w2 = rng.normal(0, 0.3, (16, 1, 3, 3)) * spread.reshape(-1, 1, 1, 1)
    inits = [initializer("w1", rng.normal(0, 0.3, (16, 4, 1, 1))), initializer("b1", rng.uniform(0, 0.5, 16)),
             initializer("w2", w2), initializer("b2", rng.uniform(0, 0.5, 16) * spread),
             initializer("w3", rng.normal(0, 0.3, (8, 16, 1, 1)) / np.sqrt(spread).reshape(1, -1, 1, 1)),
             initializer("b3", rng.normal(0, 0.1, 8)), initializer("lo", np.array(0.0)), initializer("hi", np.array(6.0))]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def masked_attention_model(seed: int = 12, d: int = 16, big: float = float(np.finfo(np.float32).min)
                           ) -> onnx.ModelProto:
    """q/k/v projections, scores * 1/sqrt(d) + additive mask (0 or `big`; -3.4e38 in BERT's export) -> Softmax
    -> @ v."""
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wq"], ["q"], name="q"), n("MatMul", ["x", "wk"], ["k"], name="k"),
             n("MatMul", ["x", "wv"], ["v"], name="v"),
             n("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             n("MatMul", ["q", "kt"], ["s"], name="scores"),
             n("Mul", ["s", "scale"], ["ss"], name="scale_mul"),
             n("Sub", ["one", "mask"], ["inv"], name="invert"),
             n("Mul", ["inv", "big"], ["bias"], name="mask_bias"),
             n("Add", ["ss", "bias"], ["masked"], name="mask_add"),
             n("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
             n("MatMul", ["p", "v"], ["c"], name="context"),
             n("MatMul", ["c", "wo"], ["y"], name="out")]
    rng = np.random.default_rng(seed)
    inits = [initializer(w, rng.normal(0, 0.3, (d, d))) for w in ("wq", "wk", "wv", "wo")]
    inits += [initializer("scale", np.array(1 / np.sqrt(d))), initializer("one", np.array(1.0)),
              initializer("big", np.array(big))]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, d]),
                               helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------- config values that must be refused

# (section, key, bad value, what the message says is allowed)
INVALID = [
    ("common_quant_param", "quant_type", "weight_quant", "expected one of WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT"),
    ("common_quant_param", "quant_type", "NONE", "expected one of WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT"),
    ("common_quant_param", "skip_quant_op_type", "conv",
     "expected ONNX op types (exact case), e.g. Conv,Gemm; 'conv' is not one (did you mean Conv?)"),
    ("common_quant_param", "skip_quant_op_type", "Conv,Convolution",
     "expected ONNX op types (exact case), e.g. Conv,Gemm; 'Convolution' is not one"),
    ("common_quant_param", "skip_quant_op_type", ",", "expected comma-separated ONNX op types, e.g. Conv,Gemm"),
    ("common_quant_param", "bit_num", "17", "expected an integer in [0, 16]"),
    ("common_quant_param", "bit_num", "-1", "expected an integer in [0, 16]"),
    ("common_quant_param", "bit_num", "8.0", "expected an integer in [0, 16]"),
    ("common_quant_param", "bit_num", "eight", "expected an integer in [0, 16]"),
    ("common_quant_param", "bit_num", "\u0668", "expected an integer in [0, 16]"),  # Arabic-Indic 8
    ("common_quant_param", "min_quant_weight_size", "65536", "expected an integer in [0, 65535]"),
    ("common_quant_param", "min_quant_weight_size", "-1", "expected an integer in [0, 65535]"),
    ("common_quant_param", "min_quant_weight_channel", "70000", "expected an integer in [0, 65535]"),
    ("common_quant_param", "min_quant_weight_channel", "1e3", "expected an integer in [0, 65535]"),
    ("common_quant_param", "skip_quant_node", ", ,", "expected comma-separated node names"),
    ("common_quant_param", "enable_encode", "yes", "expected true or false"),
    ("common_quant_param", "enable_encode", "1", "expected true or false"),
    ("mixed_bit_weight_quant_param", "init_scale", "0", "expected a number in (0, 1)"),
    ("mixed_bit_weight_quant_param", "init_scale", "1", "expected a number in (0, 1)"),
    ("mixed_bit_weight_quant_param", "init_scale", "1.5", "expected a number in (0, 1)"),
    ("mixed_bit_weight_quant_param", "init_scale", "nan", "expected a number in (0, 1)"),
    ("mixed_bit_weight_quant_param", "init_scale", "0.0_2", "expected a number in (0, 1)"),
    ("mixed_bit_weight_quant_param", "auto_tune", "on", "expected true or false"),
    ("weight_quant_param", "per_channel", "per_layer", "expected true or false"),
    ("weight_quant_param", "bias_correction", "0", "expected true or false"),
    ("weight_quant_param", "dequant_strategy", "on_the_fly", "expected one of ON_THE_FLY"),
    ("weight_quant_param", "dequant_strategy", "DEFAULT", "expected one of ON_THE_FLY"),
    ("weight_quant_param", "block_size", "8", "expected 0 (per channel) or a power of two in [16, 256]"),
    ("weight_quant_param", "block_size", "48", "expected 0 (per channel) or a power of two in [16, 256]"),
    ("weight_quant_param", "block_size", "512", "expected 0 (per channel) or a power of two in [16, 256]"),
    ("weight_quant_param", "block_size", "-32", "expected 0 (per channel) or a power of two in [16, 256]"),
    ("weight_quant_param", "block_size", "32.0", "expected 0 (per channel) or a power of two in [16, 256]"),
    ("weight_quant_param", "gather_min_bit_num", "17", "expected an integer in [0, 16]"),
    ("weight_quant_param", "gather_min_bit_num", "8.5", "expected an integer in [0, 16]"),
    ("weight_quant_param", "gather_min_bit_num", "-1", "expected an integer in [0, 16]"),
    ("weight_quant_param", "gather_min_bit_num", "six", "expected an integer in [0, 16]"),
    ("weight_quant_param", "activation_weighted", "yes", "expected true or false"),
    ("full_quant_param", "activation_quant_method", "kl", "expected one of MAX_MIN, KL, REMOVAL_OUTLIER"),
    ("full_quant_param", "activation_quant_method", "PERCENTILE", "expected one of MAX_MIN, KL, REMOVAL_OUTLIER"),
    ("full_quant_param", "bias_correction", "no", "expected true or false"),
    ("full_quant_param", "per_channel", "2", "expected true or false"),
    ("full_quant_param", "target_device", "GPU", "expected one of CPU, NVGPU, DSP, ASCEND"),
    ("full_quant_param", "target_device", "cpu", "expected one of CPU, NVGPU, DSP, ASCEND"),
    ("data_preprocess_param", "calibrate_path", "/data/calib",
     "expected input_name:directory[,input_name:directory...]"),
    ("data_preprocess_param", "calibrate_path", "x:/a,", "expected input_name:directory[,input_name:directory...]"),
    ("data_preprocess_param", "calibrate_path", ":/a", "expected input_name:directory[,input_name:directory...]"),
    ("data_preprocess_param", "calibrate_size", "0", "expected an integer in [1, 65535]"),
    ("data_preprocess_param", "calibrate_size", "65536", "expected an integer in [1, 65535]"),
    ("data_preprocess_param", "input_type", "image", "expected one of IMAGE, BIN"),
    ("data_preprocess_param", "image_to_format", "YUV", "expected one of RGB, BGR, GRAY"),
    ("data_preprocess_param", "normalize_mean", "127.5", "expected a vector like [127.5, 127.5, 127.5]"),
    ("data_preprocess_param", "normalize_mean", "[1, two, 3]",
     "expected a vector of numbers like [127.5, 127.5, 127.5]"),
    ("data_preprocess_param", "normalize_std", "[1, 2]", "expected 1 or 3 finite numbers like [127.5, 127.5, 127.5]"),
    ("data_preprocess_param", "normalize_std", "[1, 2, 3, 4]",
     "expected 1 or 3 finite numbers like [127.5, 127.5, 127.5]"),
    ("data_preprocess_param", "normalize_std", "[1e999]",
     "expected 1 or 3 finite numbers like [127.5, 127.5, 127.5]"),
    ("data_preprocess_param", "normalize_std", "[inf]", "expected a vector of numbers like [127.5, 127.5, 127.5]"),
    ("data_preprocess_param", "normalize_std", "[]", "expected a vector of numbers like [127.5, 127.5, 127.5]"),
    ("data_preprocess_param", "resize_width", "0", "expected an integer in [1, 65535]"),
    ("data_preprocess_param", "resize_height", "65536", "expected an integer in [1, 65535]"),
    ("data_preprocess_param", "resize_method", "BILINEAR", "expected one of LINEAR, NEAREST, CUBIC"),
    ("data_preprocess_param", "center_crop_width", "-224", "expected an integer in [1, 65535]"),
    ("data_preprocess_param", "center_crop_height", "224px", "expected an integer in [1, 65535]"),
    ("dynamic_quant_param", "quant_strategy", "alwc", "expected one of ALWC, ACWL"),
]


def cli_workspace(tmp_path: Path, config_text: str, config_name: str) -> tuple[Path, Path, Path]:
    """A copy of the bundled model, a config with `config_text` and an empty output folder, for CLI tests."""
    model = tmp_path / "model.onnx"
    shutil.copyfile(RESNET20, model)
    config = tmp_path / config_name
    config.write_text(config_text)
    out = tmp_path / "out"
    out.mkdir()
    return model, config, out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """ptqlite's command line in this process: exit code, stdout, stderr."""
    from ptqlite import cli

    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The one `ptqlite: error:` line a user error prints, without its prefix (fails on anything else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ptqlite: error: ")
    return lines[0].removeprefix("ptqlite: error: ")



# ---------------------------------------------------------------- block-wise WEIGHT_QUANT test model


def _block_weights(*shape) -> np.ndarray:
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape) * 0.05
    w[rng.random(shape) < 0.005] *= 6  # a few outliers, as trained weights have
    return w.astype(np.float32)


def block_model(width: int = 64) -> onnx.ModelProto:
    """Gather of a table [50, width] -> MatMul [width, 80] -> MatMul [80, 96] (a last partial block of 16 at
    block 32) -> Gemm transB [48, 96]; and a Conv beside them."""
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["e"], name="gather", axis=0),
             helper.make_node("MatMul", ["e", "mm1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "mm2"], ["h2"], name="mm2"),
             helper.make_node("Gemm", ["h2", "fc"], ["y"], name="fc", transB=1),
             helper.make_node("Conv", ["img", "conv"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(_block_weights(50, width), "embed"), numpy_helper.from_array(_block_weights(width, 80), "mm1"),
             numpy_helper.from_array(_block_weights(80, 96), "mm2"), numpy_helper.from_array(_block_weights(48, 96), "fc"),
             numpy_helper.from_array(_block_weights(8, 3, 3, 3), "conv")]
    graph = helper.make_graph(nodes, "blocks", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
                                                helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48]),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


BLOCK_FEEDS = {"ids": np.array([0, 7, 49, 7, 13], np.int64), "img": np.random.default_rng(5).standard_normal((1, 3, 6, 6)).astype(np.float32)}
BLOCK_WEIGHTS = {"mm1": 0, "mm2": 0, "fc": 1}  # the axis blocks run along (K)


def default_config(bits: int, block: int = 32, extra: str = ""):
    return parse_config(f"[common_quant_param]\nquant_type=WEIGHT_QUANT\nbit_num={bits}\nmin_quant_weight_size=0\n"
                        f"min_quant_weight_channel=0\n[weight_quant_param]\nblock_size={block}\ngather_min_bit_num=0\n"
                        f"{extra}", "test.cfg")


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `model` that also outputs the values `names` (the decoded weights, the gathered rows)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return probe


PROBES = ["e", *BLOCK_WEIGHTS]


def record_gate_sessions(monkeypatch) -> list[str]:
    """Make the verification gate's onnxruntime sessions be recorded as they are made: the list fills with each
    session's source (its file path, or "in memory")."""
    from ptqlite import verify as verify_module

    loaded: list[str] = []
    real = verify_module.cpu_session

    def recording(source, *args, **kwargs):
        loaded.append(source if isinstance(source, str) else "in memory")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(verify_module, "cpu_session", recording)
    return loaded

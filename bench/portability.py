"""Every mode's output in ONNX Runtime and OpenVINO (CPU), and on ResNet20 the ONNX reference evaluator too.

Usage (from the repository root; needs ../shared/bench, MiniLM built by bench/minilm.py into .cache/minilm,
openvino from the test extra):
    .venv/bin/python bench/portability.py [--models resnet20 resnet56 mobilenet_v2 minilm] [--modes REGEX]

For each model and mode: convert (Python API, in-memory calibration for FULL_QUANT), save, then
- ONNX Runtime (CPU provider, default optimisation) and OpenVINO (`Core().read_model(path)`, compiled for CPU, as
  a user would) run the same inputs;
- cosine of OpenVINO's output to ONNX Runtime's over all inputs together, and the smallest per input;
- cosine to the float model's output (ONNX Runtime's; the float model agrees across runtimes to 1e-12) in each;
- ONNX Runtime with graph optimisation off (QuantizeLinear/DequantizeLinear as the ONNX spec's float arithmetic,
  no int8 kernels) against its default session, and OpenVINO against that: how far two correct executions of the
  same file already lie apart; for FULL_QUANT also OpenVINO with its low-precision transformations off
  (`LP_TRANSFORMS_MODE`: QDQ as float FakeQuantize, not its int8 kernels) against that;
- ResNet20 only: the reference evaluator (onnx 1.23's has DequantizeLinear from opset 19 only, so QDQ outputs
  run as a copy converted to opset 21) (`onnx.reference.ReferenceEvaluator`) on the first input, cosine to ONNX
  Runtime's output.
WEIGHT_QUANT rows name the storage forms the pass chose (tensors per form). Prints one markdown table per model.

Inputs: ResNets 16 CIFAR test images in 4 batches of 4 (calibration: the last 32); MobileNet V2 4 ImageNet evaluation images
(calibration: the first 16); MiniLM 4 SST-2 sentences at sequence length 128 (calibration: the next 16).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from datasets import SHARED, cifar

import ptqlite
from ptqlite.errors import PtqError
from ptqlite.model import save_model

try:
    import openvino
except ImportError:
    sys.exit("portability: openvino is not installed (pip install -e '.[test]')")

MINILM = ROOT / ".cache" / "minilm" / "all-MiniLM-L6-v2.onnx"
NAMES = ("input_ids", "attention_mask", "token_type_ids")
COMMON = "[common_quant_param]\nquant_type={}\nbit_num={}\nmin_quant_weight_size=0\nmin_quant_weight_channel=0\n"


def weight(bits: int, extra: str = "") -> str:
    return COMMON.format("WEIGHT_QUANT", bits) + extra


def full(target: str) -> str:
    return (COMMON.format("FULL_QUANT", 8) + "[full_quant_param]\nactivation_quant_method=MAX_MIN\n"
            f"bias_correction=true\nper_channel=true\ntarget_device={target}\n")


def dynamic(strategy: str) -> str:
    return COMMON.format("DYNAMIC_QUANT", 8) + f"[dynamic_quant_param]\nquant_strategy={strategy}\n"


MODES: dict[str, str] = {f"WEIGHT_QUANT {b} bit": weight(b) for b in range(1, 17)}
MODES |= {
    "WEIGHT_QUANT 8 bit, enable_encode=false": COMMON.format("WEIGHT_QUANT", 8) + "enable_encode=false\n",
    "WEIGHT_QUANT 16 bit, enable_encode=false": COMMON.format("WEIGHT_QUANT", 16) + "enable_encode=false\n",
    "WEIGHT_QUANT mixed bit, init_scale 0.02": weight(0, "[mixed_bit_weight_quant_param]\ninit_scale=0.02\n"),
    "WEIGHT_QUANT ON_THE_FLY 8 bit": weight(8, "[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n"),
    "WEIGHT_QUANT ON_THE_FLY 4 bit, block 32": weight(
        4, "[weight_quant_param]\ndequant_strategy=ON_THE_FLY\nblock_size=32\n"),
    "FULL_QUANT CPU": full("CPU"),
    "FULL_QUANT NVGPU": full("NVGPU"),
    "FULL_QUANT DSP": full("DSP"),
    "FULL_QUANT ASCEND": full("ASCEND"),
    "DYNAMIC_QUANT ALWC": dynamic("ALWC"),
    "DYNAMIC_QUANT ACWL": dynamic("ACWL"),
}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def data(name: str) -> tuple[Path, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Model path, evaluation feeds, calibration samples."""
    if name in ("resnet20", "resnet56"):
        x, _ = cifar()
        path = (ROOT / "examples" / "models" / "resnet20_cifar10.onnx" if name == "resnet20"
                else SHARED / "models" / "resnet56_cifar10.onnx")
        feeds = [{"input": x[i:i + 4]} for i in range(0, 16, 4)]
        return path, feeds, [{"input": x[i:i + 1]} for i in range(len(x) - 32, len(x))]
    if name == "mobilenet_v2":
        import lzma
        import shutil

        import imagenet

        path = ROOT / ".cache" / "mobilenet_v2_1.0_224_from_qat_tflite.onnx"
        if not path.exists():
            with lzma.open(SHARED / "models" / (path.name + ".xz")) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        name_in = onnx.load(path, load_external_data=False).graph.input[0].name
        x, _ = imagenet.evaluation(4)
        calib, _ = imagenet.load(imagenet.calibration_files(16))
        return path, [{name_in: x[i:i + 1]} for i in range(4)], [{name_in: c[None]} for c in calib]
    if name == "minilm":
        tokens = np.load(MINILM.parent / "sst2_train_tokens.npz")
        feeds = [{n: tokens[n][i:i + 1].astype(np.int64) for n in NAMES} for i in range(4)]
        calib = [{n: tokens[n][i:i + 1].astype(np.int64) for n in NAMES} for i in range(4, 20)]
        return MINILM, feeds, calib
    raise SystemExit(f"portability: unknown model {name}")


def forms(result) -> str:
    """Storage forms the WEIGHT_QUANT pass chose, as `form xN`."""
    counts = Counter(q.storage.split(" ")[0].split(",")[0] for q in result.quantized)
    return ", ".join(f"{form} x{n}" for form, n in sorted(counts.items()))


def run_row(path: Path, text: str, feeds, calib, reference: bool, work: Path, core) -> dict:
    start = time.perf_counter()
    calibration = calib if "FULL_QUANT" in text else None
    result = ptqlite.convert(str(path), text, calibration, progress=False, verify=False)  # measured here
    out = work / "model.onnx"
    save_model(result.model, out)
    row = {"forms": forms(result) if "WEIGHT_QUANT" in text else "", "convert_s": time.perf_counter() - start}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    ort_out = [session.run(None, f)[0] for f in feeds]
    # The same file in onnxruntime with graph optimisation off: QuantizeLinear/DequantizeLinear run as the ONNX
    # spec writes them (float arithmetic), not fused into int8 kernels. Its distance to the default session is how
    # far two correct executions of the file may already lie apart.
    so_plain = ort.SessionOptions()
    so_plain.log_severity_level = 3
    so_plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(out), so_plain, providers=["CPUExecutionProvider"])
    plain_out = [plain.run(None, f)[0] for f in feeds]
    row["ort_plain"] = cosine(np.concatenate(ort_out), np.concatenate(plain_out))
    row["ort_plain_min"] = min(cosine(a, b) for a, b in zip(ort_out, plain_out))
    try:
        compiled = core.compile_model(core.read_model(str(out)), "CPU")
        ov_out = [np.asarray(compiled(f)[compiled.outputs[0]]) for f in feeds]
    except Exception as error:  # noqa: BLE001 - a failure to compile or run is the measurement
        row["openvino"] = f"fails: {str(error).splitlines()[0][:80]}"
        return row
    row["openvino"] = "runs"
    row["ort_ov"] = cosine(np.concatenate(ort_out), np.concatenate(ov_out))
    row["ort_ov_min"] = min(cosine(a, b) for a, b in zip(ort_out, ov_out))
    row["plain_ov"] = cosine(np.concatenate(plain_out), np.concatenate(ov_out))
    if "FULL_QUANT" in text:
        # OpenVINO with its low-precision transformations off (a CPU plugin property it accepts but does not list):
        # QuantizeLinear/DequantizeLinear run as float FakeQuantize instead of its own int8 kernels.
        exact = core.compile_model(core.read_model(str(out)), "CPU", {"LP_TRANSFORMS_MODE": False})
        exact_out = [np.asarray(exact(f)[exact.outputs[0]]) for f in feeds]
        row["plain_ov_nolpt"] = cosine(np.concatenate(plain_out), np.concatenate(exact_out))
    row["ort_out"], row["ov_out"] = ort_out, ov_out
    if reference:
        from onnx.reference import ReferenceEvaluator

        first = {k: v[:1] for k, v in feeds[0].items()}
        model = onnx.load(out)
        try:
            evaluator = ReferenceEvaluator(model)
        except RuntimeError:  # onnx 1.23's evaluator has DequantizeLinear from opset 19 only: a converted copy
            from onnx import version_converter

            evaluator = ReferenceEvaluator(version_converter.convert_version(model, 21))
            row["ref_note"] = " (opset 21 copy)"
        ref = evaluator.run(None, first)[0]
        row["ref_ort"] = cosine(ref, session.run(None, first)[0])
    return row


def table(name: str, rows: dict[str, dict], reference: bool) -> str:
    head = ("| mode | storage forms | OpenVINO | cos OV vs ORT (all / min per input) | cos vs float ORT / OV |"
            " ORT vs ORT unoptimised (all / min) | OV vs ORT unoptimised | OV without LP transforms vs ORT unoptimised |")
    head += " reference vs ORT |" if reference else ""
    lines = [f"### {name}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for mode, r in rows.items():
        cells = [mode, r.get("forms", ""), r["openvino"]]
        if "ort_ov" in r:
            cells += [f"{r['ort_ov']:.6f} / {r['ort_ov_min']:.6f}", f"{r['ort_float']:.6f} / {r['ov_float']:.6f}"]
        else:
            cells += ["", ""]
        if "ort_plain" in r:
            cells += [f"{r['ort_plain']:.6f} / {r['ort_plain_min']:.6f}", f"{r.get('plain_ov', float('nan')):.6f}"]
        else:
            cells += ["", ""]
        cells.append(f"{r['plain_ov_nolpt']:.6f}" if "plain_ov_nolpt" in r else "")
        if reference:
            cells.append(f"{r['ref_ort']:.6f}{r.get('ref_note', '')}" if "ref_ort" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "mobilenet_v2", "minilm"])
    parser.add_argument("--modes", default=".", help="regular expression on the mode labels")
    args = parser.parse_args()
    core = openvino.Core()
    print(f"onnxruntime {ort.__version__}, OpenVINO {openvino.__version__}")
    for name in args.models:
        path, feeds, calib = data(name)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        float_session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        compiled = core.compile_model(core.read_model(str(path)), "CPU")
        float_ort = np.concatenate([float_session.run(None, f)[0] for f in feeds])
        float_ov = np.concatenate([np.asarray(compiled(f)[compiled.outputs[0]]) for f in feeds])
        rows: dict[str, dict] = {"float": {"openvino": "runs", "ort_ov": cosine(float_ort, float_ov),
                                           "ort_ov_min": cosine(float_ort, float_ov), "ort_float": 1.0,
                                           "ov_float": cosine(float_ov, float_ort)}}
        reference = name == "resnet20"
        for mode, text in MODES.items():
            if not re.search(args.modes, mode):
                continue
            with tempfile.TemporaryDirectory() as work:
                try:
                    row = run_row(path, text, feeds, calib, reference, Path(work), core)
                except PtqError as error:
                    row = {"openvino": f"not converted: {str(error)[:80]}"}
            if "ort_out" in row:
                row["ort_float"] = cosine(np.concatenate(row.pop("ort_out")), float_ort)
                row["ov_float"] = cosine(np.concatenate(row.pop("ov_out")), float_ort)
            rows[mode] = row
            print(f"  {name} {mode}: {row.get('ort_ov', row['openvino'])}", file=sys.stderr, flush=True)
        print(table(name, rows, reference), flush=True)
        print()


if __name__ == "__main__":
    main()

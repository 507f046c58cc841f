"""Where a model's run time goes, op type by op type and node by node, from onnxruntime's own profiler.

ONNX Runtime rewrites the graph when it loads it (QDQ groups become QLinearConv / QLinearAdd, MatMul with
DynamicQuantizeLinear becomes DynamicQuantizeMatMul, Conv+Relu fuse, float convs move to the NCHWc layout with
ReorderInput / ReorderOutput around them), so the op types and node counts here are those of the graph it
*executes*, not those of the .onnx file.

Times are kernel times: for each node, the median over the kept runs of the profiler's "_kernel_time" events;
an op type's time is the sum over its nodes. Each model gets a profiling session of its own, set up like the benchmark's; the sessions take
turns run by run as in the timed loops (runtime.time_interleaved), and only the runs after the warm-up are kept.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelError
from .runtime import file_session, time_interleaved

_KERNEL_SUFFIX = "_kernel_time"
NOTE = "op types of the graph onnxruntime executes, after its fusions; times are median kernel time per run"


@dataclass
class OpTypeTime:
    op_type: str
    ms_per_run: float
    share: float  # of the model's summed kernel time, 0..1
    nodes: int


@dataclass
class NodeTime:
    name: str
    op_type: str
    ms_per_run: float
    share: float
    shapes: str = ""  # first input -> first output, e.g. "uint8[1,56,56,24] -> uint8[1,56,56,144]"


@dataclass
class OpProfile:
    path: str
    runs: int
    warmup: int
    kernel_ms: float  # sum of the nodes' median kernel times
    run_ms: float  # median of the profiler's model_run times: kernels plus the executor's work between them
    op_types: list[OpTypeTime] = field(default_factory=list)  # slowest first
    nodes: list[NodeTime] = field(default_factory=list)  # every executed node, slowest first


def profile_models(
    paths: list[str | Path], inputs: dict[str, np.ndarray], *, runs: int = 10, warmup: int = 3, threads: int = 1
) -> list[OpProfile]:
    """Profile each model on `inputs`, interleaved run by run; the trace files are deleted."""
    with tempfile.TemporaryDirectory(prefix="ptqlite-profile-") as tmp:
        sessions = [
            file_session(Path(path), threads, profile_prefix=str(Path(tmp) / f"trace{i}")) for i, path in enumerate(paths)
        ]
        try:
            time_interleaved(sessions, inputs, runs, warmup)
        finally:
            traces = [Path(s.end_profiling()) for s in sessions]
        events = [json.loads(trace.read_text()) for trace in traces]
    return [summarize(e, str(path), runs, warmup) for e, path in zip(events, paths)]


def summarize(events: list[dict], path: str, runs: int, warmup: int = 0) -> OpProfile:
    """Kernel times of the last `runs` model runs of a parsed onnxruntime trace: per node, the median over runs."""
    run_events = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    if len(run_events) < runs:
        raise ModelError(f"{path}: the profile holds {len(run_events)} model run(s), expected at least {runs}")
    kept = run_events[-runs:]
    starts = np.array([e["ts"] for e in kept])
    kernels = [
        e for e in events
        if e.get("cat") == "Node" and e.get("name", "").endswith(_KERNEL_SUFFIX) and e["ts"] >= starts[0]
    ]
    info: dict[str, tuple[str, str, str]] = {}  # node key -> (name, op type, shapes)
    keys = []
    for e in kernels:
        args = e.get("args", {})
        name = e["name"][: -len(_KERNEL_SUFFIX)]
        # The node index tells apart nodes that onnxruntime created without a name.
        key = str(args.get("node_index", name))
        shapes = f"{_shape(args.get('input_type_shape'))} -> {_shape(args.get('output_type_shape'))}"
        info.setdefault(key, (name or f"(unnamed node {key})", args.get("op_name", "?"), shapes))
        keys.append(key)
    order = list(info)
    row = {k: i for i, k in enumerate(order)}
    us = np.zeros((len(order), runs))  # node x run
    np.add.at(
        us,
        (
            np.array([row[k] for k in keys], dtype=np.int64),
            np.searchsorted(starts, [e["ts"] for e in kernels], side="right") - 1,
        ),
        np.array([float(e["dur"]) for e in kernels]),
    )
    # The median, as for the benchmark's latency: other programs on the machine make some runs much slower.
    node_ms = np.median(us, axis=1) / 1000
    kernel_ms = float(node_ms.sum())

    def share(ms: float) -> float:
        return ms / kernel_ms if kernel_ms > 0 else 0.0

    nodes = [NodeTime(*info[k][:2], float(ms), share(float(ms)), info[k][2]) for k, ms in zip(order, node_ms)]
    nodes.sort(key=lambda n: (-n.ms_per_run, n.name))
    type_ms: dict[str, float] = {}
    type_nodes: dict[str, int] = {}
    for node in nodes:
        type_ms[node.op_type] = type_ms.get(node.op_type, 0.0) + node.ms_per_run
        type_nodes[node.op_type] = type_nodes.get(node.op_type, 0) + 1
    op_types = [OpTypeTime(t, ms, share(ms), type_nodes[t]) for t, ms in type_ms.items()]
    op_types.sort(key=lambda o: (-o.ms_per_run, o.op_type))
    run_ms = float(np.median([float(e["dur"]) for e in kept])) / 1000
    return OpProfile(path, runs, warmup, kernel_ms, run_ms, op_types, nodes)


@dataclass
class ProfileComparison:
    """The model's profile, the baseline's if any, and how many of the slowest nodes to show."""

    model: OpProfile
    baseline: OpProfile | None = None
    top: int = 10
    threads: int = 1

    def rows(self) -> list[dict]:
        """One row per op type of either model: the model's types by time, then the baseline-only ones."""
        base = {o.op_type: o for o in self.baseline.op_types} if self.baseline else {}
        mine = {o.op_type: o for o in self.model.op_types}
        order = [o.op_type for o in self.model.op_types]
        order += [o.op_type for o in (self.baseline.op_types if self.baseline else []) if o.op_type not in mine]
        rows = []
        for op_type in order:
            m, b = mine.get(op_type), base.get(op_type)
            row: dict = {"op_type": op_type, "model": asdict(m) if m else None}
            if self.baseline is not None:
                row["baseline"] = asdict(b) if b else None
                row["ratio"] = m.ms_per_run / b.ms_per_run if m and b and b.ms_per_run > 0 else None
            for side in ("model", "baseline"):
                if row.get(side):
                    row[side].pop("op_type")
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        def side(p: OpProfile | None) -> dict | None:
            if p is None:
                return None
            return {"path": p.path, "kernel_ms": p.kernel_ms, "run_ms": p.run_ms,
                    "nodes": sum(o.nodes for o in p.op_types)}

        out = {
            "note": NOTE,
            "runs": self.model.runs,
            "warmup": self.model.warmup,
            "threads": self.threads,
            "model": side(self.model),
            "baseline": side(self.baseline),
            "op_types": self.rows(),
            "slowest_nodes": [asdict(n) for n in self.model.nodes[: self.top]],
        }
        if self.baseline is not None and self.baseline.kernel_ms > 0:
            out["kernel_ratio"] = self.model.kernel_ms / self.baseline.kernel_ms
        return out

    def format(self) -> str:
        p, b = self.model, self.baseline
        head = ["op type", "model ms", "share", "nodes"]
        if b is not None:
            head += ["baseline ms", "share", "nodes", "ratio"]
        table = [head]
        for row in self.rows():
            cells = [row["op_type"], *_cells(row["model"])]
            if b is not None:
                ratio = row["ratio"]
                cells += [*_cells(row["baseline"]), f"{ratio:.2f}x" if ratio is not None else "-"]
            table.append(cells)
        total = ["all kernels", f"{p.kernel_ms:.3f}", "100.0%", str(sum(o.nodes for o in p.op_types))]
        run = ["whole run", f"{p.run_ms:.3f}", "", ""]
        if b is not None:
            ratio = f"{p.kernel_ms / b.kernel_ms:.2f}x" if b.kernel_ms > 0 else "-"
            total += [f"{b.kernel_ms:.3f}", "100.0%", str(sum(o.nodes for o in b.op_types)), ratio]
            ratio = f"{p.run_ms / b.run_ms:.2f}x" if b.run_ms > 0 else "-"
            run += [f"{b.run_ms:.3f}", "", "", ratio]
        table += [total, run]
        lines = [
            f"op profile: {p.runs} profiled runs after {p.warmup} warm-up run(s), {self.threads} thread(s)"
            + (", interleaved with the baseline" if b is not None else ""),
            f"({NOTE})",
            *_align(table, right_from=1),
        ]
        if self.top > 0:
            lines.append(f"slowest {min(self.top, len(p.nodes))} nodes of the model:")
            nodes = [["node", "op type", "ms", "share", "input -> output"]] + [
                [n.name, n.op_type, f"{n.ms_per_run:.3f}", f"{100 * n.share:.1f}%", n.shapes]
                for n in p.nodes[: self.top]
            ]
            lines += _align(nodes, right_from=2, left_from=4)
        return "\n".join(lines)


def _shape(typed: list[dict] | None) -> str:
    """The first tensor of a trace's input/output_type_shape list, as dtype[d0,d1,...]."""
    if not typed:
        return "?"
    ((dtype, dims),) = typed[0].items()
    return f"{dtype}[{','.join(str(d) for d in dims)}]"


def _cells(side: dict | None) -> list[str]:
    if side is None:
        return ["-", "-", "-"]
    return [f"{side['ms_per_run']:.3f}", f"{100 * side['share']:.1f}%", str(side["nodes"])]


def _align(rows: list[list[str]], right_from: int, left_from: int | None = None) -> list[str]:
    """Columns padded to their widest cell; figures (columns right_from..left_from-1) right-aligned, text left."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    stop = len(widths) if left_from is None else left_from

    def cell(i: int, text: str, width: int) -> str:
        return text.rjust(width) if right_from <= i < stop else text.ljust(width)

    return ["  ".join(cell(i, c, w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]

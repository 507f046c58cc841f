"""Debug reports (debug_info_save_path): how far each tensor of the quantized model drifts from the float model.

Built only on what every quant mode produces: the float model, the quantized model, the ConversionResult and
some inputs. Both models run side by side on each input with their intermediate tensors exposed as extra outputs;
a float tensor is compared with what its first consumer reads in the quantized graph (the node with the same name
at the same input slot, e.g. the output of a DequantizeLinear), or else with the tensor of the same name.

Files written (docs/debugging.md explains how to read them):
- output_summary.csv: Round,TensorName,CosineSimilarity for every graph output of every round;
- round_<i>.csv: per tensor an Origin row then a Dequant row of statistics, one file per input sample;
- quant_param.csv: the quantization parameters of every quantized tensor, one row per channel;
- report.html: per-tensor table sortable by cosine, the plan, histograms of the worst tensors (with matplotlib);
- notes.txt: where the inputs came from and anything the reader must know.
Rounds stream: one round's activations are in memory at a time and each round's CSV is written as it is done.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .config import QuantConfig
from .errors import ConfigError
from .model import GraphIndex, constants_to_initializers, graph_inputs
from .result import ConversionResult
from .runtime import (
    REFERENCE_VALUES,
    Probe,
    cosine_similarity,
    cpu_session,
    model_input_specs,
    session_feeds,
    synthetic_inputs,
)

log = logging.getLogger(__name__)

SUMMARY_HEADER = ("Round", "TensorName", "CosineSimilarity")
ROUND_HEADER = ("NodeName", "NodeType", "TensorName", "InOutFlag", "DataTypeFlag", "TensorTypeFlag", "Min", "Q1",
                "Median", "Q3", "Max", "Mean", "Var", "Sparsity", "Clip", "CosineSimilarity")
PARAM_HEADER = ("NodeName", "NodeType", "TensorName", "ElementsNum", "Dims", "Scale", "ZeroPoint", "Bits",
                "CorrectionVar", "CorrectionMean")
HISTOGRAM_LAYERS = 6
_HIST_BINS = 64
_PURPOSE = "for the debug report"
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


# ---------------------------------------------------------------- numerics


def tensor_stats(x: np.ndarray) -> tuple[float, ...]:
    """Min, Q1, Median, Q3, Max, Mean, Var, Sparsity.

    Quartiles interpolate linearly between order statistics (numpy's default); Var is the population standard
    deviation, as the reference reports it under that name; Sparsity is the fraction of exact zeros.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return (float("nan"),) * 8
    quartiles = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return (*(float(v) for v in quartiles), float(x.mean()), float(x.std()), float(np.mean(x == 0)))


def clip_rate(origin: np.ndarray, dequant: np.ndarray) -> float:
    """Fraction of origin values outside [min(dequant), max(dequant)]."""
    origin = np.asarray(origin, dtype=np.float64).ravel()
    dequant = np.asarray(dequant, dtype=np.float64).ravel()
    if origin.size == 0 or dequant.size == 0:
        return 0.0
    lo, hi = dequant.min(), dequant.max()
    return float(np.mean((origin < lo) | (origin > hi)))


def _fmt(value: float) -> str:
    return f"{value:.9g}"


# ---------------------------------------------------------------- inputs


_LOW, _HIGH = REFERENCE_VALUES.float_range
SYNTHETIC_NOTE = ("the config has no calibration data, so the comparison runs on one synthetic "
                  f"input (floats uniform in [{_LOW}, {_HIGH}], seed {REFERENCE_VALUES.seed}; "
                  "integer inputs 1); it may not represent real data")


def report_inputs(model: onnx.ModelProto, config: QuantConfig, input_format: str | None = None,
                  notes: list[str] | None = None) -> Iterable[dict[str, np.ndarray]]:
    """The samples the debug report runs on: the calibration set when the config has one (one round per sample),
    else one synthetic sample (and a note saying so appended to `notes`)."""
    # Imported here so that OpenCV loads only when a report is asked for.
    from .data import calibration_set, has_calibration_data

    if has_calibration_data(config):
        return calibration_set(config, model, input_format)
    if notes is not None:
        notes.append(SYNTHETIC_NOTE)
    return synthetic_inputs(model_input_specs(model), REFERENCE_VALUES)


# ---------------------------------------------------------------- which tensors are compared


@dataclass
class _Entry:
    node: str
    op_type: str
    tensor: str  # name in the float graph
    inout: str  # "Input" / "Output"
    kind: str  # "Weight" / "Activation"
    counterpart: str  # name of the value to compare with in the quantized graph
    # (scale, offset) that map the counterpart back to the float value (smoothing, MatMul/Gather weight codes)
    value_map: tuple[np.ndarray, np.ndarray | None] | None = None
    # accumulated over rounds for the HTML table
    cos_sum: float = 0.0
    cos_min: float = 1.0
    clip_sum: float = 0.0
    rounds: int = 0
    histogram: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # edges, origin counts, dequant counts

    def add(self, cos: float, clip: float) -> None:
        self.cos_sum += cos
        self.cos_min = min(self.cos_min, cos)
        self.clip_sum += clip
        self.rounds += 1

    @property
    def mean_cos(self) -> float:
        return self.cos_sum / self.rounds if self.rounds else float("nan")


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value that shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 -- any failure only means types are checked at run time instead
        inferred = model
    graph = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)
            if v.type.tensor_type.elem_type}


def _plan_entries(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                  result: ConversionResult) -> list[_Entry]:
    """One entry per tensor, in graph order: quantized weights as the Input of the node that reads them, graph
    inputs as the Input of their first consumer, every other activation as the Output of the node making it."""
    graph = float_model.graph
    index = GraphIndex(graph)
    quant_nodes: dict[str, onnx.NodeProto] = {}
    for node in quant_model.graph.node:
        if node.name:
            quant_nodes.setdefault(node.name, node)
    quant_values = {t.name for t in quant_model.graph.initializer} | {i.name for i in quant_model.graph.input}
    quant_values |= {o for n in quant_model.graph.node for o in n.output}
    types = _float_types(float_model)

    def counterpart(tensor: str) -> tuple[str | None, np.ndarray | None]:
        for node, slot in index.consumers.get(tensor, []):
            twin = quant_nodes.get(node.name) if node.name else None
            if twin is not None and slot < len(twin.input) and twin.input[slot]:
                return twin.input[slot], result.input_maps.get((node.name, slot))
        return (tensor if tensor in quant_values else None), None

    def is_float(tensor: str) -> bool:
        return types.get(tensor, TensorProto.FLOAT) in _FLOAT_TYPES

    entries: list[_Entry] = []
    weights = {q.tensor for q in result.quantized if q.tensor in index.initializers}
    for value in graph_inputs(float_model):
        users = index.consumers.get(value.name)
        twin, value_map = counterpart(value.name)
        if users and twin and is_float(value.name):
            entries.append(_Entry(users[0][0].name, users[0][0].op_type, value.name, "Input", "Activation", twin,
                                  value_map))
    for node in graph.node:
        for name in node.input:
            if name in weights:
                twin, value_map = counterpart(name)
                weights.discard(name)
                if twin:
                    entries.append(_Entry(node.name, node.op_type, name, "Input", "Weight", twin, value_map))
        for name in node.output:
            twin, value_map = counterpart(name) if name else (None, None)
            if twin and is_float(name):
                entries.append(_Entry(node.name, node.op_type, name, "Output", "Activation", twin, value_map))
    return entries


# ---------------------------------------------------------------- writing


@dataclass
class DebugReport:
    """What write_reports produced: the files, and per-tensor cosines for callers that rank layers."""

    folder: Path
    rounds: int = 0
    files: list[Path] = field(default_factory=list)
    output_cosines: list[tuple[int, str, float]] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)


def write_reports(folder: str | Path, float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                  result: ConversionResult, inputs: Iterable[dict[str, np.ndarray]],
                  notes: Iterable[str] = ()) -> DebugReport:
    """Write output_summary.csv, round_<i>.csv, quant_param.csv, report.html and notes.txt into `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"debug_info_save_path={folder}: cannot create the folder ({exc.strerror})") from None
    for stale in folder.glob("round_*.csv"):  # rounds of an earlier, longer run would look like this run's
        if re.fullmatch(r"round_\d+\.csv", stale.name):
            stale.unlink()
    reference = onnx.ModelProto()
    reference.CopyFrom(float_model)
    constants_to_initializers(reference)  # weights exported as Constant nodes compare like initializers
    entries = _plan_entries(reference, quant_model, result)
    report = DebugReport(folder, entries=entries)
    float_probe = Probe(reference, [e.tensor for e in entries if e.kind == "Activation"]
                         + [o.name for o in reference.graph.output], _PURPOSE)
    quant_probe = Probe(quant_model, [e.counterpart for e in entries], _PURPOSE)
    # Exposing intermediate tensors can stop the runtime from fusing quantized kernels, so a graph with
    # quantized ops also runs as is for output_summary.csv: the outputs as users will see them.
    quant_session = cpu_session(quant_model, _PURPOSE) if _has_quantized_ops(quant_model) else None
    output_names = [o.name for o in reference.graph.output]
    want_histograms = HISTOGRAM_LAYERS > 0 and _have_matplotlib()
    weight_rows: dict[int, tuple[list[str], list[str], float, float]] = {}

    summary_path = folder / "output_summary.csv"
    with open(summary_path, "w", newline="") as summary_file:
        summary = csv.writer(summary_file, lineterminator="\n")
        summary.writerow(SUMMARY_HEADER)
        for index, feeds in enumerate(inputs):
            float_values = float_probe.run(feeds)
            quant_values = quant_probe.run(feeds)
            plain = quant_values
            if quant_session is not None:
                plain = dict(zip([o.name for o in quant_session.get_outputs()],
                                 quant_session.run(None, session_feeds(quant_session, feeds)), strict=True))
            for name in output_names:
                origin = float_values.get(name, float_probe.constant(name))
                result_value = plain.get(name, quant_probe.constant(name))
                cos = cosine_similarity(origin, result_value) if origin is not None and result_value is not None else 0.0
                summary.writerow((index, name, _fmt(cos)))
                report.output_cosines.append((index, name, cos))
            path = folder / f"round_{index}.csv"
            _write_round(path, entries, float_probe, quant_probe, float_values, quant_values, weight_rows,
                         want_histograms and index == 0)
            report.files.append(path)
            report.rounds += 1
            del float_values, quant_values, plain
    report.files.insert(0, summary_path)
    report.files.append(_write_params(folder / "quant_param.csv", result))
    notes = list(notes)
    notes += [n for n in result.notes if n not in notes]
    report.files.append(_write_notes(folder / "notes.txt", report, notes))
    report.files.append(_write_html(folder / "report.html", report, result, notes))
    return report


def _has_quantized_ops(model: onnx.ModelProto) -> bool:
    return any("Quantize" in n.op_type or "Integer" in n.op_type or n.op_type.startswith("QLinear")
               or n.domain not in ("", "ai.onnx") for n in model.graph.node)


def _write_round(path: Path, entries: list[_Entry], float_probe: Probe, quant_probe: Probe,
                 float_values: dict, quant_values: dict, weight_rows: dict, histograms: bool) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(ROUND_HEADER)
        for number, entry in enumerate(entries):
            if entry.kind == "Weight" and number in weight_rows:  # weights are the same every round
                origin_row, dequant_row, cos, clip = weight_rows[number]
            else:
                origin = (float_probe.constant(entry.tensor) if entry.kind == "Weight"
                          else float_values.get(entry.tensor))
                dequant = quant_values.get(entry.counterpart)
                if dequant is None:
                    dequant = quant_probe.constant(entry.counterpart)
                if dequant is not None and entry.value_map is not None:
                    scale, offset = entry.value_map
                    dequant = np.asarray(dequant, np.float32) * scale + (0 if offset is None else offset)
                if origin is None or dequant is None or not _comparable(origin, dequant):
                    continue
                cos, clip = cosine_similarity(origin, dequant), clip_rate(origin, dequant)
                head = [entry.node, entry.op_type, entry.tensor, entry.inout]
                origin_row = [*head, "Origin", entry.kind, *map(_fmt, tensor_stats(origin)), _fmt(0.0), _fmt(1.0)]
                dequant_row = [*head, "Dequant", entry.kind, *map(_fmt, tensor_stats(dequant)), _fmt(clip),
                               _fmt(cos)]
                if entry.kind == "Weight":
                    weight_rows[number] = (origin_row, dequant_row, cos, clip)
                if histograms:
                    entry.histogram = _histogram(origin, dequant)
            writer.writerow(origin_row)
            writer.writerow(dequant_row)
            entry.add(cos, clip)


def _comparable(origin: np.ndarray, dequant: np.ndarray) -> bool:
    return (origin.size == dequant.size and np.issubdtype(origin.dtype, np.floating)
            and np.issubdtype(dequant.dtype, np.floating))


def _write_params(path: Path, result: ConversionResult) -> Path:
    """One row per channel of every quantized tensor; parameters a pass did not record stay empty."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PARAM_HEADER)
        for q in result.quantized:
            columns = [q.scale, q.zero_point, q.correction_var, q.correction_mean]
            arrays = [np.asarray(c).ravel() if c is not None else None for c in columns]
            channels = max([a.size for a in arrays if a is not None] or [1])
            dims = "[" + " ".join(str(d) for d in q.shape) + "]"
            elements = int(np.prod(q.shape)) if q.shape else 1
            for c in range(channels):
                values = ["" if a is None or a.size == 0 else _fmt(float(a[c if a.size > 1 else 0])) for a in arrays]
                if arrays[1] is not None and arrays[1].size:  # zero points are integers
                    values[1] = str(int(arrays[1][c if arrays[1].size > 1 else 0]))
                writer.writerow([";".join(q.nodes), q.op_type, q.tensor, elements, dims, values[0], values[1],
                                 q.bits, values[2], values[3]])
    return path


def _write_notes(path: Path, report: DebugReport, notes: list[str]) -> Path:
    lines = [f"rounds: {report.rounds} (round_<i>.csv, i from 0)",
             "Var is the population standard deviation (the column name follows the reference).",
             ("Each tensor appears once: quantized weights as the Input of the node that reads them, graph inputs "
              "as the Input of their first consumer, other activations as the Output of the node that makes them."),
             *notes]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- HTML


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _histogram(origin: np.ndarray, dequant: np.ndarray):
    both = np.concatenate([np.asarray(origin, np.float64).ravel(), np.asarray(dequant, np.float64).ravel()])
    both = both[np.isfinite(both)]
    if both.size == 0:
        return None
    edges = np.histogram_bin_edges(both, bins=_HIST_BINS)

    def counts(x):
        x = np.asarray(x, np.float64).ravel()
        return np.histogram(x[np.isfinite(x)], bins=edges)[0]

    return edges, counts(origin), counts(dequant)


def _histograms_png(entries: list[_Entry]) -> str:
    """One PNG (base64) with a float-vs-quantized histogram per entry, two per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = (len(entries) + 1) // 2
    fig = Figure(figsize=(10, 2.4 * rows), dpi=72)
    FigureCanvasAgg(fig)
    for number, entry in enumerate(entries, 1):
        edges, origin, dequant = entry.histogram
        ax = fig.add_subplot(rows, 2, number)
        ax.stairs(origin, edges, label="float", fill=True, alpha=0.5)
        ax.stairs(dequant, edges, label="quantized", linewidth=1.2)
        ax.set_yscale("symlog")
        ax.set_title(f"{entry.tensor} (cos {entry.mean_cos:.4f})", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")  # "best" placement is slow
        ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.25 / rows, bottom=0.3 / rows, hspace=0.6, wspace=0.15)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_SORT_JS = """
function sortTable(th) {
  const table = th.closest('table'), col = th.cellIndex, body = table.tBodies[0];
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  const key = td => { const v = parseFloat(td.textContent); return isNaN(v) ? td.textContent : v; };
  [...body.rows].sort((a, b) => {
    const x = key(a.cells[col]), y = key(b.cells[col]);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  }).forEach(r => body.appendChild(r));
}
"""


def _table(header: Iterable[str], rows: Iterable[Iterable], sortable: bool = False) -> str:
    click = ' onclick="sortTable(this)"' if sortable else ""
    head = "".join(f"<th{click}>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _write_html(path: Path, report: DebugReport, result: ConversionResult, notes: list[str]) -> Path:
    plan = {q.tensor: q for q in result.quantized}
    ranked = sorted((e for e in report.entries if e.rounds), key=lambda e: (e.mean_cos, e.tensor))
    layer_rows = []
    for e in ranked:
        q = plan.get(e.tensor)
        layer_rows.append((e.node, e.op_type, e.tensor, e.kind, f"{e.mean_cos:.6f}", f"{e.cos_min:.6f}",
                           f"{e.clip_sum / e.rounds:.6f}", q.bits if q else "", q.scheme if q else ""))
    outputs: dict[str, list[float]] = {}
    for _, name, cos in report.output_cosines:
        outputs.setdefault(name, []).append(cos)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ptqlite debug report</title>",
        ("<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse;margin-bottom:1em}"
         "td,th{border:1px solid #ccc;padding:2px 6px}th{cursor:pointer;background:#eee}</style>"),
        f"<script>{_SORT_JS}</script></head><body>",
        f"<h1>{html.escape(result.quant_type)} debug report</h1>",
        (f"<p>{report.rounds} round(s). Cosine similarity of each tensor to the float model, averaged over "
         "rounds; click a column header to sort.</p>"),
        "<h2>Graph outputs</h2>",
        _table(("TensorName", "mean cosine", "min cosine"),
               ((n, f"{np.mean(c):.6f}", f"{np.min(c):.6f}") for n, c in outputs.items())),
        "<h2>Tensors</h2>",
        _table(("NodeName", "NodeType", "TensorName", "Kind", "mean cosine", "min cosine", "mean clip", "bits",
                "scheme"), layer_rows, sortable=True),
    ]
    worst = [e for e in ranked if e.histogram is not None][:HISTOGRAM_LAYERS]
    if worst and _have_matplotlib():
        parts.append("<h2>Float vs quantized values of the worst tensors (round 0)</h2>")
        parts.append(f"<img alt='histograms' src='data:image/png;base64,{_histograms_png(worst)}'>")
    elif HISTOGRAM_LAYERS and not _have_matplotlib():
        parts.append("<p>Histograms need matplotlib: pip install 'ptqlite[report]'.</p>")
    parts += [
        "<h2>Plan</h2>",
        _table(("TensorName", "OpType", "Nodes", "Bits", "Scheme", "Storage", "Bytes before", "Bytes after",
                "Relative error"),
               ((q.tensor, q.op_type, ", ".join(q.nodes), q.bits, q.scheme, q.storage, q.bytes_before,
                 q.bytes_after, f"{q.relative_error:.6f}") for q in result.quantized), sortable=True),
        "<h2>Skipped</h2>",
        _table(("TensorName", "OpType", "Nodes", "Reason"),
               ((s.tensor, s.op_type, ", ".join(s.nodes), s.reason) for s in result.skipped)),
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts))
    return path


def debug_report(float_model: onnx.ModelProto, result: ConversionResult, config: QuantConfig,
                 input_format: str | None = None,
                 samples: Iterable[dict[str, np.ndarray]] | None = None,
                 folder: str | Path | None = None) -> DebugReport:
    """The convert() hook: reports for `result` on `samples` when convert() was given them (Python API), else on
    the config's calibration data, else on one synthetic sample. Written into `folder` (default:
    debug_info_save_path; convert() passes a temp folder that it moves into place once all is written)."""
    notes: list[str] = []
    inputs = samples if samples is not None else report_inputs(float_model, config, input_format, notes)
    result.notes += [n for n in notes if n not in result.notes]
    return write_reports(folder or config.common.debug_info_save_path, float_model, result.model, result, inputs,
                         notes)


def is_report_file(name: str) -> bool:
    """Files of an earlier run that a new report replaces even when it does not write them (fewer rounds)."""
    return re.fullmatch(r"round_\d+\.csv", name) is not None

"""Inline SVG for report.html (no plotting dependency): cosine along the graph and float-vs-quantized histograms."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

_ACCUMULATED, _LOCAL, _FLOAT, _WORST = "#1f77b4", "#ff7f0e", "#9ecae1", "#d62728"


def _axis_bottom(values: Sequence[float]) -> float:
    """A round lower bound for cosines near 1 (1 - 10^-k steps), so small differences stay visible."""
    low = min([v for v in values if math.isfinite(v)] or [1.0])
    if low >= 1.0:
        return 0.999
    if low <= 0:
        return min(low, 0.0) if low < 0 else 0.0
    gap = 1.0 - low
    step = 10 ** math.floor(math.log10(gap))
    return max(1.0 - math.ceil(gap / step) * step, -1.0)


def cosine_plot(labels: Sequence[str], numbers: Sequence[int], accumulated: Sequence[float],
                local: Sequence[float], worst: set[int], width: int = 960, height: int = 300) -> str:
    """Accumulated and local cosine of each tensor in graph order; the points at `worst` (indices) are marked
    with their `numbers`. Each point has a tooltip (number, label, both cosines)."""
    count = len(labels)
    if not count:
        return ""
    left, right, top, bottom = 60, 10, 14, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    y0 = _axis_bottom([*accumulated, *local])

    def x(i: int) -> float:
        return left + (plot_w * i / (count - 1) if count > 1 else plot_w / 2)

    def y(v: float) -> float:
        v = min(max(v, y0), 1.0) if math.isfinite(v) else y0
        return top + plot_h * (1.0 - v) / (1.0 - y0)

    parts = [(f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             "font-family='sans-serif' font-size='10' role='img' aria-label='cosine along the graph'>"),
             f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='#fafafa' stroke='#ccc'/>"]
    for k in range(5):
        v = y0 + (1.0 - y0) * k / 4
        parts.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{y(v):.1f}' y2='{y(v):.1f}' stroke='#e5e5e5'/>")
        parts.append(f"<text x='{left - 4}' y='{y(v) + 3:.1f}' text-anchor='end'>{v:.6g}</text>")
    parts.append(f"<text x='{left + plot_w / 2}' y='{height - 6}' text-anchor='middle'>activations in graph "
                 "order (numbers: the table's # column)</text>")
    for values, colour, name in ((accumulated, _ACCUMULATED, "accumulated"), (local, _LOCAL, "local")):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if math.isfinite(v))
        if points:
            parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.3' points='{points}'>"
                         f"<title>{name} cosine</title></polyline>")
    for i, label in enumerate(labels):
        tip = html.escape(f"{numbers[i]}. {label}: accumulated {accumulated[i]:.6f}, local {local[i]:.6f}")
        mark = i in worst
        radius, colour = (4, _WORST) if mark else (2, _LOCAL)
        v = local[i] if math.isfinite(local[i]) else accumulated[i]
        parts.append(f"<circle cx='{x(i):.1f}' cy='{y(v):.1f}' r='{radius}' fill='{colour}'><title>{tip}"
                     "</title></circle>")
        if mark:
            parts.append(f"<text x='{x(i) + 5:.1f}' y='{y(v) + 3:.1f}' fill='{_WORST}'>{numbers[i]}</text>")
    parts.append(f"<g transform='translate({left + 8},{top + 12})'>"
                 f"<line x1='0' x2='16' y1='-3' y2='-3' stroke='{_ACCUMULATED}' stroke-width='2'/>"
                 "<text x='20' y='0'>accumulated (every node quantized)</text>"
                 f"<line x1='200' x2='216' y1='-3' y2='-3' stroke='{_LOCAL}' stroke-width='2'/>"
                 "<text x='220' y='0'>local (this node alone, float inputs)</text>"
                 f"<circle cx='408' cy='-3' r='4' fill='{_WORST}'/><text x='415' y='0'>worst local</text></g>")
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(title: str, edges: np.ndarray, origin: np.ndarray, dequant: np.ndarray,
                  width: int = 460, height: int = 170) -> str:
    """Float (filled) and quantized (outline) value counts on shared bins, counts on a log scale."""
    left, right, top, bottom = 8, 8, 18, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = math.log1p(float(max(origin.max(initial=0), dequant.max(initial=0)))) or 1.0
    bins = len(origin)

    def bar_y(count: float) -> float:
        return top + plot_h * (1 - math.log1p(float(count)) / peak)

    step = plot_w / bins
    parts = [(f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
             "font-size='10'>"),
             f"<text x='{left}' y='12'>{html.escape(title)}</text>"]
    for i, count in enumerate(origin):
        if count:
            parts.append(f"<rect x='{left + i * step:.1f}' y='{bar_y(count):.1f}' width='{step:.1f}' "
                         f"height='{top + plot_h - bar_y(count):.1f}' fill='{_FLOAT}'/>")
    outline = [f"{left:.1f},{top + plot_h:.1f}"]
    for i, count in enumerate(dequant):
        level = bar_y(count)
        outline += [f"{left + i * step:.1f},{level:.1f}", f"{left + (i + 1) * step:.1f},{level:.1f}"]
    outline.append(f"{left + plot_w:.1f},{top + plot_h:.1f}")
    parts.append(f"<polyline fill='none' stroke='{_WORST}' stroke-width='1' points='{' '.join(outline)}'/>")
    parts.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{top + plot_h}' y2='{top + plot_h}' stroke='#999'/>")
    parts.append(f"<text x='{left}' y='{height - 6}'>{edges[0]:.4g}</text>")
    parts.append(f"<text x='{left + plot_w}' y='{height - 6}' text-anchor='end'>{edges[-1]:.4g}</text>")
    parts.append(f"<text x='{left + plot_w / 2}' y='{height - 6}' text-anchor='middle'>float (filled) vs "
                 "quantized (line), log counts</text>")
    parts.append("</svg>")
    return "".join(parts)

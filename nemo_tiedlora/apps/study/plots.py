"""The study's two plots, drawn with matplotlib's Agg canvas (no pyplot, no display, no global state).

Both take one :class:`Panel` per task and return PNG bytes; :mod:`nemo_tiedlora.apps.study.report` builds the panels
from a results file and writes the files. Every preset keeps one color and marker in both plots; LoRA, the
reference, is black, larger and drawn on top.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Panel", "metric_vs_params_png", "metric_vs_rank_png"]

_DPI = 150
_MAX_COLUMNS = 3
_LORA = "lora"
_COLORS = {"lora": "black", "vera": "#7f7f7f", "tl1": "#1f77b4", "tl2": "#ff7f0e", "tl3": "#2ca02c"}
_COLORS |= {"tl4": "#d62728", "tl5": "#9467bd", "tl6": "#17becf"}
_MARKERS = {"lora": "s", "vera": "v", "tl1": "o", "tl2": "^", "tl3": "D", "tl4": "P", "tl5": "X", "tl6": "*"}
_LABELS = {"lora": "LoRA", "vera": "VeRA"} | {f"tl{n}": f"TL{n}" for n in range(1, 7)}
_EXTRA_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#393b79")


@dataclass(frozen=True)
class Panel:
    """One task's data.

    Attributes:
        title: panel title (the task).
        ylabel: y-axis label (the metric's name).
        series: preset -> rank -> (trainable parameters, metric); presets in legend order.
    """

    title: str
    ylabel: str
    series: Mapping[str, Mapping[int, tuple[int, float]]]


def metric_vs_rank_png(panels: Sequence[Panel]) -> bytes:
    """PNG: per panel, the metric against the rank (log2 axis, ticks at the ranks), one line per preset."""
    figure, axes = _figure(len(panels), "Metric vs. rank")
    for ax, panel in zip(axes[: len(panels)], panels):
        for index, (preset, points) in enumerate(panel.series.items()):
            ranks = sorted(points)
            ax.plot(ranks, [points[rank][1] for rank in ranks], **_style(preset, index))
        all_ranks = sorted({rank for points in panel.series.values() for rank in points})
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ranks, [str(rank) for rank in all_ranks])
        ax.minorticks_off()
        _label(ax, panel, xlabel="rank r (log2 scale)")
    return _finish(figure, axes, len(panels))


def metric_vs_params_png(panels: Sequence[Panel]) -> bytes:
    """PNG: per panel, the metric against trainable parameters (log axis), markers labelled with their rank.

    A faint line joins each preset's points in rank order, so a cluster can be read preset by preset.
    """
    figure, axes = _figure(len(panels), "Metric vs. trainable parameters")
    for ax, panel in zip(axes[: len(panels)], panels):
        for index, (preset, points) in enumerate(panel.series.items()):
            style = _style(preset, index)
            ranks = sorted(points)
            x, y = [points[rank][0] for rank in ranks], [points[rank][1] for rank in ranks]
            ax.plot(x, y, color=style["color"], linewidth=0.8, alpha=0.35, zorder=1)
            ax.plot(x, y, linestyle="none", markeredgecolor="black" if preset == _LORA else "white", **style)
            for rank, params, metric in zip(ranks, x, y):
                ax.annotate(f"r{rank}", (params, metric), xytext=(4, 4), textcoords="offset points", fontsize=7)
        ax.set_xscale("log")
        _label(ax, panel, xlabel="trainable parameters (log scale)")
    return _finish(figure, axes, len(panels))


def _style(preset: str, index: int) -> dict[str, Any]:
    """Color, marker, sizes and legend label of a preset."""
    lora, marker = preset == _LORA, _MARKERS.get(preset, "o")
    return {
        "color": _COLORS.get(preset, _EXTRA_COLORS[index % len(_EXTRA_COLORS)]),
        "marker": marker,
        "markersize": 9 if lora else (11 if marker == "*" else 8),
        "linewidth": 2.6 if lora else 1.6,
        "zorder": 3 if lora else 2,
        "label": _LABELS.get(preset, preset),
    }


def _figure(count: int, title: str) -> tuple[Figure, list[Axes]]:
    """A titled figure with ``count`` panels, at most three per row, and the legend's place.

    Returns the figure and its axes: ``count`` panels, then the spare cells of the last row (hidden), whose first
    :func:`_finish` uses for the legend.
    """
    columns = min(max(count, 1), _MAX_COLUMNS)
    rows = math.ceil(max(count, 1) / columns)
    figure = Figure(figsize=(5.2 * columns + 1.8, 4.2 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for spare in axes[count:]:
        spare.set_axis_off()
    figure.suptitle(f"{title}\n(best learning rate per preset and rank)", fontsize=13)
    return figure, axes


def _label(ax: Axes, panel: Panel, *, xlabel: str) -> None:
    ax.set_title(panel.title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(panel.ylabel)


def _finish(figure: Figure, axes: Sequence[Axes], count: int) -> bytes:
    """Grid on the ``count`` panels, one legend (every preset once) in a spare cell or right of the panels."""
    handles: dict[str, Any] = {}
    for ax in axes[:count]:
        ax.grid(True, which="major", alpha=0.45)
        ax.grid(True, which="minor", alpha=0.15)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    legend = {"title": "preset", "fontsize": 11, "title_fontsize": 11}
    if len(axes) > count:
        axes[count].legend(list(handles.values()), list(handles), loc="center", ncols=2, **legend)
    else:
        figure.legend(list(handles.values()), list(handles), loc="outside right center", **legend)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()

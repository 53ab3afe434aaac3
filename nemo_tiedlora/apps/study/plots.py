"""The study's three plots, drawn with matplotlib's Agg canvas (no pyplot, no display, no global state).

:func:`metric_vs_rank_png` and :func:`metric_vs_params_png` take one :class:`Panel` per task;
:func:`metric_vs_lr_png` takes one row of :class:`LrPanel` per task (one panel per preset). Each returns PNG bytes;
:mod:`nemo_tiedlora.apps.study.report` builds the panels from results files and writes the files. The ``*_figure``
functions return the drawn figure before it is saved. Every preset keeps one color and marker in all plots; LoRA,
the reference, is black, larger and drawn on top. A cell averaged over two or more seeds has an error bar of one
sample standard deviation. The log axes of parameters and learning rates label a few chosen ticks, spaced so that
their labels never overlap (the minor ticks stay, unlabelled).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import blended_transform_factory, offset_copy

__all__ = [
    "BestRate",
    "LrPanel",
    "Panel",
    "metric_vs_lr_figure",
    "metric_vs_lr_png",
    "metric_vs_params_figure",
    "metric_vs_params_png",
    "metric_vs_rank_figure",
    "metric_vs_rank_png",
]

_DPI = 150
_MAX_COLUMNS = 3
_LORA = "lora"
_COLORS = {"lora": "black", "vera": "#7f7f7f", "tl1": "#1f77b4", "tl2": "#ff7f0e", "tl3": "#2ca02c"}
_COLORS |= {"tl4": "#d62728", "tl5": "#9467bd", "tl6": "#17becf"}
_MARKERS = {"lora": "s", "vera": "v", "tl1": "o", "tl2": "^", "tl3": "D", "tl4": "P", "tl5": "X", "tl6": "*"}
_LABELS = {"lora": "LoRA", "vera": "VeRA"} | {f"tl{n}": f"TL{n}" for n in range(1, 7)}
_EXTRA_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#393b79")
_RANK_STYLES = ("-", "--", ":", "-.")
_BEST_COLOR = "#d62728"
_DODGE = 0.05  # octaves between neighbouring presets at one rank in the rank plot
_RANK_MARGIN = 2.0**0.5  # half an octave of room left of the lowest rank and right of the highest
_MIN_TICK_GAP = 1 / 5  # labelled log ticks lie at least this fraction of the axis width apart


@dataclass(frozen=True)
class Panel:
    """One task's data.

    Attributes:
        title: panel title (the task).
        ylabel: y-axis label (the metric's name).
        series: preset -> rank -> (trainable parameters, metric); presets in legend order.
        errors: preset -> rank -> sample standard deviation over seeds, for the cells averaged over >= 2 seeds.
    """

    title: str
    ylabel: str
    series: Mapping[str, Mapping[int, tuple[int, float]]]
    errors: Mapping[str, Mapping[int, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class BestRate:
    """The rate chosen for one rank: ``lr``, the ``mean`` and sample ``std`` (None under 2 seeds) over ``seeds``
    seeds there, and ``edge`` ("lowest"/"highest" when it is the edge of the rates tried, else "")."""

    lr: float
    mean: float
    std: float | None
    seeds: int
    edge: str = ""


@dataclass(frozen=True)
class LrPanel:
    """One (task, preset)'s learning-rate curve.

    Attributes:
        title: panel title (task and preset).
        ylabel: y-axis label (the metric's name).
        preset: the preset (its color and marker).
        curves: rank -> [(lr, metric)] of the runs on the grid's seed, ascending lr.
        best: rank -> the chosen rate and the seeds' mean and spread there.
    """

    title: str
    ylabel: str
    preset: str
    curves: Mapping[int, Sequence[tuple[float, float]]]
    best: Mapping[int, BestRate]


def metric_vs_rank_png(panels: Sequence[Panel]) -> bytes:
    """PNG of :func:`metric_vs_rank_figure`."""
    return _png(metric_vs_rank_figure(panels))


def metric_vs_params_png(panels: Sequence[Panel]) -> bytes:
    """PNG of :func:`metric_vs_params_figure`."""
    return _png(metric_vs_params_figure(panels))


def metric_vs_lr_png(rows: Sequence[Sequence[LrPanel]]) -> bytes:
    """PNG of :func:`metric_vs_lr_figure`."""
    return _png(metric_vs_lr_figure(rows))


def metric_vs_rank_figure(panels: Sequence[Panel]) -> Figure:
    """Per panel, the metric against the rank (log2 axis, ticks at the ranks), one line per preset, error bars
    where a cell has >= 2 seeds; the presets are set a little apart around each rank (:data:`_DODGE`)."""
    figure, axes = _figure(len(panels), "Metric vs. rank")
    for ax, panel in zip(axes[: len(panels)], panels):
        for index, (preset, points) in enumerate(panel.series.items()):
            style = _style(preset, index)
            ranks = sorted(points)
            shift = 2.0 ** (_DODGE * (index - (len(panel.series) - 1) / 2))  # error bars side by side, not on top
            x = {rank: rank * shift for rank in ranks}
            ax.plot([x[rank] for rank in ranks], [points[rank][1] for rank in ranks], **style)
            _error_bars(ax, panel.errors.get(preset, {}), {rank: (x[rank], points[rank][1]) for rank in ranks}, style)
        all_ranks = sorted({rank for points in panel.series.values() for rank in points})
        ax.set_xlim(all_ranks[0] / _RANK_MARGIN, all_ranks[-1] * _RANK_MARGIN)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ranks, [str(rank) for rank in all_ranks])
        ax.minorticks_off()
        _label(ax, panel, xlabel="rank r (log2 scale)")
    _finish(figure, axes, len(panels))
    return figure


def metric_vs_params_figure(panels: Sequence[Panel]) -> Figure:
    """Per panel, the metric against trainable parameters (log axis), markers labelled with their rank, error bars
    where a cell has >= 2 seeds.

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
            _error_bars(ax, panel.errors.get(preset, {}), dict(zip(ranks, zip(x, y))), style)
            for rank, params, metric in zip(ranks, x, y):
                ax.annotate(f"r{rank}", (params, metric), xytext=(4, 4), textcoords="offset points", fontsize=7)
        _log_x(ax, [params for points in panel.series.values() for params, _ in points.values()])
        _log_ticks(ax, _params_candidates, _count)
        _label(ax, panel, xlabel="trainable parameters (log scale)")
    _finish(figure, axes, len(panels))
    return figure


def metric_vs_lr_figure(rows: Sequence[Sequence[LrPanel]]) -> Figure:
    """One row of panels per task, one panel per preset: the metric of the grid seed's runs against the learning
    rate (log axis, one line per rank), the chosen rate marked (dotted line) with the seeds' mean and standard
    deviation there (red diamond and error bar), and a note when it is the edge of the rates tried."""
    columns = max((len(row) for row in rows), default=1) or 1
    figure = Figure(figsize=(4.2 * columns + 0.4, 3.6 * max(len(rows), 1) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(max(len(rows), 1), columns, squeeze=False, sharey="row")
    figure.suptitle("Metric vs. learning rate (runs on the grid's seed; red: the chosen rate, mean ± std over "
                    "its seeds)", fontsize=12)
    for row, axes in zip(rows, grid):
        for ax, panel in zip(axes, row):
            _lr_panel(ax, panel)
        for spare in axes[len(row):]:
            spare.set_axis_off()
    for axes in grid[len(rows):]:
        for spare in axes:
            spare.set_axis_off()
    return figure


def _lr_panel(ax: Axes, panel: LrPanel) -> None:
    """Draw one :class:`LrPanel`: the curves, the chosen rates and the edge note."""
    style = _style(panel.preset, 0)
    several = len(panel.curves) > 1
    for index, (rank, points) in enumerate(sorted(panel.curves.items())):
        lrs, metrics = [lr for lr, _ in points], [metric for _, metric in points]
        ax.plot(lrs, metrics, color=style["color"], marker=style["marker"], markersize=7,
                linestyle=_RANK_STYLES[index % len(_RANK_STYLES)], label=f"r={rank}, grid seed" if several else
                "grid seed")
    along_line = blended_transform_factory(ax.transData, ax.transAxes)
    beside = {"highest": offset_copy(along_line, ax.figure, x=-3, units="points"),
              "lowest": offset_copy(along_line, ax.figure, x=3, units="points")}
    for rank, best in sorted(panel.best.items()):
        which = f"r={rank} " if several else ""
        ax.axvline(best.lr, color=_BEST_COLOR, linestyle=":", linewidth=1.0, zorder=1)
        spread = f" ± std, {best.seeds} seeds" if best.std is not None else ", 1 seed"
        ax.errorbar([best.lr], [best.mean], yerr=[best.std or 0.0], fmt="D", color=_BEST_COLOR, markersize=6,
                    capsize=4, zorder=4, label=f"{which}chosen rate: mean{spread}")
        if best.edge:
            note = f"{which}best at the edge of the rates tried ({best.edge})"
            ax.text(best.lr, 0.5, note, transform=beside[best.edge], rotation=90, fontsize=7, color=_BEST_COLOR,
                    va="center", ha="right" if best.edge == "highest" else "left")
    rates = sorted({lr for points in panel.curves.values() for lr, _ in points})
    _log_x(ax, rates)
    _log_ticks(ax, lambda lo, hi: [[rate for rate in rates if lo <= rate <= hi]], _lr_text)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(panel.ylabel, fontsize=9)
    ax.grid(True, which="major", alpha=0.45)
    ax.legend(fontsize=7, loc="best")


def _error_bars(ax: Axes, errors: Mapping[int, float], points: Mapping[int, tuple[float, float]],
                style: Mapping[str, Any]) -> None:
    """Error bars (one standard deviation) at the ``points`` (rank -> (x, y)) that have an error."""
    ranks = [rank for rank in points if rank in errors]
    if ranks:
        ax.errorbar([points[r][0] for r in ranks], [points[r][1] for r in ranks], yerr=[errors[r] for r in ranks],
                    fmt="none", ecolor=style["color"], elinewidth=1.2, capsize=4, zorder=style["zorder"])


def _log_x(ax: Axes, values: Sequence[float]) -> None:
    """A log x-axis; around a single value, a factor of 3 each side (matplotlib would warn and guess)."""
    if values and min(values) == max(values):
        ax.set_xlim(values[0] / 3, values[0] * 3)
    ax.set_xscale("log")


def _params_candidates(lo: float, hi: float) -> list[list[float]]:
    """Tick candidates for a parameter axis, coarse to fine: decades, then 1-2-5, then every 1..9 x 10^k."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    return [[m * 10.0**k for k in decades for m in mantissas if lo <= m * 10.0**k <= hi]
            for mantissas in ((1,), (1, 2, 5), range(1, 10))]


def _log_ticks(ax: Axes, candidates: Any, text: Any) -> None:
    """Label a few ticks of the log x-axis, spaced >= :data:`_MIN_TICK_GAP` of the axis width apart.

    ``candidates(lo, hi)`` gives lists of tick values, coarse to fine; the values of each list are taken coarse
    ones first (:func:`_spaced`); the first list that gives >= 3 labels is used, else the one that gives most.
    ``text(value)`` writes a label. Minor ticks stay, unlabelled.
    """
    lo, hi = sorted(ax.get_xlim())
    gap = (math.log10(hi) - math.log10(lo)) * _MIN_TICK_GAP
    chosen: list[float] = []
    earlier: list[float] = []
    for values in candidates(lo, hi):
        earlier += [value for value in values if value not in earlier]
        kept = _spaced(earlier, gap)
        if len(kept) > len(chosen):
            chosen = kept
        if len(chosen) >= 3:
            break
    ax.set_xticks(chosen, [text(value) for value in chosen])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)


def _spaced(values: Iterable[float], gap: float) -> list[float]:
    """The ``values`` (positive; in order of preference) kept greedily when >= ``gap`` decades from every value
    kept before; ascending."""
    kept: list[float] = []
    for value in values:
        if all(abs(math.log10(value) - math.log10(other)) >= gap for other in kept):
            kept.append(value)
    return sorted(kept)


def _count(value: float) -> str:
    """``40k``, ``1.2M``, ``500``: a parameter count in a few characters."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _lr_text(value: float) -> str:
    """``5e-4``, ``2.5e-3``: a learning rate as written in configs."""
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


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
    figure.suptitle(f"{title}\n(best learning rate per preset and rank; error bars: std over seeds)", fontsize=13)
    return figure, axes


def _label(ax: Axes, panel: Panel, *, xlabel: str) -> None:
    ax.set_title(panel.title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(panel.ylabel)


def _finish(figure: Figure, axes: Sequence[Axes], count: int) -> None:
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


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()

"""The study report: Table-2-style markdown tables, a headline and three plots from a sweep's results files.

``python -m nemo_tiedlora report results.csv [more.csv ...] --out DIR`` reads one row per run (CSV with a header, or
a JSON list of objects) with at least the columns of :data:`REQUIRED_COLUMNS`; several files (one per task, say)
are reported together, their rows concatenated. It writes into ``DIR``:

* ``table.md``:

  - a headline per task and rank where both LoRA and TL6 were run: whether TL6's mean comes within
    :data:`WITHIN_POINTS` points of LoRA's, both means with their standard deviation over seeds, the gap, TL6's
    trainable parameters as % of LoRA's at that rank and the number of seeds, and which best rate is at the edge of
    the rates tried; with two or more ranks, the same for TL6's best mean over ranks against LoRA's;
  - per task, one row per preset (LoRA first) and one column per rank; a cell is the preset's best metric over
    learning rates at that rank and its trainable parameters as % of the task's best LoRA run (``88.10 (12.5%)``);
    the best cell of each rank is bold. When the sweep reran the best learning rate of a (preset, rank) with more
    seeds (rows with ``seed_rerun`` true), the learning rate is still chosen on the grid's seed alone, and the cell
    is the mean over the seeds at that rate with the sample standard deviation (``90.62 ± 4.42 (11.2%)``). A
    second table gives the learning rate of each cell, and a list gives each seed's metric; the base model's
    metric without an adapter follows the first table when a ``base.json`` lies beside the results file;
  - per task and rank, a table of the presets' chosen rate, number of seeds, mean, standard deviation, min and
    max over seeds, trainable parameters and their % of the best LoRA run at that same rank. A rate is "best at
    the edge of the rates tried" when it is the lowest or highest of the two or more rates that (preset, rank)
    tried on the grid's seed (every such row counts, failed ones too, as the sweep counts them).
* ``metric_vs_rank.png``: the metric against the rank (log2 axis), one line per preset, one panel per task.
* ``metric_vs_params.png``: the metric against trainable parameters (log axis), one marker series per preset.
* ``metric_vs_lr.png``: per task (row) and preset (column), the metric of the grid seed's runs against the learning
  rate (log axis) at the task's grid ranks (those where some preset tried two or more rates; one line per rank),
  the chosen rate marked with the seeds' mean and standard deviation there.

Cells averaged over two or more seeds have error bars of one standard deviation in the rank and parameter plots.
Only runs whose ``status`` is in :data:`OK_STATUSES` count; the others are listed under the table.
``percent_of_best_lora``, when absent or empty, is ``trainable_params`` / ``trainable_params`` of the task's
best-metric LoRA run * 100. An optional ``metric_name`` column names the metric; otherwise the task registry does.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from nemo_tiedlora.core.config import PRESETS
from nemo_tiedlora.apps.study.plots import (
    BestRate,
    LrPanel,
    Panel,
    metric_vs_lr_png,
    metric_vs_params_png,
    metric_vs_rank_png,
)
from nemo_tiedlora.apps.study.report_rows import (OK_STATUSES, REQUIRED_COLUMNS, ReportError, Run,
                                                  read_base_metrics, read_results)
from nemo_tiedlora.apps.study.sweep_results import rate_edge
from nemo_tiedlora.apps.study.tasks import TASKS
from nemo_tiedlora.apps.study.tasks.base import atomic_write_bytes

__all__ = [
    "OK_STATUSES",
    "OUTPUTS",
    "REQUIRED_COLUMNS",
    "ReportError",
    "Run",
    "Spread",
    "WITHIN_POINTS",
    "add_percent_of_best_lora",
    "add_report_parser",
    "best_runs",
    "build_report",
    "format_table",
    "headlines",
    "rate_edges",
    "read_results",
    "spread",
]

WITHIN_POINTS = 2.0
"""The headline asks whether TL6's mean over seeds comes within this many points of the best LoRA's."""

_LORA = "lora"
_TL6 = "tl6"
_EDGE_NOTE = "best at the edge of the rates tried"
_EXIT_USAGE = 2

Key = tuple[str, str, int]  # (task, preset, rank)
K = TypeVar("K")


# --------------------------------------------------------------------------------------------------


def _higher_is_better(task: str) -> bool:
    return TASKS[task].higher_is_better if task in TASKS else True


def _metric_name(task: str, runs: Iterable[Run]) -> str:
    named = next((run.metric_name for run in runs if run.task == task and run.metric_name), "")
    return named or (TASKS[task].metric_name if task in TASKS else "metric")


def _better(run: Run, other: Run) -> bool:
    """Whether ``run`` has a strictly better metric than ``other`` (same task); on a tie, a strictly lower best
    validation loss (where both have one), as the sweep breaks ties when it picks the rate to rerun."""
    if run.metric == other.metric and run.best_val_loss is not None and other.best_val_loss is not None:
        return run.best_val_loss < other.best_val_loss
    return run.metric > other.metric if _higher_is_better(run.task) else run.metric < other.metric


def _best_by(runs: Iterable[Run], key: Callable[[Run], K]) -> dict[K, Run]:
    """key -> the finished run with the best metric among the runs with that key (ties: the lower best validation
    loss, then the first one)."""
    best: dict[K, Run] = {}
    for run in runs:
        group = key(run)
        if run.ok and (group not in best or _better(run, best[group])):
            best[group] = run
    return best


def add_percent_of_best_lora(runs: Sequence[Run]) -> list[Run]:
    """``runs`` with ``percent_of_best_lora`` filled where it is None (kept where the file gave it).

    The reference is the task's finished LoRA run with the best metric; without one the value stays None.
    """
    reference = _best_by((run for run in runs if run.preset == _LORA), lambda run: run.task)
    filled = []
    for run in runs:
        base = reference.get(run.task)
        if run.percent_of_best_lora is None and base is not None and base.trainable_params > 0:
            run = replace(run, percent_of_best_lora=100.0 * run.trainable_params / base.trainable_params)
        filled.append(run)
    return filled


def best_runs(runs: Iterable[Run]) -> dict[Key, Run]:
    """(task, preset, rank) -> the finished run with the best metric over learning rates (ties as :func:`_best_by`).

    The rate is chosen among the grid's runs (not ``seed_rerun``); when reruns of that rate with other seeds
    finished, the returned run's ``metric`` is the mean over all its seeds and ``seed_metrics`` lists them.
    """
    runs = list(runs)
    best = _best_by((run for run in runs if not run.seed_rerun), lambda run: (run.task, run.preset, run.rank))
    for key, run in best.items():
        same = [r for r in runs if r.ok and (r.task, r.preset, r.rank) == key and r.lr == run.lr
                and (r is run or r.seed_rerun)]
        if len(same) > 1:
            best[key] = replace(run, metric=sum(r.metric for r in same) / len(same),
                                seed_metrics=tuple((r.seed, r.metric) for r in same))
    return best


@dataclass(frozen=True)
class Spread:
    """A cell's metric over its seeds: how many, the mean, the sample standard deviation (None under two seeds),
    the lowest and the highest."""

    seeds: int
    mean: float
    std: float | None
    low: float
    high: float


def spread(run: Run) -> Spread:
    """The spread over the seeds a cell of :func:`best_runs` averages (one seed: the run's own metric)."""
    values = [metric for _, metric in run.seed_metrics] or [run.metric]
    std = statistics.stdev(values) if len(values) >= 2 else None
    return Spread(seeds=len(values), mean=run.metric, std=std, low=min(values), high=max(values))


def rate_edges(runs: Iterable[Run], best: Mapping[Key, Run]) -> dict[Key, str]:
    """(task, preset, rank) -> "lowest" or "highest" where the best run's rate is that edge of the two or more
    rates the (preset, rank) tried on the grid's seed (rows not ``seed_rerun``, finished or not); others absent."""
    tried: dict[Key, set[float]] = {}
    for run in runs:
        if not run.seed_rerun and math.isfinite(run.lr):
            tried.setdefault((run.task, run.preset, run.rank), set()).add(run.lr)
    edges = {}
    for key, run in best.items():
        edge = rate_edge(tried.get(key, ()), run.lr)
        if edge is not None:
            edges[key] = edge
    return edges


def _preset_order(presets: Iterable[str]) -> list[str]:
    """LoRA, VeRA, TL1..TL6 in the paper's order, then any other preset alphabetically."""
    known = [preset for preset in PRESETS if preset in set(presets)]
    return known + sorted(set(presets) - set(known))


def _by_task(best: Mapping[Key, Run]) -> dict[str, dict[str, dict[int, Run]]]:
    """task -> preset (paper order) -> rank (ascending) -> best run."""
    tasks: dict[str, dict[str, dict[int, Run]]] = {}
    for (task, preset, rank), run in sorted(best.items(), key=lambda item: (item[0][0], item[0][2])):
        tasks.setdefault(task, {}).setdefault(preset, {})[rank] = run
    return {task: {p: tasks[task][p] for p in _preset_order(tasks[task])} for task in _task_order(tasks)}


def _task_order(tasks: Iterable[str]) -> list[str]:
    """Registry tasks in the paper's order, then any other task alphabetically."""
    known = [task for task in TASKS if task in set(tasks)]
    return known + sorted(set(tasks) - set(known))


def _task_title(task: str) -> str:
    return f"{task} ({TASKS[task].dataset})" if task in TASKS else task


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------


def _lr(value: float) -> str:
    """``1e-4``, ``2.5e-5``: a learning rate as written in configs (``?`` if unknown)."""
    if not math.isfinite(value):
        return "?"
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}%"


def _mean_std(cell: Spread, decimals: int) -> str:
    """``61.11 ± 2.0`` (the standard deviation with ``decimals``), or the mean alone under two seeds."""
    return f"{cell.mean:.2f}" + (f" ± {cell.std:.{decimals}f}" if cell.std is not None else "")


def _seeds(count: int) -> str:
    return f"{count} seed{'' if count == 1 else 's'}"


def headlines(best: Mapping[Key, Run], edges: Mapping[Key, str] | None = None) -> list[str]:
    """One bold sentence per task and rank where both LoRA and TL6 have a cell: whether TL6's mean over seeds comes
    within :data:`WITHIN_POINTS` points of LoRA's (a gap of exactly that counts as within), both means with their
    standard deviations, the gap, TL6's trainable parameters as % of LoRA's, the seeds, and which of the two best
    rates is at the edge of the rates tried (``edges``, see :func:`rate_edges`). Where both have cells at two or
    more ranks, one more sentence compares TL6's best mean over its ranks with LoRA's best."""
    edges = edges or {}
    sentences = []
    for task, presets in _by_task(best).items():
        loras, tl6s = presets.get(_LORA, {}), presets.get(_TL6, {})
        shared = sorted(set(loras) & set(tl6s))
        for rank in shared:
            sentences.append(_headline(task, f"rank {rank}", tl6s[rank], loras[rank], edges))
        if len(shared) >= 2:
            sign = 1.0 if _higher_is_better(task) else -1.0
            tl6 = max((tl6s[r] for r in shared), key=lambda run: sign * spread(run).mean)
            lora = max((loras[r] for r in shared), key=lambda run: sign * spread(run).mean)
            sentences.append(_headline(task, f"best of each over ranks {', '.join(map(str, shared))}", tl6, lora,
                                       edges, ranks=True))
    return sentences


def _headline(task: str, label: str, tl6: Run, lora: Run, edges: Mapping[Key, str], ranks: bool = False) -> str:
    """The bold sentence of :func:`headlines` for one pair of cells (with each one's rank when ``ranks``)."""
    ours, theirs = spread(tl6), spread(lora)
    gap = theirs.mean - ours.mean if _higher_is_better(task) else ours.mean - theirs.mean
    verdict = "is within" if gap <= WITHIN_POINTS else "is not within"
    gap_text = f"gap {gap:.2f} points" if gap >= 0 else f"tl6 ahead by {-gap:.2f} points"
    share = _percent(100.0 * tl6.trainable_params / lora.trainable_params if lora.trainable_params else None)
    seeds = f"{_seeds(ours.seeds)} each" if ours.seeds == theirs.seeds \
        else f"{_seeds(ours.seeds)} for tl6 and {_seeds(theirs.seeds)} for LoRA"
    names = (f"tl6 (rank {tl6.rank})", f"LoRA (rank {lora.rank})") if ranks else ("tl6", "LoRA")
    text = (f"{task}, {label}: {names[0]} {verdict} {WITHIN_POINTS:g} points of {names[1]}: {_mean_std(ours, 1)} "
            f"against {_mean_std(theirs, 1)} ({gap_text}), with {share} of its trainable parameters "
            f"({tl6.trainable_params:,} against {lora.trainable_params:,}), {seeds}")
    at_edge = [f"{name} ({_lr(run.lr)}, the {edges[task, run.preset, run.rank]} rate)"
               for name, run in (("tl6", tl6), ("LoRA", lora)) if (task, run.preset, run.rank) in edges]
    if at_edge:
        text += f"; {_EDGE_NOTE}: " + ", ".join(at_edge)
    return f"**{text}.**"


def _cell(run: Run, winner: Run) -> str:
    """``**90.62** ± 4.42 (11.2%)``: mean (bold if the rank's best), std over >= 2 seeds, % of the best LoRA."""
    value = f"{run.metric:.2f}"
    value = f"**{value}**" if run.metric == winner.metric else value
    std = spread(run).std
    return value + (f" ± {std:.2f}" if std is not None else "") + f" ({_percent(run.percent_of_best_lora)})"


def _spread_table(task: str, rank: int, cells: Mapping[str, Run], edges: Mapping[Key, str]) -> list[str]:
    """Markdown lines: the presets at one task and rank, with the chosen rate (and whether it is at the edge), the
    seeds' count, mean, std, min and max, trainable parameters and % of the best LoRA's at this rank."""
    lora = cells.get(_LORA)
    lines = ["", f"### {task}, rank {rank}: mean and spread over seeds", "",
             f"| preset | lr | seeds | mean | std | min | max | trainable params | % of LoRA r={rank} params |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for preset, run in cells.items():
        cell = spread(run)
        edge = edges.get((task, preset, rank))
        rate = _lr(run.lr) + (f" ({_EDGE_NOTE}: the {edge})" if edge else "")
        share = 100.0 * run.trainable_params / lora.trainable_params if lora and lora.trainable_params else None
        std = f"{cell.std:.2f}" if cell.std is not None else "–"
        lines.append(f"| {preset} | {rate} | {cell.seeds} | {cell.mean:.2f} | {std} | {cell.low:.2f} | "
                     f"{cell.high:.2f} | {run.trainable_params:,} | {_percent(share)} |")
    return lines


def _task_tables(task: str, presets: Mapping[str, Mapping[int, Run]], metric_name: str,
                 edges: Mapping[Key, str], base: float | None = None) -> list[str]:
    """Markdown lines of one task: the metric table, the base model's metric (when measured), the learning-rate
    table, the seeds of each averaged cell and one spread table per rank."""
    ranks = sorted({rank for runs in presets.values() for rank in runs})
    direction = "higher" if _higher_is_better(task) else "lower"
    header = "| preset | " + " | ".join(f"r={rank}" for rank in ranks) + " |"
    rule = "|---|" + "---:|" * len(ranks)
    winners = _best_by((run for runs in presets.values() for run in runs.values()), lambda run: run.rank)
    lines = ["", f"## {_task_title(task)}: {metric_name} ({direction} is better)", "", header, rule]
    for preset, runs in presets.items():
        cells = [_cell(runs[rank], winners[rank]) if rank in runs else "–" for rank in ranks]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    if base is not None:
        lines += ["", f"The base model without an adapter: {base:.2f}."]
    lines += ["", "Learning rate of each cell:", "", header, rule]
    for preset, runs in presets.items():
        cells = [_lr(runs[rank].lr) if rank in runs else "–" for rank in ranks]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    seeded = [(preset, rank, runs[rank]) for preset, runs in presets.items() for rank in ranks
              if rank in runs and runs[rank].seed_metrics]
    if seeded:
        lines += ["", "Seeds averaged in a cell (the rate chosen on the first seed):", ""]
        lines += [f"- {preset} r={rank} lr={_lr(run.lr)}: " + ", ".join(
            f"seed {seed}: {metric:.2f}" for seed, metric in run.seed_metrics) + f" (mean {run.metric:.2f})"
            for preset, rank, run in seeded]
    for rank in ranks:
        lines += _spread_table(task, rank, {p: runs[rank] for p, runs in presets.items() if rank in runs}, edges)
    return lines


def format_table(best: Mapping[Key, Run], *, excluded: Sequence[Run] = (), metric_names: Mapping[str, str],
                 edges: Mapping[Key, str] | None = None, base_metrics: Mapping[str, float] | None = None) -> str:
    """The markdown report: the headlines (:func:`headlines`), then per task a metric table (mean ± std over seeds
    and parameter %), a learning-rate table, the seeds of each cell and a spread table per rank; then the runs
    left out. ``edges`` (see :func:`rate_edges`) marks the rates at the edge of those tried; ``base_metrics`` (task ->
    the base model's metric without an adapter) adds a line per task."""
    edges = edges or {}
    lines = ["# Tied-LoRA study", ""]
    lines.append("Cells: best metric over learning rates (trainable parameters as % of the task's best LoRA run);")
    lines.append("the best cell of each rank is bold; a rate rerun with more seeds shows the mean over its seeds")
    lines.append("± their sample standard deviation.")
    sentences = headlines(best, edges)
    if sentences:
        lines += ["", f"## Headline: does TL6 come within {WITHIN_POINTS:g} points of LoRA?", ""]
        lines += [f"- {sentence}" for sentence in sentences]
    for task, presets in _by_task(best).items():
        lines += _task_tables(task, presets, metric_names[task], edges, (base_metrics or {}).get(task))
    if excluded:
        lines += ["", f"## Runs left out ({len(excluded)}, status not in {', '.join(sorted(OK_STATUSES))})", ""]
        lines += [f"- {r.task} {r.preset} r={r.rank} lr={_lr(r.lr)}: {r.status or '(no status)'}" for r in excluded]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Plots (drawn by nemo_tiedlora.apps.study.plots)
# --------------------------------------------------------------------------------------------------


def _ylabel(task: str, metric_names: Mapping[str, str]) -> str:
    return f"{metric_names[task]} ({'higher' if _higher_is_better(task) else 'lower'} is better)"


def _panels(best: Mapping[Key, Run], *, metric_names: Mapping[str, str]) -> list[Panel]:
    """One plot panel per task: preset -> rank -> (trainable parameters, best metric), and the std over seeds of
    the cells with two or more."""
    return [
        Panel(
            title=_task_title(task),
            ylabel=_ylabel(task, metric_names),
            series={
                preset: {rank: (run.trainable_params, run.metric) for rank, run in runs.items()}
                for preset, runs in presets.items()
            },
            errors={
                preset: {rank: std for rank, run in runs.items() if (std := spread(run).std) is not None}
                for preset, runs in presets.items()
            },
        )
        for task, presets in _by_task(best).items()
    ]


def _lr_panels(runs: Sequence[Run], best: Mapping[Key, Run], edges: Mapping[Key, str], *,
               metric_names: Mapping[str, str]) -> list[list[LrPanel]]:
    """One row per task, one panel per preset: the finished runs on the grid's seed at the task's grid ranks (those
    where some preset tried two or more rates; all its ranks if none did) and the chosen rate of each."""
    grid: dict[Key, list[tuple[float, float]]] = {}
    for run in runs:
        if run.ok and not run.seed_rerun:
            grid.setdefault((run.task, run.preset, run.rank), []).append((run.lr, run.metric))
    rows = []
    for task, presets in _by_task(best).items():
        swept = {key[2] for key, points in grid.items() if key[0] == task and len({lr for lr, _ in points}) >= 2}
        row = []
        for preset, cells in presets.items():
            ranks = [rank for rank in sorted(cells) if (task, preset, rank) in grid and (not swept or rank in swept)]
            if not ranks:
                continue
            chosen = {}
            for rank in ranks:
                cell = spread(cells[rank])
                chosen[rank] = BestRate(lr=cells[rank].lr, mean=cell.mean, std=cell.std, seeds=cell.seeds,
                                        edge=edges.get((task, preset, rank), ""))
            row.append(LrPanel(title=f"{task}: {preset}", ylabel=_ylabel(task, metric_names), preset=preset,
                               curves={rank: sorted(grid[task, preset, rank]) for rank in ranks}, best=chosen))
        if row:
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


OUTPUTS: tuple[str, ...] = ("table.md", "metric_vs_rank.png", "metric_vs_params.png", "metric_vs_lr.png")
"""The files :func:`build_report` writes, in this order."""


def build_report(results: Path | Sequence[Path], out_dir: Path) -> dict[str, Path]:
    """Read ``results`` (one file, or several whose rows are reported together) and write :data:`OUTPUTS`
    atomically into ``out_dir``.

    Returns:
        file name -> written path.

    Raises:
        ReportError: a bad results file (see :func:`read_results`) or no finished run in any.
    """
    paths = [Path(results)] if isinstance(results, (str, Path)) else [Path(path) for path in results]
    runs = add_percent_of_best_lora([run for path in paths for run in read_results(path)])
    best = best_runs(runs)
    if not best:
        raise ReportError(f"{', '.join(map(str, paths))}: no finished run (status one of "
                          f"{', '.join(sorted(OK_STATUSES))})")
    metric_names = {task: _metric_name(task, runs) for task, _, _ in best}
    edges = rate_edges(runs, best)
    panels = _panels(best, metric_names=metric_names)
    table = format_table(best, excluded=[r for r in runs if not r.ok], metric_names=metric_names, edges=edges,
                         base_metrics=read_base_metrics(paths))
    out_dir = Path(out_dir)
    outputs = {
        "table.md": table.encode(),
        "metric_vs_rank.png": metric_vs_rank_png(panels),
        "metric_vs_params.png": metric_vs_params_png(panels),
        "metric_vs_lr.png": metric_vs_lr_png(_lr_panels(runs, best, edges, metric_names=metric_names)),
    }
    for name, data in outputs.items():
        atomic_write_bytes(out_dir / name, data)
    return {name: out_dir / name for name in outputs}


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``python -m nemo_tiedlora`` subcommands."""
    parser = subparsers.add_parser(
        "report",
        help="table and plots from a study's results file(s)",
        description="Write table.md (headline TL6 against LoRA; best metric per preset and rank, mean ± std over "
        "seeds, with parameter % of LoRA; per task and rank the spread over seeds), metric_vs_rank.png, "
        "metric_vs_params.png and metric_vs_lr.png from one or more results files (CSV or JSON list; several "
        "files, one per task, are reported together).",
    )
    parser.add_argument("results", type=Path, nargs="+",
                        help="results file(s): CSV with a header, or a JSON list of objects")
    parser.add_argument("--out", type=Path,
                        help="output folder (default with one results file: 'report' next to it; required with "
                        "several)")
    parser.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    results = list(args.results)
    if args.out is None and len(results) > 1:
        print(f"error: {len(results)} results files: give --out DIR for their common report", file=sys.stderr)
        return _EXIT_USAGE
    out = args.out if args.out is not None else results[0].parent / "report"
    try:
        paths = build_report(results, out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return _EXIT_USAGE
    for path in paths.values():
        print(path)
    return 0

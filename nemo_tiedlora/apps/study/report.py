"""The study report: a Table-2-style markdown table and two plots from a sweep's results file.

``python -m nemo_tiedlora report results.csv --out DIR`` reads one row per run (CSV with a header, or a JSON list of
objects) with at least the columns of :data:`REQUIRED_COLUMNS` and writes into ``DIR``:

* ``table.md``: per task, one row per preset (LoRA first) and one column per rank; a cell is the preset's best
  metric over learning rates at that rank and its trainable parameters as % of the best LoRA run
  (``88.10 (12.5%)``); the best cell of each rank is bold. A second table gives the learning rate of each cell.
  When the sweep reran the best learning rate of a (preset, rank) with more seeds (rows with ``seed_rerun`` true),
  the learning rate is still chosen on the grid's seed alone, and the cell is the mean over the seeds at that rate
  (a third table lists each seed's metric).
* ``metric_vs_rank.png``: the metric against the rank (log2 axis), one line per preset, one panel per task.
* ``metric_vs_params.png``: the metric against trainable parameters (log axis), one marker series per preset.

Only runs whose ``status`` is in :data:`OK_STATUSES` count; the others are listed under the table.
``percent_of_best_lora``, when absent or empty, is ``trainable_params`` / ``trainable_params`` of the task's
best-metric LoRA run * 100. An optional ``metric_name`` column names the metric; otherwise the task registry does.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from nemo_tiedlora.core.config import PRESETS
from nemo_tiedlora.apps.study.plots import Panel, metric_vs_params_png, metric_vs_rank_png
from nemo_tiedlora.apps.study.tasks import TASKS
from nemo_tiedlora.apps.study.tasks.base import atomic_write_bytes

__all__ = [
    "OK_STATUSES",
    "REQUIRED_COLUMNS",
    "ReportError",
    "Run",
    "add_percent_of_best_lora",
    "add_report_parser",
    "best_runs",
    "build_report",
    "format_table",
    "read_results",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("task", "preset", "rank", "lr", "metric", "trainable_params", "status")
OK_STATUSES: frozenset[str] = frozenset({"ok", "done", "completed", "success", "succeeded", "finished"})
"""Statuses (case-insensitive) of runs that finished and count in the report."""

_LORA = "lora"
_EXIT_USAGE = 2

Key = tuple[str, str, int]  # (task, preset, rank)
K = TypeVar("K")


class ReportError(ValueError):
    """The results file cannot be reported: missing, empty, missing columns or bad values (all listed)."""


@dataclass(frozen=True)
class Run:
    """One row of the results file. ``metric`` is NaN for runs that did not finish."""

    task: str
    preset: str
    rank: int
    lr: float
    metric: float
    trainable_params: int
    status: str
    percent_of_best_lora: float | None = None
    metric_name: str = ""
    seed: int | None = None
    seed_rerun: bool = False
    best_val_loss: float | None = None  # breaks a tie in the metric, as the sweep does when it picks a rate to rerun
    seed_metrics: tuple[tuple[int | None, float], ...] = ()  # (seed, metric) of every seed a cell averages

    @property
    def ok(self) -> bool:
        """Whether the run finished (its status is in :data:`OK_STATUSES`)."""
        return self.status.strip().lower() in OK_STATUSES


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_results(path: Path) -> list[Run]:
    """Every run of a results file (``.json``: a list of objects; anything else: CSV with a header).

    Raises:
        ReportError: the file is missing or empty, columns are missing (all named), or a finished run has a
            non-numeric value (every bad cell named with its row).
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: no such results file")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise ReportError(f"{path}: the file is empty; expected a header with {', '.join(REQUIRED_COLUMNS)}")
    rows = _json_rows(path, text) if path.suffix == ".json" or text.lstrip().startswith("[") else _csv_rows(text)
    if not rows:
        raise ReportError(f"{path}: no runs in the file (only a header?)")
    columns = {str(key).strip() for row in rows for key in row}
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise ReportError(
            f"{path}: missing column(s) {', '.join(missing)}; a results file needs {', '.join(REQUIRED_COLUMNS)} "
            "(percent_of_best_lora and metric_name are optional)"
        )
    runs, problems = [], []
    for number, row in enumerate(rows, start=1):
        run, bad = _run(row)
        runs.append(run)
        problems += [f"row {number}: {problem}" for problem in bad]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ReportError(f"{path}: bad values in finished runs: {shown}")
    return runs


def _json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ReportError(f"{path}: expected a JSON list of objects, one per run")
    return data


def _csv_rows(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    return [{(key or "").strip(): value for key, value in row.items()} for row in reader]


def _number(value: Any) -> float:
    """``value`` as a float; NaN for anything that is not a number."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        return math.nan


def _run(row: Mapping[str, Any]) -> tuple[Run, list[str]]:
    """The run of one row and the problems with it (only a finished run's values must be numbers)."""
    row = {str(key).strip(): value for key, value in row.items()}
    values = {column: _number(row.get(column)) for column in ("rank", "lr", "metric", "trainable_params")}
    percent = _number(row.get("percent_of_best_lora", ""))
    run = Run(
        task=str(row.get("task") or "").strip(),
        preset=str(row.get("preset") or "").strip().lower(),
        rank=int(values["rank"]) if math.isfinite(values["rank"]) else 0,
        lr=values["lr"],
        metric=values["metric"],
        trainable_params=int(values["trainable_params"]) if math.isfinite(values["trainable_params"]) else 0,
        status=str(row.get("status") or "").strip(),
        percent_of_best_lora=percent if math.isfinite(percent) else None,
        metric_name=str(row.get("metric_name") or "").strip(),
        seed=int(_number(row.get("seed"))) if math.isfinite(_number(row.get("seed"))) else None,
        seed_rerun=str(row.get("seed_rerun", "")).strip().lower() in ("true", "1", "yes"),
        best_val_loss=_number(row.get("best_val_loss")) if math.isfinite(_number(row.get("best_val_loss"))) else None,
    )
    if not run.ok:
        return run, []
    problems = [f"{column} is empty" for column in ("task", "preset") if not getattr(run, column)]
    for column, value in values.items():
        if not math.isfinite(value):
            problems.append(f"{column} {row.get(column)!r} is not a number")
    if math.isfinite(values["rank"]) and (values["rank"] < 1 or values["rank"] != int(values["rank"])):
        problems.append(f"rank {row.get('rank')!r} is not a positive integer")
    return run, problems


# --------------------------------------------------------------------------------------------------
# Selecting
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


def format_table(best: Mapping[Key, Run], *, excluded: Sequence[Run] = (), metric_names: Mapping[str, str]) -> str:
    """The markdown report: per task a metric table (metric and parameter %) and a learning-rate table."""
    lines = ["# Tied-LoRA study", ""]
    lines.append("Cells: best metric over learning rates (trainable parameters as % of the task's best LoRA run);")
    lines.append("the best cell of each rank is bold; a rate rerun with more seeds shows the mean over its seeds.")
    for task, presets in _by_task(best).items():
        ranks = sorted({rank for runs in presets.values() for rank in runs})
        direction = "higher" if _higher_is_better(task) else "lower"
        header = "| preset | " + " | ".join(f"r={rank}" for rank in ranks) + " |"
        rule = "|---|" + "---:|" * len(ranks)
        winners = _best_by((run for runs in presets.values() for run in runs.values()), lambda run: run.rank)
        lines += ["", f"## {_task_title(task)}: {metric_names[task]} ({direction} is better)", "", header, rule]
        for preset, runs in presets.items():
            cells = []
            for rank in ranks:
                run = runs.get(rank)
                if run is None:
                    cells.append("–")
                    continue
                value = f"{run.metric:.2f}"
                value = f"**{value}**" if run.metric == winners[rank].metric else value
                cells.append(f"{value} ({_percent(run.percent_of_best_lora)})")
            lines.append(f"| {preset} | " + " | ".join(cells) + " |")
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
    if excluded:
        lines += ["", f"## Runs left out ({len(excluded)}, status not in {', '.join(sorted(OK_STATUSES))})", ""]
        lines += [f"- {r.task} {r.preset} r={r.rank} lr={_lr(r.lr)}: {r.status or '(no status)'}" for r in excluded]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Plots (drawn by nemo_tiedlora.apps.study.plots)
# --------------------------------------------------------------------------------------------------


def _panels(best: Mapping[Key, Run], *, metric_names: Mapping[str, str]) -> list[Panel]:
    """One plot panel per task: preset -> rank -> (trainable parameters, best metric)."""
    return [
        Panel(
            title=_task_title(task),
            ylabel=f"{metric_names[task]} ({'higher' if _higher_is_better(task) else 'lower'} is better)",
            series={
                preset: {rank: (run.trainable_params, run.metric) for rank, run in runs.items()}
                for preset, runs in presets.items()
            },
        )
        for task, presets in _by_task(best).items()
    ]


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def build_report(results: Path, out_dir: Path) -> dict[str, Path]:
    """Read ``results`` and write ``table.md``, ``metric_vs_rank.png``, ``metric_vs_params.png`` atomically.

    Returns:
        file name -> written path.

    Raises:
        ReportError: bad results file (see :func:`read_results`) or no finished run in it.
    """
    runs = add_percent_of_best_lora(read_results(results))
    best = best_runs(runs)
    if not best:
        raise ReportError(f"{results}: no finished run (status one of {', '.join(sorted(OK_STATUSES))})")
    metric_names = {task: _metric_name(task, runs) for task, _, _ in best}
    panels = _panels(best, metric_names=metric_names)
    out_dir = Path(out_dir)
    outputs = {
        "table.md": format_table(best, excluded=[r for r in runs if not r.ok], metric_names=metric_names).encode(),
        "metric_vs_rank.png": metric_vs_rank_png(panels),
        "metric_vs_params.png": metric_vs_params_png(panels),
    }
    for name, data in outputs.items():
        atomic_write_bytes(out_dir / name, data)
    return {name: out_dir / name for name in outputs}


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``python -m nemo_tiedlora`` subcommands."""
    parser = subparsers.add_parser(
        "report",
        help="table and plots from a study's results file",
        description="Write table.md (best metric per preset and rank, with parameter % of LoRA), "
        "metric_vs_rank.png and metric_vs_params.png from a results CSV or JSON list.",
    )
    parser.add_argument("results", type=Path, help="results file: CSV with a header, or a JSON list of objects")
    parser.add_argument("--out", type=Path, help="output folder (default: 'report' next to the results file)")
    parser.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else args.results.parent / "report"
    try:
        paths = build_report(args.results, out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return _EXIT_USAGE
    for path in paths.values():
        print(path)
    return 0

"""The rows of a study's results file, as the report reads them: :class:`Run`, the columns a row needs and the
statuses that count, and :func:`read_results` (CSV with a header, or a JSON list of objects; every bad cell named).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_tiedlora.apps.study.sweep_results import BASE_FILE

__all__ = ["OK_STATUSES", "REQUIRED_COLUMNS", "ReportError", "Run", "read_base_metrics", "read_results"]

REQUIRED_COLUMNS: tuple[str, ...] = ("task", "preset", "rank", "lr", "metric", "trainable_params", "status")
OK_STATUSES: frozenset[str] = frozenset({"ok", "done", "completed", "success", "succeeded", "finished"})
"""Statuses (case-insensitive) of runs that finished and count in the report."""



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


def read_base_metrics(results: Sequence[Path]) -> dict[str, float]:
    """task -> the base model's metric without an adapter, from the ``base.json`` the sweep writes beside each
    results file (``evaluate_base``); results without one add nothing.

    Raises:
        ReportError: a ``base.json`` that is not a JSON object with a ``task`` and a numeric ``metric``.
    """
    metrics: dict[str, float] = {}
    for path in results:
        base = Path(path).parent / BASE_FILE
        if not base.exists():
            continue
        try:
            record = json.loads(base.read_text(encoding="utf-8"))
            metrics[str(record["task"])] = float(record["metric"])
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ReportError(f"{base}: not a base-model result ({type(error).__name__}: {error}); delete it and run "
                              "the sweep again to re-measure the base model") from error
    return metrics


# --------------------------------------------------------------------------------------------------
# Selecting

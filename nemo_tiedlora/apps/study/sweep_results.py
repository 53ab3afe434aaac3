"""The sweep's grid and results: runs of the grid, closed-form parameter counts, % of the best LoRA run, the
results files (``results.csv`` / ``results.json``, rewritten atomically), what a rerun may reuse, the summary table.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nemo_tiedlora.core.fileio import atomic_write_bytes
from nemo_tiedlora.apps.study.sweep_config import EMBEDDED, SAMPLE, SMOLLM2, SweepConfig, _as_float

COLUMNS: tuple[str, ...] = (
    "task",
    "preset",
    "rank",
    "lr",
    "seed",
    "seed_rerun",
    "metric",
    "metric_name",
    "trainable_params",
    "percent_of_best_lora",
    "status",
    "steps_run",
    "max_steps",
    "early_stopped",
    "best_val_loss",
    "scores",
    "adapter",
    "seconds",
    "run",
    "finetune_log",
    "generate_log",
    "fingerprint",
)
"""Columns of ``results.csv`` (and keys of every object in ``results.json``), in order."""
BASE_FILE = "base.json"  # the base model's score without an adapter (evaluate_base), beside the results files

_LORA = "lora"
_OK = "ok"




@dataclass(frozen=True)
class RunSpec:
    """One run: a grid run (``seed`` None: the config's ``training.seed``) or a rerun of a best lr with ``seed``."""

    task: str
    preset: str
    rank: int
    lr: float
    seed: int | None = None

    @property
    def key(self) -> tuple[str, str, int, float, int | None]:
        return (self.task, self.preset, self.rank, self.lr, self.seed)

    @property
    def name(self) -> str:
        """Folder and log name: ``squad_tl6_r8_lr0.001`` (a rerun: ``squad_tl6_r8_lr0.001_seed4321``)."""
        name = f"{self.task}_{self.preset}_r{self.rank}_lr{self.lr:g}"
        return name if self.seed is None else f"{name}_seed{self.seed}"


def expand_grid(cfg: SweepConfig) -> list[RunSpec]:
    """presets x ranks x each preset's lrs, preset-major in config order (LoRA runs come where the config lists
    them)."""
    return [RunSpec(cfg.task, preset, rank, lr)
            for preset in cfg.presets for rank in cfg.ranks for lr in cfg.rates(preset)]


def rerun_count(cfg: SweepConfig) -> int:
    """How many runs follow the grid (edge extensions aside): ``rerun_best_seeds`` (one per preset, rank and seed)
    and ``best_lr_at_ranks`` (one per preset, rank and step, and one per preset, rank and rerun seed)."""
    follow = cfg.best_lr_at_ranks
    return len(cfg.presets) * len(cfg.ranks) * len(cfg.rerun_best_seeds) \
        + len(follow.presets) * len(follow.ranks) * (len(follow.steps) + len(cfg.rerun_best_seeds))


def is_rerun(row: Mapping[str, Any]) -> bool:
    """Whether a results row is a rerun of a best rate with another seed (JSON: true, CSV: "true")."""
    return row.get("seed_rerun") in (True, "true")


def grid_runs(cfg: SweepConfig, rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
    """(preset, rank) -> its rows on the grid's seed (grid rates and edge extensions, ok or not), at a grid rank or
    at a ``best_lr_at_ranks`` rank for its presets."""
    follow = cfg.best_lr_at_ranks
    runs: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        key = _row_key(row)
        if key is None or key[0] != cfg.task or key[4] is not None:
            continue
        if (key[1] in cfg.presets and key[2] in cfg.ranks) or (key[1] in follow.presets and key[2] in follow.ranks):
            runs.setdefault((key[1], key[2]), []).append(row)
    return runs


def best_rates(cfg: SweepConfig, rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], float]:
    """(preset, rank) -> the rate of its best ok run on the grid's seed (grid rates and edge extensions): the best
    metric; ties: the lower best validation loss, then the lower rate. A (preset, rank) without an ok run is absent."""
    from nemo_tiedlora.apps.study.tasks import TASKS

    sign = 1.0 if TASKS[cfg.task].higher_is_better else -1.0
    best: dict[tuple[str, int], tuple[tuple[float, float, float], float]] = {}
    for pair, runs in grid_runs(cfg, rows).items():
        for row in runs:
            if not _is_ok(row) or _finite(row.get("metric")) is None:
                continue
            loss = _finite(row.get("best_val_loss"))
            score = (sign * float(row["metric"]), -(loss if loss is not None else math.inf), -float(row["lr"]))
            if pair not in best or score > best[pair][0]:
                best[pair] = (score, float(row["lr"]))
    return {pair: lr for pair, (_, lr) in best.items()}


def best_lr_reruns(cfg: SweepConfig, rows: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """The reruns of ``cfg.rerun_best_seeds``: for each (preset, rank) its best rate (:func:`best_rates`) run again
    with every extra seed. A (preset, rank) without an ok run gets no rerun."""
    best = best_rates(cfg, rows)
    return [RunSpec(cfg.task, preset, rank, best[(preset, rank)], seed)
            for preset in cfg.presets for rank in cfg.ranks if (preset, rank) in best
            for seed in cfg.rerun_best_seeds]


def grid_step(cfg: SweepConfig, preset: str) -> float:
    """The spacing of ``preset``'s grid: the ratio of its two lowest rates (4 with one rate)."""
    rates = sorted(cfg.rates(preset))
    return rates[1] / rates[0] if len(rates) > 1 else 4.0


def _follow_up_rates(cfg: SweepConfig, best: Mapping[tuple[str, int], float]) -> dict[tuple[str, int], list[float]]:
    """(preset, follow-up rank) -> its ``best_lr_at_ranks`` rates: the best rate at the nearest grid rank (ties: the
    lower) moved by each step of the preset's grid spacing, rounded to 3 significant digits."""
    follow = cfg.best_lr_at_ranks
    rates = {}
    for preset in follow.presets:
        for rank in follow.ranks:
            nearest = min(cfg.ranks, key=lambda grid_rank: (abs(grid_rank - rank), grid_rank))
            if (preset, nearest) in best:
                rates[(preset, rank)] = [float(f"{best[(preset, nearest)] * grid_step(cfg, preset) ** step:.3g}")
                                         for step in follow.steps]
    return rates


def rank_follow_ups(cfg: SweepConfig, rows: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """``best_lr_at_ranks``, first part: each of its presets at each of its ranks with the grid's seed, at each of
    its rates (:func:`_follow_up_rates`). Edge extensions and :func:`rank_follow_up_reruns` follow."""
    return [RunSpec(cfg.task, preset, rank, lr)
            for (preset, rank), rates in _follow_up_rates(cfg, best_rates(cfg, rows)).items() for lr in rates]


def rank_follow_up_reruns(cfg: SweepConfig, rows: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """``best_lr_at_ranks``, last part: the best rate each of its presets found at each of its ranks (on the grid's
    seed, as :func:`best_rates`) with every ``rerun_best_seeds`` seed."""
    best = best_rates(cfg, rows)
    follow = cfg.best_lr_at_ranks
    return [RunSpec(cfg.task, preset, rank, best[(preset, rank)], seed)
            for preset in follow.presets for rank in follow.ranks if (preset, rank) in best
            for seed in cfg.rerun_best_seeds]


def rate_edge(tried: Iterable[float], lr: float) -> str | None:
    """"lowest" or "highest" when ``lr`` is that edge of two or more ``tried`` rates; None when it is inside (or
    fewer than two rates were tried). The sweep extends the grid there and the report flags it."""
    rates = sorted(set(tried))
    if len(rates) < 2 or rates[0] < lr < rates[-1]:
        return None
    return "lowest" if lr == rates[0] else "highest" if lr == rates[-1] else None


def edge_extensions(cfg: SweepConfig, rows: Sequence[Mapping[str, Any]]) -> tuple[list[RunSpec], list[str]]:
    """Rates to add where a (preset, rank)'s best rate is the highest or lowest it tried, and what stays at an edge.

    The next rate continues the grid's spacing beyond that edge (the ratio of the two outermost rates tried on that
    side, x4 or /4 with one rate), rounded to 3 significant digits. A (preset, rank) that has already added
    ``cfg.extend_edges`` rates (beyond the grid's rates, or beyond its ``best_lr_at_ranks`` rates) is not extended; it is named in the second list instead ("best at the edge"), which
    a finished study must leave empty. Only the grid's seed counts; a failed run bounds the range like any other.
    """
    best = best_rates(cfg, rows)
    follow_up = _follow_up_rates(cfg, best)
    extra: list[RunSpec] = []
    at_edge: list[str] = []
    for (preset, rank), runs in grid_runs(cfg, rows).items():
        if (preset, rank) not in best:
            continue
        tried = sorted({float(row["lr"]) for row in runs})
        lr = best[(preset, rank)]
        edge = rate_edge(tried, lr)
        if edge is None:
            continue
        high = edge == "highest"
        outer, inner = (tried[-1], tried[-2]) if high else (tried[0], tried[1])
        added = sum(rate not in follow_up.get((preset, rank), cfg.rates(preset)) for rate in tried)
        if added >= cfg.extend_edges:
            at_edge.append(f"{preset} r{rank}: best at lr {lr:g}, the {edge} rate tried ({added} added beyond "
                           f"the grid, extend_edges {cfg.extend_edges}); widen its lrs")
            continue
        extra.append(RunSpec(cfg.task, preset, rank, float(f"{outer * outer / inner:.3g}")))
    return extra, at_edge


def trainable_params(shape: Mapping[str, int], preset: str, rank: int) -> int:
    """Closed-form trainable parameters of ``preset`` at ``rank`` on a model of ``shape`` (see ``model_shape``)."""
    from nemo_tiedlora.core.config import TiedLoraConfig
    from nemo_tiedlora.core.functional import parameter_counts

    cfg = TiedLoraConfig(preset=preset, rank=rank)
    return parameter_counts(
        cfg, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"], out_features=shape["out_features"]
    )["total"]


def base_shape(base: Path) -> dict[str, int]:
    """The shape of a base .nemo (:func:`nemo_tiedlora.core.model_shape.model_shape` of its ``model_config.yaml``; the
    archive reader imports no NeMo)."""
    from nemo_tiedlora.nemo.base_archive import base_config
    from nemo_tiedlora.core.model_shape import model_shape

    return model_shape(base_config(base))


def _finite(value: Any) -> float | None:
    return _as_float(value)


def _is_ok(row: Mapping[str, Any]) -> bool:
    return str(row.get("status", "")).strip().lower() == _OK and _finite(row.get("metric")) is not None


def add_percent_of_best_lora(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``percent_of_best_lora`` = trainable_params / that of the task's best-metric ok LoRA run * 100.

    "Best" follows the task's direction (higher or lower is better); on ties the first such row counts. Without an
    ok LoRA run of the task the value is None. Rows that are not ok get None too.
    """
    from nemo_tiedlora.apps.study.tasks import TASKS

    best: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        if row.get("preset") != _LORA or not _is_ok(row):
            continue
        task = row["task"]
        higher = TASKS[task].higher_is_better if task in TASKS else True
        metric = float(row["metric"])
        if task not in best:
            best[task] = row
        elif (metric > float(best[task]["metric"])) if higher else (metric < float(best[task]["metric"])):
            best[task] = row
    out = []
    for row in rows:
        row = dict(row)
        reference = best.get(row.get("task"))
        params = _finite(row.get("trainable_params"))
        ref_params = _finite(reference.get("trainable_params")) if reference is not None else None
        if _is_ok(row) and params is not None and ref_params:
            row["percent_of_best_lora"] = 100.0 * params / ref_params
        else:
            row["percent_of_best_lora"] = None
        out.append(row)
    return out


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def write_results(out_dir: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.json`` (same rows, :data:`COLUMNS`) atomically; return both paths."""
    out_dir = Path(out_dir)
    ordered = [{column: row.get(column) for column in COLUMNS} for row in rows]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in ordered:
        writer.writerow([_csv_cell(row[column]) for column in COLUMNS])
    json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
    atomic_write_bytes(json_path, (json.dumps(ordered, indent=1) + "\n").encode("utf-8"))
    atomic_write_bytes(csv_path, text.getvalue().encode("utf-8"))
    return csv_path, json_path


def read_previous(out_dir: Path) -> list[dict[str, Any]]:
    """The rows of an earlier ``results.json`` in ``out_dir`` (empty if none or unreadable)."""
    path = Path(out_dir) / "results.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def fingerprint(cfg: SweepConfig, *, base: Path | str, data: Path | str) -> str:
    """What makes a run's result reusable: base, data, training, early stopping, generation, overrides.

    A base named in the config (``embedded``, ``smollm2``) is built from the installed package and pinned
    requirements, so its name identifies it (a rebuilt copy on another machine keeps the results reusable); a base
    file given by path is identified by path, size and modification time.
    """
    base_id: Any = cfg.base if cfg.base in (EMBEDDED, SMOLLM2) else str(base)
    with contextlib.suppress(OSError):
        if cfg.base not in (EMBEDDED, SMOLLM2):
            stat = Path(base).stat()
            base_id = [str(Path(base).resolve()), stat.st_size, stat.st_mtime_ns]
    payload = {
        "base": base_id,
        "data": str(Path(data).resolve()) if str(data) != SAMPLE else SAMPLE,
        "training": asdict(cfg.training),
        "early_stopping": asdict(cfg.early_stopping),
        "generation": asdict(cfg.generation),
        "overrides": list(cfg.overrides),
        "prompt_template": cfg.prompt_template,
    }
    if cfg.sample_sizes is not None:  # only when set, so configs without it keep their fingerprints
        payload["sample_sizes"] = dict(sorted(cfg.sample_sizes.items()))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _row_key(row: Mapping[str, Any]) -> tuple[str, str, int, float, int | None] | None:
    try:
        seed = int(row["seed"]) if is_rerun(row) else None
        return (str(row["task"]), str(row["preset"]), int(row["rank"]), float(row["lr"]), seed)
    except (KeyError, TypeError, ValueError):
        return None


def _reusable(row: Mapping[str, Any], fp: str) -> bool:
    """An earlier row a resumed sweep may keep: status ok and recorded with the same fingerprint."""
    return _is_ok(row) and row.get("fingerprint") == fp


def reusable_rows(previous: Iterable[Mapping[str, Any]], grid: Sequence[RunSpec], fp: str) -> dict[tuple, dict]:
    """Earlier rows to keep: status ok, in the grid and recorded with the same fingerprint (first one per run)."""
    keys = {spec.key for spec in grid}
    kept: dict[tuple, dict] = {}
    for row in previous:
        key = _row_key(row)
        if key in keys and key not in kept and _reusable(row, fp):
            kept[key] = dict(row)
    return kept


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of the rows: preset, rank, lr, metric, params, % of best LoRA, steps, status."""
    header = ["task", "preset", "rank", "lr", "seed", "metric", "params", "% best lora", "steps", "early stop",
              "status"]
    lines = []
    for row in rows:
        metric, percent = _finite(row.get("metric")), _finite(row.get("percent_of_best_lora"))
        steps = row.get("steps_run")
        lines.append([
            str(row["task"]), str(row["preset"]), str(row["rank"]), f"{float(row['lr']):g}", str(row.get("seed", "")),
            "" if metric is None else f"{metric:.2f}",
            f"{int(row['trainable_params']):,}" if row.get("trainable_params") is not None else "",
            "" if percent is None else f"{percent:.1f}",
            "" if steps is None else f"{steps}/{row.get('max_steps', '')}",
            {True: "yes", False: "no"}.get(row.get("early_stopped"), ""),
            str(row.get("status", ""))[:60],
        ])
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    failures = [f"  {row.get('run', '')}: {row['status']} (log: {row.get('finetune_log') or ''})"
                for row in rows if str(row.get("status", "")).startswith("failed")]
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in lines),
                      *(["failed runs:", *failures] if failures else [])])

"""The study sweep: ``python -m nemo_tiedlora sweep --config study.yaml``.

Runs every (preset, rank, learning rate) of a study config on one task through NeMo's own entry scripts, each in
its own subprocess (the command a user types):

1. ``examples/.../megatron_gpt_finetuning.py`` fine-tunes the base ``.nemo`` with ``peft_scheme=tiedlora`` and
   exp_manager's early stopping on the validation loss; exp_manager keeps the best checkpoint and writes the
   adapter ``.nemo`` from it at the end;
2. ``examples/.../megatron_gpt_generate.py`` generates greedily on the test split with base + adapter and writes
   the predictions file;
3. the task adapter (:mod:`nemo_tiedlora.study.tasks`) scores the predictions with the task's metric.

One results file, ``results.csv`` and the same rows as ``results.json`` in the output folder, gets a row per run:
task, preset, rank, lr, metric, metric_name, trainable_params (closed form for the base's shape, read from its
``model_config.yaml``), percent_of_best_lora (trainable_params / trainable_params of the task's best-metric LoRA
run * 100; empty without a finished LoRA run), status (``ok`` or ``failed: <reason>``), steps_run, early_stopped,
best_val_loss, adapter, seconds and the run's log files. Both files are rewritten atomically after every run, so an
interrupted sweep keeps what finished; running the same config again skips the runs already recorded ``ok`` (with
the same training, data and base: see ``fingerprint``) and re-runs the others. ``python -m nemo_tiedlora report
results.csv`` turns the file into the paper-style table and plots.

Multiple choice (HellaSwag) is scored as in the paper, by the log-likelihood of each ending: step 2 is then
``python -m nemo_tiedlora.study.loglik`` (the model loaded as the generate script loads it, every ending's summed
log-probability given the prompt, :meth:`~nemo_tiedlora.study.tasks.hellaswag.HellaSwagTask.score_loglik`), whose
``metric`` is the per-character-normalized accuracy (``accuracy`` is the raw one).

Nothing here imports NeMo: the parent process only orchestrates, so a bad config fails in a second.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nemo_tiedlora.config import PRESETS
from nemo_tiedlora.errors import TiedLoraConfigError
from nemo_tiedlora.fileio import atomic_write_bytes

__all__ = [
    "COLUMNS",
    "EarlyStoppingSettings",
    "GenerationSettings",
    "RunSpec",
    "SweepConfig",
    "SweepConfigError",
    "TrainingSettings",
    "add_percent_of_best_lora",
    "add_sweep_parser",
    "expand_grid",
    "load_config",
    "parse_config",
    "run_sweep",
    "trainable_params",
    "write_results",
]

COLUMNS: tuple[str, ...] = (
    "task",
    "preset",
    "rank",
    "lr",
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

EMBEDDED = "embedded"
SAMPLE = "sample"
_LORA = "lora"
_OK = "ok"
_EMBEDDED_WORK = Path(".cache/demo")  # shared with `python -m nemo_tiedlora demo`: the base is built once
_EARLY_STOP_MARK = "Signaling Trainer to stop"  # Lightning's EarlyStopping message when it stops training


class SweepConfigError(TiedLoraConfigError):
    """The study config is invalid; the message lists every bad field and its fix."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    """Fine-tuning budget of every run (the same for all runs of a sweep)."""

    max_steps: int = 200
    val_check_interval: int = 20
    global_batch_size: int = 8
    micro_batch_size: int = 8
    max_seq_length: int = 256
    limit_val_batches: float = 1.0
    warmup_steps: int = 0
    seed: int = 1234


@dataclass(frozen=True)
class EarlyStoppingSettings:
    """exp_manager's early stopping (Lightning ``EarlyStopping``) on the validation loss."""

    enabled: bool = True
    monitor: str = "validation_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.001


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy generation on the test split; ``max_seq_length`` None: the training one."""

    tokens_to_generate: int = 32
    batch_size: int = 16
    max_seq_length: int | None = None


@dataclass(frozen=True)
class SweepConfig:
    """A validated study config (see ``conf/study.yaml``)."""

    task: str
    data: str  # "sample" or a folder with the dataset's own files
    base: str  # "embedded" or a base .nemo
    output: Path
    presets: tuple[str, ...]
    ranks: tuple[int, ...]
    lrs: tuple[float, ...]
    training: TrainingSettings = field(default_factory=TrainingSettings)
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    overrides: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        for key in ("presets", "ranks", "lrs", "overrides"):
            data[key] = list(data[key])
        return data


_TOP_KEYS = {
    "task", "data", "base", "output", "presets", "ranks", "lrs", "training", "early_stopping", "generation",
    "overrides",
}
_SECTIONS: dict[str, type] = {
    "training": TrainingSettings,
    "early_stopping": EarlyStoppingSettings,
    "generation": GenerationSettings,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    """A finite float from a number or a numeric string (YAML 1.1 reads ``1e-3`` as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _as_list(value: Any) -> list[Any] | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if value is None or isinstance(value, Mapping):
        return None
    return [value]  # a single value means a one-element list


def load_config(path: Path, *, output: Path | None = None) -> SweepConfig:
    """Read and validate a study YAML; ``output`` overrides its ``output``.

    Raises:
        SweepConfigError: the file is missing or not YAML, or fields are bad (all of them listed).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f"{path}: no such study config; copy conf/study.yaml and edit it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SweepConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, Mapping):
        raise SweepConfigError(f"{path}: expected a mapping of fields (task, data, base, presets, ranks, lrs, ...)")
    data = dict(data)
    if output is not None:
        data["output"] = str(output)
    return parse_config(data, where=str(path))


def parse_config(data: Mapping[str, Any], *, where: str = "study config") -> SweepConfig:
    """Validate a study config mapping; relative paths are relative to the current folder.

    Raises:
        SweepConfigError: one message naming every bad field and how to fix it.
    """
    from nemo_tiedlora.study.tasks import TASKS

    problems: list[str] = []
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"unknown field {key!r}: remove it (fields: {', '.join(sorted(_TOP_KEYS))})")

    task = data.get("task")
    if task not in TASKS:
        problems.append(f"task {task!r} is unknown: use one of {', '.join(TASKS)}")

    data_source = data.get("data", SAMPLE)
    if not isinstance(data_source, str) or not data_source.strip():
        problems.append(f"data {data_source!r}: give 'sample' or a folder holding the dataset's own files")
    elif data_source != SAMPLE and not Path(data_source).expanduser().is_dir():
        problems.append(f"data {data_source!r} is not a folder: give the dataset's folder or 'sample'")

    base = data.get("base", EMBEDDED)
    if not isinstance(base, str) or not base.strip():
        problems.append(f"base {base!r}: give a base .nemo path or 'embedded'")
    elif base != EMBEDDED and not Path(base).expanduser().is_file():
        problems.append(f"base {base!r}: no such file; give an existing base .nemo or 'embedded'")

    output = data.get("output")
    if not isinstance(output, str) or not output.strip():
        problems.append(f"output {output!r}: give the folder for results.csv, results.json, runs and logs")

    presets = _as_list(data.get("presets"))
    if not presets:
        problems.append(f"presets {data.get('presets')!r}: give a non-empty list of {', '.join(PRESETS)}")
        presets = []
    else:
        bad = [p for p in presets if not isinstance(p, str) or p.lower() not in PRESETS]
        if bad:
            problems.append(f"presets {bad!r} unknown: use {', '.join(PRESETS)}")
        names = [p.lower() for p in presets if isinstance(p, str)]
        if len(set(names)) != len(names):
            problems.append(f"presets {presets!r} repeat a name: list each preset once")
    ranks = _as_list(data.get("ranks"))
    if not ranks:
        problems.append(f"ranks {data.get('ranks')!r}: give a non-empty list of positive integers, e.g. [8, 16]")
        ranks = []
    else:
        bad = [r for r in ranks if not _is_int(r) or r <= 0]
        if bad:
            problems.append(f"ranks {bad!r}: every rank must be an integer > 0")
        elif len(set(ranks)) != len(ranks):
            problems.append(f"ranks {ranks!r} repeat a value: list each rank once")
    lrs_raw = _as_list(data.get("lrs"))
    lrs: list[float] = []
    if not lrs_raw:
        problems.append(f"lrs {data.get('lrs')!r}: give a non-empty list of learning rates > 0, e.g. [1.0e-4, 1.0e-3]")
    else:
        lrs = [_as_float(lr) for lr in lrs_raw]  # type: ignore[misc]
        bad = [raw for raw, lr in zip(lrs_raw, lrs) if lr is None or lr <= 0]
        if bad:
            problems.append(f"lrs {bad!r}: every learning rate must be a number > 0")
        elif len(set(lrs)) != len(lrs):
            problems.append(f"lrs {lrs_raw!r} repeat a value: list each learning rate once")

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _section(data.get(name), name=name, cls=cls, problems=problems)
    training, stopping, generation = sections["training"], sections["early_stopping"], sections["generation"]
    if training is not None:
        _check_training(training, problems)
    if stopping is not None:
        _check_stopping(stopping, problems)
    if generation is not None:
        _check_generation(generation, problems)

    overrides = _as_list(data.get("overrides", []) or [])
    if overrides is None or not all(isinstance(o, str) and "=" in o for o in overrides):
        problems.append(f"overrides {data.get('overrides')!r}: give a list of hydra overrides 'key=value'")
        overrides = []

    if problems:
        raise SweepConfigError(f"{where}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return SweepConfig(
        task=task,
        data=data_source,
        base=base,
        output=Path(output).expanduser(),
        presets=tuple(p.lower() for p in presets),
        ranks=tuple(ranks),
        lrs=tuple(lrs),  # type: ignore[arg-type]
        training=training,
        early_stopping=stopping,
        generation=generation,
        overrides=tuple(overrides),
    )


def _section(value: Any, *, name: str, cls: type, problems: list[str]) -> Any:
    """The settings dataclass of one section (defaults for missing keys), or None after recording problems."""
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        problems.append(f"{name} {value!r}: give a mapping of settings")
        return None
    known = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(value) - known)
    for key in unknown:
        problems.append(f"unknown field {name}.{key}: remove it ({name} fields: {', '.join(sorted(known))})")
    kwargs = {key: value[key] for key in value if key in known}
    # YAML 1.1 reads 1e-3 as a string: accept numeric strings for the float fields
    for key in ("limit_val_batches", "min_delta"):
        if key in kwargs and isinstance(kwargs[key], str) and _as_float(kwargs[key]) is not None:
            kwargs[key] = _as_float(kwargs[key])
    return None if unknown else cls(**kwargs)


def _positive_int(value: Any, name: str, problems: list[str], *, minimum: int = 1) -> bool:
    if not _is_int(value) or value < minimum:
        problems.append(f"{name} {value!r}: must be an integer >= {minimum}")
        return False
    return True


def _check_training(t: TrainingSettings, problems: list[str]) -> None:
    ok = {name: _positive_int(getattr(t, name), f"training.{name}", problems)
          for name in ("max_steps", "val_check_interval", "global_batch_size", "micro_batch_size", "max_seq_length")}
    _positive_int(t.warmup_steps, "training.warmup_steps", problems, minimum=0)
    if not _is_int(t.seed):
        problems.append(f"training.seed {t.seed!r}: must be an integer")
    if ok["max_steps"] and ok["val_check_interval"] and t.val_check_interval > t.max_steps:
        problems.append(
            f"training.val_check_interval {t.val_check_interval} > training.max_steps {t.max_steps}: validate at "
            "most every max_steps steps (early stopping needs validations)"
        )
    if ok["global_batch_size"] and ok["micro_batch_size"] and t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"training.global_batch_size {t.global_batch_size} is not a multiple of training.micro_batch_size "
            f"{t.micro_batch_size}: use a micro batch size that divides the global one"
        )
    limit = _as_float(t.limit_val_batches)
    if limit is None or limit <= 0 or (limit > 1 and limit != int(limit)):
        problems.append(
            f"training.limit_val_batches {t.limit_val_batches!r}: a fraction in (0, 1] or a whole number of batches"
        )


def _check_stopping(e: EarlyStoppingSettings, problems: list[str]) -> None:
    if not isinstance(e.enabled, bool):
        problems.append(f"early_stopping.enabled {e.enabled!r}: true or false")
    if not isinstance(e.monitor, str) or not e.monitor:
        problems.append(f"early_stopping.monitor {e.monitor!r}: a logged metric such as validation_loss")
    if e.mode not in ("min", "max"):
        problems.append(f"early_stopping.mode {e.mode!r}: min (a loss) or max")
    _positive_int(e.patience, "early_stopping.patience", problems, minimum=0)
    delta = _as_float(e.min_delta)
    if delta is None or delta < 0:
        problems.append(f"early_stopping.min_delta {e.min_delta!r}: a number >= 0")


def _check_generation(g: GenerationSettings, problems: list[str]) -> None:
    _positive_int(g.tokens_to_generate, "generation.tokens_to_generate", problems)
    _positive_int(g.batch_size, "generation.batch_size", problems)
    if g.max_seq_length is not None:
        _positive_int(g.max_seq_length, "generation.max_seq_length", problems)


# --------------------------------------------------------------------------------------------------
# Grid, parameter counts, results rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    task: str
    preset: str
    rank: int
    lr: float

    @property
    def key(self) -> tuple[str, str, int, float]:
        return (self.task, self.preset, self.rank, self.lr)

    @property
    def name(self) -> str:
        """Folder and log name: ``squad_tl6_r8_lr0.001``."""
        return f"{self.task}_{self.preset}_r{self.rank}_lr{self.lr:g}"


def expand_grid(cfg: SweepConfig) -> list[RunSpec]:
    """presets x ranks x lrs, preset-major in config order (LoRA runs come where the config lists them)."""
    return [RunSpec(cfg.task, preset, rank, lr) for preset in cfg.presets for rank in cfg.ranks for lr in cfg.lrs]


def trainable_params(shape: Mapping[str, int], preset: str, rank: int) -> int:
    """Closed-form trainable parameters of ``preset`` at ``rank`` on a model of ``shape`` (see ``model_shape``)."""
    from nemo_tiedlora.config import TiedLoraConfig
    from nemo_tiedlora.functional import parameter_counts

    cfg = TiedLoraConfig(preset=preset, rank=rank)
    return parameter_counts(
        cfg, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"], out_features=shape["out_features"]
    )["total"]


def base_shape(base: Path) -> dict[str, int]:
    """hidden size, layers and fused-QKV width of a base .nemo, from its ``model_config.yaml`` (no NeMo import)."""
    from nemo_tiedlora.functional import qkv_out_width
    from nemo_tiedlora.nemo.tools import base_config

    cfg = base_config(base)
    heads = int(cfg.num_attention_heads)
    groups = int(cfg.get("num_query_groups", None) or heads)
    kv_channels = cfg.get("kv_channels", None)
    hidden = int(cfg.hidden_size)
    return {
        "hidden_size": hidden,
        "num_layers": int(cfg.num_layers),
        "out_features": qkv_out_width(hidden, heads, groups, int(kv_channels) if kv_channels else None),
    }


def _finite(value: Any) -> float | None:
    return _as_float(value)


def _is_ok(row: Mapping[str, Any]) -> bool:
    return str(row.get("status", "")).strip().lower() == _OK and _finite(row.get("metric")) is not None


def add_percent_of_best_lora(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``percent_of_best_lora`` = trainable_params / that of the task's best-metric ok LoRA run * 100.

    "Best" follows the task's direction (higher or lower is better); on ties the first such row counts. Without an
    ok LoRA run of the task the value is None. Rows that are not ok get None too.
    """
    from nemo_tiedlora.study.tasks import TASKS

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
    """What makes a run's result reusable: base file, data, training, early stopping, generation, overrides."""
    base_id: Any = str(base)
    with contextlib.suppress(OSError):
        stat = Path(base).stat()
        base_id = [str(Path(base).resolve()), stat.st_size, stat.st_mtime_ns]
    payload = {
        "base": base_id,
        "data": str(Path(data).resolve()) if str(data) != SAMPLE else SAMPLE,
        "training": asdict(cfg.training),
        "early_stopping": asdict(cfg.early_stopping),
        "generation": asdict(cfg.generation),
        "overrides": list(cfg.overrides),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _row_key(row: Mapping[str, Any]) -> tuple[str, str, int, float] | None:
    try:
        return (str(row["task"]), str(row["preset"]), int(row["rank"]), float(row["lr"]))
    except (KeyError, TypeError, ValueError):
        return None


def reusable_rows(previous: Iterable[Mapping[str, Any]], grid: Sequence[RunSpec], fp: str) -> dict[tuple, dict]:
    """Earlier rows to keep: status ok, in the grid and recorded with the same fingerprint (first one per run)."""
    keys = {spec.key for spec in grid}
    kept: dict[tuple, dict] = {}
    for row in previous:
        key = _row_key(row)
        if key in keys and key not in kept and _is_ok(row) and row.get("fingerprint") == fp:
            kept[key] = dict(row)
    return kept


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepContext:
    """Everything a run needs that is shared by the sweep: prepared data, base, shape, output folders."""

    cfg: SweepConfig
    base: Path
    shape: Mapping[str, int]
    sft: Mapping[str, Path]  # split -> SFT JSONL
    source: Path  # the dataset folder the test examples are read from
    out: Path
    fingerprint: str
    verbose: bool = False


Runner = Callable[[RunSpec, SweepContext], Mapping[str, Any]]
"""``runner(spec, context)`` -> the run's measured fields (metric, scores, steps_run, ...); raises on failure."""


def _embedded_base(verbose: bool) -> Path:
    """The demo's tiny base .nemo (built and cached under .cache/demo, like ``python -m nemo_tiedlora demo``)."""
    from nemo_tiedlora.demo.data import build_all
    from nemo_tiedlora.demo.run import _run

    work = _EMBEDDED_WORK.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = build_all(work / "data")
    base = work / "base.nemo"
    with _quiet(verbose):
        _run(
            [sys.executable, "-m", "nemo_tiedlora.demo.base_model", "--out", str(base), "--corpus", str(data.corpus),
             "--tokenizer", str(data.tokenizer_model)],
            log=work / "base.log",
            title="base model: the embedded tiny base (cached)",
        )
    return base


def prepare_context(cfg: SweepConfig, *, verbose: bool = False) -> SweepContext:
    """Resolve the base (building the embedded one if needed), read its shape, write the task's SFT splits."""
    from nemo_tiedlora.study.tasks import TASKS, prepare

    out = cfg.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = _embedded_base(verbose) if cfg.base == EMBEDDED else Path(cfg.base).expanduser().resolve()
    shape = base_shape(base)
    for preset in cfg.presets:  # a rank the model cannot take fails now, not after the first runs
        for rank in cfg.ranks:
            trainable_params(shape, preset, rank)
    if cfg.data == SAMPLE:
        source = TASKS[cfg.task].write_sample(out / "data" / f"{cfg.task}-sample")
    else:
        source = Path(cfg.data).expanduser().resolve()
    sft = prepare(cfg.task, source, out / "data" / f"{cfg.task}-sft")
    fp = fingerprint(cfg, base=base, data=cfg.data if cfg.data == SAMPLE else source)
    return SweepContext(cfg=cfg, base=base, shape=shape, sft=sft, source=source, out=out, fingerprint=fp,
                        verbose=verbose)


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Keep the entry scripts' echoed progress lines (they are in the logs) off the terminal unless verbose."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def finetune_args(spec: RunSpec, ctx: SweepContext, *, exp_dir: Path) -> list[str]:
    """The hydra command line of ``megatron_gpt_finetuning.py`` for one run."""
    from nemo_tiedlora.demo.run import _script

    t, e = ctx.cfg.training, ctx.cfg.early_stopping
    limit = float(t.limit_val_batches)
    args = [
        sys.executable,
        str(_script("megatron_gpt_finetuning.py")),
        f"model.restore_from_path={ctx.base}",
        "model.peft.peft_scheme=tiedlora",
        f"model.peft.tiedlora_tuning.preset={spec.preset}",
        f"model.peft.tiedlora_tuning.adapter_dim={spec.rank}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"trainer.max_steps={t.max_steps}",
        f"trainer.val_check_interval={t.val_check_interval}",
        f"trainer.limit_val_batches={int(limit) if limit > 1 else limit}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=False",
        f"model.seed={t.seed}",
        f"model.global_batch_size={t.global_batch_size}",
        f"model.micro_batch_size={t.micro_batch_size}",
        f"model.optim.lr={spec.lr!r}",
        f"model.optim.sched.warmup_steps={t.warmup_steps}",
        f"exp_manager.exp_dir={exp_dir}",
        f"name={spec.name}",
        "exp_manager.resume_if_exists=False",
        "exp_manager.checkpoint_callback_params.save_top_k=1",
        f"exp_manager.create_early_stopping_callback={e.enabled}",
        f"exp_manager.early_stopping_callback_params.monitor={e.monitor}",
        f"exp_manager.early_stopping_callback_params.mode={e.mode}",
        f"exp_manager.early_stopping_callback_params.patience={e.patience}",
        f"exp_manager.early_stopping_callback_params.min_delta={float(e.min_delta)!r}",
        f"model.data.train_ds.file_names=[{ctx.sft['train']}]",
        f"model.data.validation_ds.file_names=[{ctx.sft['validation']}]",
        "model.data.validation_ds.names=[validation]",
        f"model.data.train_ds.max_seq_length={t.max_seq_length}",
        f"model.data.validation_ds.max_seq_length={t.max_seq_length}",
        "model.data.train_ds.memmap_workers=1",
        "model.data.train_ds.num_workers=0",
        *ctx.cfg.overrides,
    ]
    return args


def generate_args(ctx: SweepContext, *, adapter: Path, prefix: Path) -> list[str]:
    """The hydra command line of ``megatron_gpt_generate.py`` on the test split with ``adapter``."""
    from nemo_tiedlora.demo.run import _script

    g = ctx.cfg.generation
    length = g.max_seq_length or ctx.cfg.training.max_seq_length
    return [
        sys.executable,
        str(_script("megatron_gpt_generate.py")),
        f"model.restore_from_path={ctx.base}",
        f"model.peft.restore_from_path={adapter}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"model.data.test_ds.file_names=[{ctx.sft['test']}]",
        "model.data.test_ds.names=[test]",
        f"model.data.test_ds.tokens_to_generate={g.tokens_to_generate}",
        f"model.data.test_ds.global_batch_size={g.batch_size}",
        f"model.data.test_ds.micro_batch_size={g.batch_size}",
        f"model.data.test_ds.max_seq_length={length}",
        "model.data.test_ds.write_predictions_to_file=True",
        f"model.data.test_ds.output_file_path_prefix={prefix}",
    ]


def loglik_args(ctx: SweepContext, *, adapter: Path, out: Path) -> list[str]:
    """The command line of the log-likelihood scorer (multiple choice) on the test split with ``adapter``."""
    g = ctx.cfg.generation
    return [
        sys.executable, "-m", "nemo_tiedlora.study.loglik",
        "--base", str(ctx.base),
        "--adapter", str(adapter),
        "--task", ctx.cfg.task,
        "--data", str(ctx.source),
        "--split", "test",
        "--out", str(out),
        "--batch-size", str(g.batch_size),
        "--max-seq-length", str(g.max_seq_length or ctx.cfg.training.max_seq_length),
    ]


def _training_record(log_dir: Path, monitor: str) -> tuple[int | None, float | None]:
    """(steps run, best value of ``monitor``) from the run's TensorBoard events (exp_manager's logger).

    Lightning logs step ``n - 1`` during the n-th optimizer step (and validation after it), so steps run is the
    largest logged step + 1.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None, None
    last_step, best = None, None
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag == "hp_metric":
                continue
            for event in accumulator.Scalars(tag):
                last_step = event.step if last_step is None else max(last_step, event.step)
                if tag == monitor and math.isfinite(event.value):
                    best = event.value if best is None else min(best, event.value)
    return (None if last_step is None else last_step + 1), best


def _steps_from_checkpoints(run_dir: Path) -> int | None:
    """Fallback without TensorBoard: the largest ``step=N`` in the checkpoint names."""
    steps = []
    for path in run_dir.rglob("*.ckpt"):
        for part in path.name.split("-"):
            if part.startswith("step="):
                with contextlib.suppress(ValueError):
                    steps.append(int(part[len("step="):]))
    return max(steps) if steps else None


def read_predictions(path: Path, examples: Sequence[Any]) -> list[str]:
    """One generated text per test example, matched by the example id NeMo copies from the SFT record.

    Raises:
        RuntimeError: the file misses examples or has none.
    """
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    by_id = {str(row.get("id")): str(row.get("pred", "")) for row in rows if "id" in row}
    if len(by_id) >= len(examples) and all(example.id in by_id for example in examples):
        return [by_id[example.id] for example in examples]
    if len(rows) == len(examples):  # no ids (another SFT writer): file order is the test order
        return [str(row.get("pred", "")) for row in rows]
    raise RuntimeError(f"{path}: {len(rows)} predictions for {len(examples)} test examples")


class RunFailed(RuntimeError):
    """A run failed; ``record`` holds what it measured before (logs, adapter, steps), ``reason`` why it failed."""

    def __init__(self, reason: str, record: Mapping[str, Any]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.record = dict(record)


def execute_run(spec: RunSpec, ctx: SweepContext) -> dict[str, Any]:
    """Fine-tune, generate and score one run through the entry scripts; the measured fields of its row.

    Raises:
        RunFailed: a step failed; it carries the fields measured before the failure.
    """
    record: dict[str, Any] = {}
    try:
        _execute(spec, ctx, record)
    except Exception as error:
        raise RunFailed(_reason(error), record) from error
    return record


def _execute(spec: RunSpec, ctx: SweepContext, record: dict[str, Any]) -> None:
    from nemo_tiedlora.demo.run import _run
    from nemo_tiedlora.study.tasks import TASKS

    task = TASKS[spec.task]
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    exp_dir = ctx.out / "runs"
    run_dir = exp_dir / spec.name
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale attempt must not be read as this one
    finetune_log, generate_log = logs / f"{spec.name}.finetune.log", logs / f"{spec.name}.generate.log"
    record.update(finetune_log=str(finetune_log), generate_log=str(generate_log))
    with _quiet(ctx.verbose):
        _run(finetune_args(spec, ctx, exp_dir=exp_dir), log=finetune_log, title=f"fine-tune {spec.name}")
    adapters = sorted(run_dir.rglob("checkpoints/*.nemo"), key=os.path.getmtime)
    if not adapters:
        raise RuntimeError(f"fine-tuning wrote no adapter .nemo under {run_dir}")
    adapter = adapters[-1]
    steps, best = _training_record(run_dir, ctx.cfg.early_stopping.monitor)
    if steps is None:
        steps = _steps_from_checkpoints(run_dir)
    stopped = _EARLY_STOP_MARK in finetune_log.read_text(errors="replace")
    if ctx.cfg.early_stopping.enabled and not stopped and steps is not None:
        stopped = steps < ctx.cfg.training.max_steps
    record.update(adapter=str(adapter), steps_run=steps, early_stopped=stopped, best_val_loss=best)

    predictions = ctx.out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    if hasattr(task, "score_loglik"):  # multiple choice: the paper ranks the endings by log-likelihood
        scores_file = predictions / f"{spec.name}.loglik.json"
        scores_file.unlink(missing_ok=True)
        with _quiet(ctx.verbose):
            _run(loglik_args(ctx, adapter=adapter, out=scores_file), log=generate_log, title=f"score {spec.name}")
        scores = json.loads(scores_file.read_text())
        record.update(metric=float(scores["metric"]), scores={k: v for k, v in scores.items() if k != "metric"})
        return
    prefix = predictions / spec.name
    for stale in predictions.glob(f"{spec.name}_*.jsonl"):
        stale.unlink()
    with _quiet(ctx.verbose):
        _run(generate_args(ctx, adapter=adapter, prefix=prefix), log=generate_log, title=f"generate {spec.name}")
    files = sorted(predictions.glob(f"{spec.name}_*.jsonl"), key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"generation wrote no predictions file {prefix}_*.jsonl")
    examples = task.load(ctx.source, "test")
    scores = task.score(read_predictions(files[-1], examples), examples)
    record.update(metric=float(scores["metric"]), scores={k: v for k, v in scores.items() if k != "metric"})


_ERROR_LINE = re.compile(r"(?<![\w.])[\w.]*(Error|Exception|Interrupt): .*")  # "[rank0]: RuntimeError: ..."


def _reason(error: BaseException) -> str:
    """One line: the first line of the error and, for a failed script, the last exception line of its log tail."""
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    reason = lines[0]
    errors = [match.group(0).strip() for match in map(_ERROR_LINE.search, lines[1:]) if match]
    if errors:
        reason = f"{reason.split(';')[0]}: {errors[-1]}"
    if not isinstance(error, RuntimeError):
        reason = f"{type(error).__name__}: {reason}"
    reason = " ".join(reason.split())[:300]
    if "tensor of 0 elements" in reason:  # NeMo's SFT dataset cut a prompt to nothing to fit max_seq_length
        reason += " (prompts truncated to nothing: raise training/generation max_seq_length)"
    return reason


def _failure(error: BaseException) -> str:
    """``failed: <reason>`` for the status column."""
    return "failed: " + (error.reason if isinstance(error, RunFailed) else _reason(error))


def _base_row(spec: RunSpec, ctx: SweepContext) -> dict[str, Any]:
    from nemo_tiedlora.study.tasks import TASKS

    return {
        "task": spec.task,
        "preset": spec.preset,
        "rank": spec.rank,
        "lr": spec.lr,
        "metric": None,
        "metric_name": TASKS[spec.task].metric_name,
        "trainable_params": trainable_params(ctx.shape, spec.preset, spec.rank),
        "max_steps": ctx.cfg.training.max_steps,
        "run": spec.name,
        "fingerprint": ctx.fingerprint,
    }


def run_sweep(
    cfg: SweepConfig,
    *,
    runner: Runner = execute_run,
    context: SweepContext | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Run (or resume) the whole grid; return the rows as written to ``results.csv``/``results.json``.

    Runs recorded ok with the same fingerprint in the output folder's ``results.json`` are skipped. After every
    run both results files are rewritten atomically. A run that raises is recorded as ``failed: <reason>`` and the
    sweep goes on; KeyboardInterrupt stops it with the finished runs on disk.
    """
    from tqdm import tqdm

    ctx = context if context is not None else prepare_context(cfg, verbose=verbose)
    grid = expand_grid(cfg)
    previous = read_previous(ctx.out)
    done = reusable_rows(previous, grid, ctx.fingerprint)
    dropped = len(previous) - len(done)
    if done:
        print(f"resuming: {len(done)} of {len(grid)} run(s) already ok in {ctx.out / 'results.json'}", flush=True)
    if dropped:
        print(f"{dropped} earlier row(s) (failed, or another grid/budget) will be replaced", flush=True)
    rows: dict[tuple, dict[str, Any]] = dict(done)

    def save() -> None:
        ordered = [rows[spec.key] for spec in grid if spec.key in rows]
        write_results(ctx.out, add_percent_of_best_lora(ordered))

    todo = [spec for spec in grid if spec.key not in done]
    progress = tqdm(total=len(grid), initial=len(grid) - len(todo), desc=f"sweep {cfg.task}", unit="run",
                    file=sys.stderr, dynamic_ncols=True)
    try:
        for spec in todo:
            progress.set_postfix_str(spec.name)
            started = time.time()
            row = _base_row(spec, ctx)
            try:
                row.update(runner(spec, ctx))
                row["status"] = _OK
            except Exception as error:  # a failed run is recorded and the sweep goes on
                row.update(getattr(error, "record", {}))
                row["status"] = _failure(error)
            row["seconds"] = round(time.time() - started, 1)
            rows[spec.key] = row
            save()
            progress.update(1)
    finally:
        progress.close()
    save()
    final = add_percent_of_best_lora([rows[spec.key] for spec in grid if spec.key in rows])
    print(format_summary(final), flush=True)
    print(f"results: {ctx.out / 'results.csv'} and {ctx.out / 'results.json'}", flush=True)
    return final


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of the rows: preset, rank, lr, metric, params, % of best LoRA, steps, status."""
    header = ["task", "preset", "rank", "lr", "metric", "params", "% best lora", "steps", "early stop", "status"]
    lines = []
    for row in rows:
        metric, percent = _finite(row.get("metric")), _finite(row.get("percent_of_best_lora"))
        steps = row.get("steps_run")
        lines.append([
            str(row["task"]), str(row["preset"]), str(row["rank"]), f"{float(row['lr']):g}",
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


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` to the ``python -m nemo_tiedlora`` subcommands."""
    parser = subparsers.add_parser(
        "sweep",
        help="presets x ranks x learning rates on a task through NeMo's entry scripts, one results file",
        description="Fine-tune (with early stopping), generate on the test split and score every (preset, rank, "
        "lr) of a study config through NeMo's entry scripts; write results.csv and results.json (resumable). "
        "Example config: conf/study.yaml.",
    )
    parser.add_argument("--config", required=True, type=Path, help="study YAML (see conf/study.yaml)")
    parser.add_argument("--output", type=Path, help="override the config's output folder")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and list the runs, run nothing")
    parser.add_argument("--verbose", action="store_true", help="echo the entry scripts' progress lines")
    parser.set_defaults(handler=_run_sweep_command)


def _run_sweep_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, output=args.output)
    grid = expand_grid(cfg)
    if args.dry_run:
        print(f"{len(grid)} run(s) of {cfg.task} into {cfg.output}:")
        for spec in grid:
            print(f"  {spec.name}")
        return 0
    rows = run_sweep(cfg, verbose=args.verbose)
    return 0 if all(row.get("status") == _OK for row in rows) else 1

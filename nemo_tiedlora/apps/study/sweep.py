"""The study sweep: ``python -m nemo_tiedlora sweep --config study.yaml``.

Runs every (preset, rank, learning rate) of a study config on one task through NeMo's own entry scripts, each in
its own subprocess (the command a user types); then, as the config asks, rates beyond the grid's edge while a
preset's best rate is at the edge (``extend_edges``; a study that ends with a best rate at the edge exits 1), the best
rate of each (preset, rank) with more seeds (``rerun_best_seeds``), and presets at other ranks at that rate
(``best_lr_at_ranks``). Each preset may have its own rates (``lrs`` as a mapping). One run:

1. ``examples/.../megatron_gpt_finetuning.py`` fine-tunes the base ``.nemo`` with ``peft_scheme=tiedlora`` and
   exp_manager's early stopping on the validation loss; exp_manager keeps the best checkpoint and writes the
   adapter ``.nemo`` from it at the end;
2. ``examples/.../megatron_gpt_generate.py`` generates greedily on the test split with base + adapter and writes
   the predictions file;
3. the task adapter (:mod:`nemo_tiedlora.apps.study.tasks`) scores the predictions with the task's metric.

One results file, ``results.csv`` and the same rows as ``results.json`` in the output folder, gets a row per run:
task, preset, rank, lr, metric, metric_name, trainable_params (closed form for the base's shape, read from its
``model_config.yaml``), percent_of_best_lora (trainable_params / trainable_params of the task's best-metric LoRA
run * 100; empty without a finished LoRA run), status (``ok`` or ``failed: <reason>``), steps_run, early_stopped,
best_val_loss, adapter, seconds and the run's log files. Both files are rewritten atomically after every run, so an
interrupted sweep keeps what finished; running the same config again skips the runs already recorded ``ok`` (with
the same training, data and base: see ``fingerprint``) and re-runs the others. ``python -m nemo_tiedlora report
results.csv`` turns the file into the paper-style table and plots. With ``evaluate_base: true`` the base model
alone (no adapter) answers the test split once by step 2's command and is scored by step 3; the result goes to
``base.json`` beside the results (reused while the fingerprint holds), and the report prints it per task.

Multiple choice (HellaSwag) is scored as in the paper, by the log-likelihood of each ending: step 2 is then
``python -m nemo_tiedlora.apps.study.loglik`` (the model loaded as the generate script loads it, every ending's summed
log-probability given the prompt, :meth:`~nemo_tiedlora.apps.study.tasks.hellaswag.HellaSwagTask.score_loglik`), whose
``metric`` is the per-character-normalized accuracy (``accuracy`` is the raw one).

Nothing here imports NeMo: the parent process only orchestrates, so a bad config fails in a second. Its children
cannot outlive it (:mod:`nemo_tiedlora.apps.study.child`); Ctrl-C stops the running child and exits with code 130.

Layout: :mod:`.sweep_config` (the study config), :mod:`.sweep_results` (grid, counts, results files),
:mod:`.sweep_runs` (one run through the entry scripts), :mod:`.child` (child processes); this module runs the grid
and holds the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nemo_tiedlora.core.fileio import atomic_write_bytes

from nemo_tiedlora.apps.study.sweep_config import (
    EMBEDDED,
    SAMPLE,
    EarlyStoppingSettings,
    GenerationSettings,
    SweepConfig,
    SweepConfigError,
    TrainingSettings,
    load_config,
    parse_config,
)
from nemo_tiedlora.apps.study.sweep_results import (
    _OK,
    BASE_FILE,
    COLUMNS,
    RunSpec,
    add_percent_of_best_lora,
    best_lr_reruns,
    edge_extensions,
    expand_grid,
    is_rerun,
    format_summary,
    read_previous,
    rank_follow_up_reruns,
    rank_follow_ups,
    rerun_count,
    reusable_rows,
    trainable_params,
    write_results,
)
from nemo_tiedlora.apps.study.sweep_runs import (
    Runner,
    RunFailed,
    SweepContext,
    _base_row,
    _failure,
    _reason,
    execute_base,
    execute_run,
    finetune_args,
    generate_args,
    loglik_args,
    prepare_context,
    read_predictions,
    training_record,
)

__all__ = [
    "BASE_FILE",
    "COLUMNS",
    "EMBEDDED",
    "SAMPLE",
    "EarlyStoppingSettings",
    "GenerationSettings",
    "RunFailed",
    "RunSpec",
    "SweepConfig",
    "SweepConfigError",
    "SweepContext",
    "TrainingSettings",
    "add_percent_of_best_lora",
    "add_sweep_parser",
    "base_result",
    "execute_base",
    "execute_run",
    "expand_grid",
    "finetune_args",
    "generate_args",
    "load_config",
    "loglik_args",
    "parse_config",
    "read_predictions",
    "run_sweep",
    "trainable_params",
    "training_record",
    "write_results",
]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
BaseRunner = Callable[[SweepContext], Mapping[str, Any]]


def run_sweep(
    cfg: SweepConfig,
    *,
    runner: Runner = execute_run,
    base_runner: BaseRunner = execute_base,
    context: SweepContext | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Run (or resume) the whole study; return the rows as written to ``results.csv``/``results.json``.

    Stages, each after the one before: the grid; rates beyond its edge while a (preset, rank)'s best rate is at the
    edge (``extend_edges`` at most); the best rate of each (preset, rank) with every ``rerun_best_seeds`` seed; the
    ``best_lr_at_ranks`` presets at their ranks and rates, extended at the edge like the grid, then their best rate
    with every ``rerun_best_seeds`` seed. Runs recorded ok with the same fingerprint in the output folder's
    ``results.json`` are skipped. After every run both results files are rewritten atomically. A run that raises is
    recorded as ``failed: <reason>`` and the sweep goes on; KeyboardInterrupt stops it with the finished runs on disk.
    With ``evaluate_base``, first the base model alone (:func:`base_result`).
    """
    from tqdm import tqdm

    ctx = context if context is not None else prepare_context(cfg, verbose=verbose)
    grid = expand_grid(cfg)
    previous = read_previous(ctx.out)
    done = reusable_rows(previous, grid, ctx.fingerprint)
    if done:
        print(f"resuming: {len(done)} of {len(grid)} grid run(s) already ok in {ctx.out / 'results.json'}",
              flush=True)
    rows: dict[tuple, dict[str, Any]] = {}
    order = {preset: index for index, preset in enumerate(cfg.presets)}

    def ordered() -> list[dict[str, Any]]:  # the grid (with its extensions), then the runs that follow it
        def key(row: dict[str, Any]) -> tuple:
            follows = is_rerun(row) or int(row["rank"]) not in cfg.ranks
            seed = (cfg.training.seed, *cfg.rerun_best_seeds).index(int(row["seed"])) \
                if int(row["seed"]) in (cfg.training.seed, *cfg.rerun_best_seeds) else len(cfg.rerun_best_seeds) + 1
            return (follows, order.get(row["preset"], len(order)), int(row["rank"]), seed, float(row["lr"]))
        return sorted(rows.values(), key=key)

    def save() -> None:
        write_results(ctx.out, add_percent_of_best_lora(ordered()))

    base = base_result(ctx, base_runner) if cfg.evaluate_base else None
    progress = tqdm(total=len(grid) + rerun_count(cfg), desc=f"sweep {cfg.task}", unit="run", file=sys.stderr,
                    dynamic_ncols=True)

    def stage(specs: list[RunSpec]) -> None:
        kept = {key: row for key, row in reusable_rows(previous, specs, ctx.fingerprint).items() if key not in rows}
        rows.update(kept)
        progress.update(len(kept))
        _run_all([spec for spec in specs if spec.key not in rows], runner, ctx, rows, progress, save)

    def extend() -> None:  # rates beyond the edge, one per (preset, rank) and round, until every best is inside
        while extra := edge_extensions(cfg, list(rows.values()))[0]:
            progress.total += len(extra)
            stage(extra)

    try:
        stage(grid)
        extend()
        stage(best_lr_reruns(cfg, list(rows.values())))
        stage(rank_follow_ups(cfg, list(rows.values())))
        extend()
        stage(rank_follow_up_reruns(cfg, list(rows.values())))
    finally:
        progress.close()
    save()
    final = add_percent_of_best_lora(ordered())
    print(format_summary(final), flush=True)
    if base is not None:
        print(f"base model without an adapter: {base['metric_name']} {float(base['metric']):.2f}", flush=True)
    for line in edge_extensions(cfg, final)[1]:
        print(f"best at the edge: {line}", flush=True)
    print(f"results: {ctx.out / 'results.csv'} and {ctx.out / 'results.json'}", flush=True)
    return final


def base_result(ctx: SweepContext, runner: BaseRunner = execute_base) -> dict[str, Any] | None:
    """The base model's score on the test split without an adapter: ``base.json`` in the output folder when it holds
    this study's fingerprint, else measured by ``runner`` now and written there atomically. A failure is printed and
    not recorded (the next sweep tries again); the runs go on."""
    path = ctx.out / BASE_FILE
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(previous, dict) and previous.get("fingerprint") == ctx.fingerprint \
                and previous.get("metric") is not None:
            return previous
    print(f"base model without an adapter: answering the test split of {ctx.cfg.task}", flush=True)
    started = time.time()
    try:
        record = dict(runner(ctx))
    except Exception as error:  # the study does not need it; its absence is visible in the report
        print(f"base model without an adapter: failed: {_reason(error)}", file=sys.stderr, flush=True)
        return None
    record = {"task": ctx.cfg.task, **record, "seconds": round(time.time() - started, 1),
              "fingerprint": ctx.fingerprint}
    atomic_write_bytes(path, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return record


def _run_all(specs: list[RunSpec], runner: Runner, ctx: SweepContext, rows: dict[tuple, dict[str, Any]],
             progress: Any, save: Any) -> None:
    """Run ``specs`` one after the other, recording each row (ok or ``failed: <reason>``) and saving after each."""
    for spec in specs:
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


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` to the ``python -m nemo_tiedlora`` subcommands."""
    parser = subparsers.add_parser(
        "sweep",
        help="presets x ranks x learning rates on a task through NeMo's entry scripts, one results file",
        description="Fine-tune (with early stopping), generate on the test split and score every (preset, rank, "
        "lr) of a study config through NeMo's entry scripts; write results.csv and results.json (resumable). "
        "Example config: conf/study.yaml.",
    )
    parser.add_argument("--config", required=True, type=Path,
                        help="study YAML, or the name of a shipped one: study (conf/study.yaml), study_smollm2, "
                        "study_smollm2_extraction, study_smollm2_arithmetic")
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
        if cfg.extend_edges:
            print(f"then up to {cfg.extend_edges} rate(s) per (preset, rank) beyond the grid while its best rate is "
                  "at the grid's edge")
        if rerun_count(cfg):
            follow = cfg.best_lr_at_ranks
            print(f"then the best lr of each (preset, rank) again with seed(s) "
                  f"{', '.join(map(str, cfg.rerun_best_seeds)) or '(none)'}"
                  + (f", and {', '.join(follow.presets)} at rank(s) {', '.join(map(str, follow.ranks))} at that "
                     f"rate moved by {', '.join(f'{step:+d}' for step in follow.steps)} grid step(s), the best of "
                     "them with every seed" if follow.ranks else "") + f": {rerun_count(cfg)} run(s)")
        if cfg.evaluate_base:
            print(f"and first the base model without an adapter on the test split, once (into {BASE_FILE})")
        return 0
    try:
        rows = run_sweep(cfg, verbose=args.verbose)
    except KeyboardInterrupt:
        results = cfg.output / "results.csv"
        print(f"\nsweep interrupted: the runs finished so far are in {results}; run the same command again to resume",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if edge_extensions(cfg, rows)[1]:
        print("sweep finished with a best rate at the edge of what it tried (listed above): the study is not tuned "
              "there; widen lrs or raise extend_edges and run the same command again", file=sys.stderr, flush=True)
        return 1
    return 0 if all(row.get("status") == _OK for row in rows) else 1

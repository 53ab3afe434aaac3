"""One run of the sweep: its context, the entry scripts' command lines, fine-tune -> generate (or log-likelihood)
-> score, and what the run's logs say (steps run, early stopping, best validation loss).

Every step is the command a user types, run as a child process bound to the sweep (:mod:`.child`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_tiedlora.apps.study.child import PID_FILE, claim_run_folder
from nemo_tiedlora.apps.runner import entry_script, run_logged
from nemo_tiedlora.apps.study.sweep_config import EMBEDDED, SAMPLE, SMOLLM2, SweepConfig
from nemo_tiedlora.apps.study.sweep_results import RunSpec, base_shape, fingerprint, trainable_params

_EMBEDDED_WORK = Path(".cache/demo")  # shared with `python -m nemo_tiedlora demo`: the base is built once
_EARLY_STOP_MARK = "Signaling Trainer to stop"  # Lightning's EarlyStopping message when it stops training
# Scalars logged once per optimizer step (Lightning logs step n - 1 during the n-th step). Validation scalars are
# not among them: "validation_step_timing in s" is logged once per validation *batch*.
TRAINING_TAGS = ("reduced_train_loss", "train_step_timing in s", "global_step", "consumed_samples", "lr")


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
    from nemo_tiedlora.apps.demo.data import build_all
    from nemo_tiedlora.apps.demo.embedded import embedded_base

    work = _EMBEDDED_WORK.resolve()
    work.mkdir(parents=True, exist_ok=True)
    return embedded_base(work, build_all(work / "data"), echo=verbose)


def prepare_context(cfg: SweepConfig, *, verbose: bool = False) -> SweepContext:
    """Resolve the base (building the embedded one if needed), read its shape, write the task's SFT splits."""
    from nemo_tiedlora.apps.study.tasks import TASKS, prepare

    out = cfg.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.base == EMBEDDED:
        base = _embedded_base(verbose)
    elif cfg.base == SMOLLM2:
        from nemo_tiedlora.apps.demo import smollm2

        print(f"base model: SmolLM2-135M-Instruct -> import-hf (cached in {smollm2.SHARED_CACHE})", flush=True)
        base = smollm2.imported_base(smollm2.SHARED_CACHE)
    else:
        base = Path(cfg.base).expanduser().resolve()
    shape = base_shape(base)
    for preset in cfg.presets:  # a rank the model cannot take fails now, not after the first runs
        for rank in cfg.ranks:
            trainable_params(shape, preset, rank)
    if cfg.data == SAMPLE:
        sizes = {} if cfg.sample_sizes is None else {"sizes": cfg.sample_sizes}
        source = TASKS[cfg.task].write_sample(out / "data" / f"{cfg.task}-sample", **sizes)
    else:
        source = Path(cfg.data).expanduser().resolve()
    sft = prepare(cfg.task, source, out / "data" / f"{cfg.task}-sft")
    fp = fingerprint(cfg, base=base, data=cfg.data if cfg.data == SAMPLE else source)
    return SweepContext(cfg=cfg, base=base, shape=shape, sft=sft, source=source, out=out, fingerprint=fp,
                        verbose=verbose)


def finetune_args(spec: RunSpec, ctx: SweepContext, *, exp_dir: Path) -> list[str]:
    """The hydra command line of ``megatron_gpt_finetuning.py`` for one run."""
    t, e = ctx.cfg.training, ctx.cfg.early_stopping
    args = [
        sys.executable,
        str(entry_script("megatron_gpt_finetuning.py")),
        f"model.restore_from_path={ctx.base}",
        "model.peft.peft_scheme=tiedlora",
        f"model.peft.tiedlora_tuning.preset={spec.preset}",
        f"model.peft.tiedlora_tuning.adapter_dim={spec.rank}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"trainer.max_steps={t.max_steps}",
        f"trainer.val_check_interval={t.val_check_interval}",
        f"trainer.limit_val_batches={t.limit_val_batches!r}",  # an int is a number of batches, a float a fraction
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=False",
        # one seed for everything random in a run: megatron's init, the adapter's factors (LoRA's A, VeRA's frozen
        # A/B), the order of the training samples
        *(f"{key}={t.seed if spec.seed is None else spec.seed}"
          for key in ("model.seed", "model.peft.tiedlora_tuning.seed", "model.data.train_ds.seed")),
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
        *template_overrides(ctx, "train_ds", "validation_ds"),
        *ctx.cfg.overrides,
    ]
    return args


def template_overrides(ctx: SweepContext, *splits: str) -> list[str]:
    """``model.data.<split>.prompt_template='...'`` for the study's prompt template (none without one)."""
    template = ctx.cfg.prompt_template
    return [] if template is None else [f"model.data.{split}.prompt_template='{template}'" for split in splits]


def generate_args(ctx: SweepContext, *, adapter: Path | None, prefix: Path) -> list[str]:
    """The hydra command line of ``megatron_gpt_generate.py`` on the test split with ``adapter`` (None: the base
    model alone)."""
    g = ctx.cfg.generation
    length = g.max_seq_length or ctx.cfg.training.max_seq_length
    return [
        sys.executable,
        str(entry_script("megatron_gpt_generate.py")),
        f"model.restore_from_path={ctx.base}",
        f"model.peft.restore_from_path={adapter if adapter is not None else 'null'}",
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
        *template_overrides(ctx, "test_ds"),
    ]


def loglik_args(ctx: SweepContext, *, adapter: Path | None, out: Path) -> list[str]:
    """The command line of the log-likelihood scorer (multiple choice) on the test split with ``adapter`` (None: the
    base model alone)."""
    g = ctx.cfg.generation
    return [
        sys.executable, "-m", "nemo_tiedlora.apps.study.loglik",
        "--base", str(ctx.base),
        *(["--adapter", str(adapter)] if adapter is not None else []),
        "--task", ctx.cfg.task,
        "--data", str(ctx.source),
        "--split", "test",
        "--out", str(out),
        "--batch-size", str(g.batch_size),
        "--max-seq-length", str(g.max_seq_length or ctx.cfg.training.max_seq_length),
    ]


def training_record(log_dir: Path, monitor: str, *, mode: str = "min") -> tuple[int | None, float | None]:
    """(optimizer steps run, best value of ``monitor``) from the run's TensorBoard events (exp_manager's logger).

    Lightning logs step ``n - 1`` during the n-th optimizer step and validation after it, so the steps run are the
    largest step of the per-step training scalars (:data:`TRAINING_TAGS`) + 1; without those (``log_every_n_steps``
    larger than the run), the largest step of ``monitor`` + 1. Scalars logged per validation batch are ignored.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None, None
    train_step, monitor_step, best = None, None, None
    better = min if mode == "min" else max
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag not in TRAINING_TAGS and tag != monitor:
                continue
            for event in accumulator.Scalars(tag):
                if tag in TRAINING_TAGS:
                    train_step = event.step if train_step is None else max(train_step, event.step)
                else:
                    monitor_step = event.step if monitor_step is None else max(monitor_step, event.step)
                    if math.isfinite(event.value):
                        best = event.value if best is None else better(best, event.value)
    last = train_step if train_step is not None else monitor_step
    return (None if last is None else last + 1), best


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
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    exp_dir = ctx.out / "runs"
    run_dir = exp_dir / spec.name
    claim_run_folder(run_dir)  # refuses a folder a live orphan writes into; else clears the stale attempt
    finetune_log, generate_log = logs / f"{spec.name}.finetune.log", logs / f"{spec.name}.generate.log"
    record.update(finetune_log=_shown(finetune_log), generate_log=_shown(generate_log))
    child = dict(echo=ctx.verbose, pid_file=run_dir / PID_FILE, marker=spec.name)
    run_logged(finetune_args(spec, ctx, exp_dir=exp_dir), log=finetune_log, title=f"fine-tune {spec.name}", **child)
    adapters = sorted(run_dir.rglob("checkpoints/*.nemo"), key=os.path.getmtime)
    if not adapters:
        raise RuntimeError(f"fine-tuning wrote no adapter .nemo under {run_dir}")
    adapter = adapters[-1]
    steps, best = training_record(run_dir, ctx.cfg.early_stopping.monitor, mode=ctx.cfg.early_stopping.mode)
    if steps is None:
        steps = _steps_from_checkpoints(run_dir)
    stopped = _EARLY_STOP_MARK in finetune_log.read_text(errors="replace")
    if ctx.cfg.early_stopping.enabled and not stopped and steps is not None:
        stopped = steps < ctx.cfg.training.max_steps
    record.update(adapter=_shown(adapter), steps_run=steps, early_stopped=stopped, best_val_loss=best)
    _score(ctx, adapter=adapter, name=spec.name, log=generate_log, child=child, record=record)


def execute_base(ctx: SweepContext) -> dict[str, Any]:
    """Generate (or score by log-likelihood) and score the test split with the base model alone, no adapter, by the
    same command as every run; the fields of ``base.json`` (metric, metric_name, scores, generate_log)."""
    from nemo_tiedlora.apps.study.tasks import TASKS

    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = f"{ctx.cfg.task}_base"
    log = logs / f"{name}.generate.log"
    record: dict[str, Any] = {"metric_name": TASKS[ctx.cfg.task].metric_name, "generate_log": _shown(log)}
    _score(ctx, adapter=None, name=name, log=log, child=dict(echo=ctx.verbose), record=record)
    return record


def _score(ctx: SweepContext, *, adapter: Path | None, name: str, log: Path, child: Mapping[str, Any],
           record: dict[str, Any]) -> None:
    """Answer the test split with the base (+ ``adapter``) and put ``metric`` and ``scores`` into ``record``."""
    from nemo_tiedlora.apps.study.tasks import TASKS

    task = TASKS[ctx.cfg.task]
    predictions = ctx.out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    if hasattr(task, "score_loglik"):  # multiple choice: the paper ranks the endings by log-likelihood
        scores_file = predictions / f"{name}.loglik.json"
        scores_file.unlink(missing_ok=True)
        run_logged(loglik_args(ctx, adapter=adapter, out=scores_file), log=log, title=f"score {name}", **child)
        scores = json.loads(scores_file.read_text())
        record.update(metric=float(scores["metric"]), scores={k: v for k, v in scores.items() if k != "metric"})
        return
    prefix = predictions / name
    for stale in predictions.glob(f"{name}_*.jsonl"):
        stale.unlink()
    run_logged(generate_args(ctx, adapter=adapter, prefix=prefix), log=log, title=f"generate {name}", **child)
    files = sorted(predictions.glob(f"{name}_*.jsonl"), key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"generation wrote no predictions file {prefix}_*.jsonl")
    examples = task.load(ctx.source, "test")
    scores = task.score(read_predictions(files[-1], examples), examples)
    record.update(metric=float(scores["metric"]), scores={k: v for k, v in scores.items() if k != "metric"})


def _shown(path: Path) -> str:
    """``path`` as a results row records it: relative to the current folder when below it (a study kept in a
    repository reads the same on every checkout), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


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
    from nemo_tiedlora.apps.study.tasks import TASKS

    return {
        "task": spec.task,
        "preset": spec.preset,
        "rank": spec.rank,
        "lr": spec.lr,
        "seed": ctx.cfg.training.seed if spec.seed is None else spec.seed,
        "seed_rerun": spec.seed is not None,
        "metric": None,
        "metric_name": TASKS[spec.task].metric_name,
        "trainable_params": trainable_params(ctx.shape, spec.preset, spec.rank),
        "max_steps": ctx.cfg.training.max_steps,
        "run": spec.name,
        "fingerprint": ctx.fingerprint,
    }



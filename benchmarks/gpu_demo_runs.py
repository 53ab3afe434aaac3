"""The demo part of the GPU check: the embedded demo base fine-tuned (tl6, rank 8) through NeMo's entry script in
several precisions, and each run's per-step losses against the fp32 run with the same optimizer.

Runs (``DEMO_RUNS``; same seed, data order and settings, 16 examples a step, Adam at 1e-2 without warm-up):
fp32; bf16-mixed; 16-mixed (NeMo's GradScaler from 2^16: an overflow is skipped and halves the scale, the run goes
on); fp32 and bf16 O2 with megatron's distributed optimizer (O2 needs it here: plain optimizers with O2 are refused).
The losses are the ``reduced_train_loss`` scalars NeMo's TensorBoard logger writes every step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples/nlp/language_modeling/tuning/megatron_gpt_finetuning.py"
TOLERANCE = 0.05  # largest |loss - fp32 loss| / fp32 loss over the steps, for a mixed-precision run

# name: (overrides, the fp32 run it is compared with, or None for a reference)
DEMO_RUNS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "fp32": (("trainer.precision=32", "model.optim.name=adam"), None),
    "bf16_mixed": (("trainer.precision=bf16-mixed", "model.optim.name=adam"), "fp32"),
    "fp16_mixed": (("trainer.precision=16-mixed", "model.optim.name=adam", "++model.native_amp_init_scale=65536"),
                   "fp32"),
    "fp32_distopt": (("trainer.precision=32", "model.optim.name=mcore_distributed_optim"), None),
    "bf16_O2": (("trainer.precision=bf16-mixed", "model.megatron_amp_O2=True",
                 "model.optim.name=mcore_distributed_optim"), "fp32_distopt"),
}


def demo_command(name: str, *, work: Path, data: Path, steps: int, accelerator: str) -> list[str]:
    """The entry script's command line for run `name` on the base prepared in `work` and the SFT splits in `data`
    (a folder of the run's own: NeMo writes its line index beside each JSONL file)."""
    overrides, _ = DEMO_RUNS[name]
    return [
        sys.executable, str(SCRIPT), f"model.restore_from_path={work / 'base.nemo'}",
        "model.peft.peft_scheme=tiedlora", "model.peft.tiedlora_tuning.preset=tl6",
        "model.peft.tiedlora_tuning.adapter_dim=8", f"trainer.accelerator={accelerator}", "trainer.devices=1",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=False",
        "model.global_batch_size=16", "model.micro_batch_size=16", "model.optim.lr=1e-2",
        "model.optim.sched.warmup_steps=0", f"exp_manager.exp_dir={work / 'runs'}", f"name={name}",
        "exp_manager.resume_if_exists=False", "exp_manager.create_checkpoint_callback=False",
        f"model.data.train_ds.file_names=[{data / 'train.jsonl'}]",
        f"model.data.validation_ds.file_names=[{data / 'validation.jsonl'}]",
        "model.data.validation_ds.names=[validation]", "model.data.train_ds.max_seq_length=64",
        "model.data.validation_ds.max_seq_length=64", "model.data.train_ds.num_workers=0",
        "model.data.train_ds.memmap_workers=1", *overrides,
    ]


def read_scalars(run_dir: Path) -> dict:
    """{'loss': {step: value}, 'loss_scale': {step: value}} from the newest TensorBoard events file of a run."""
    found: dict = {"loss": {}, "loss_scale": {}}
    events = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not events:
        return found
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags().get("scalars", [])
    for key, tag in (("loss", "reduced_train_loss"), ("loss_scale", "loss_scale")):
        if tag in tags:
            found[key] = {event.step: float(event.value) for event in accumulator.Scalars(tag)}
    return found


def compare_losses(scalars: dict[str, dict], *, steps: int, tolerance: float = TOLERANCE) -> dict:
    """Per run: steps logged, first / last loss, all finite, and for a mixed-precision run the largest relative
    difference of its per-step losses from its fp32 run's; 'all_within' when every run logged every step with
    finite losses and every comparison is within `tolerance`."""
    rows, ok = {}, True
    for name, (_, reference) in DEMO_RUNS.items():
        losses = scalars.get(name, {}).get("loss", {})
        values = [losses[s] for s in sorted(losses)]
        row = {"steps_logged": len(values), "first_loss": values[0] if values else None,
               "last_loss": values[-1] if values else None, "finite": all(math.isfinite(v) for v in values),
               "reference": reference, "losses": values}
        scale = scalars.get(name, {}).get("loss_scale", {})
        if scale:
            row["loss_scale_first_last"] = [scale[min(scale)], scale[max(scale)]]
        if "overflows_logged" in scalars.get(name, {}):
            row["overflows_skipped"] = scalars[name]["overflows_logged"]
        good = len(values) == steps and row["finite"]
        if reference is not None:
            ref = scalars.get(reference, {}).get("loss", {})
            common = sorted(set(ref) & set(losses))
            row["max_rel_diff"] = (max(abs(losses[s] - ref[s]) / abs(ref[s]) for s in common) if common else None)
            good = good and row["max_rel_diff"] is not None and row["max_rel_diff"] <= tolerance
        row["ok"] = good
        ok = ok and good
        rows[name] = row
    return {"runs": rows, "tolerance": tolerance, "all_within": ok}

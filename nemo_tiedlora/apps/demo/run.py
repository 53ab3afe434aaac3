"""The main job on the embedded default: data -> tiny base .nemo -> Tied-LoRA fine-tuning through NeMo's entry
script -> generation with and without the adapter on the test split -> a short table.

Every step that NeMo runs is a real NeMo entry script in a subprocess (the same command a user types); the
tokenizer, data and base model are cached under the work folder, so a second run only fine-tunes and evaluates.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nemo_tiedlora.apps.demo.data import build_all, score
from nemo_tiedlora.apps.demo.embedded import embedded_base
from nemo_tiedlora.apps.runner import entry_script, run_logged


@dataclass(frozen=True)
class DemoSettings:
    """Fine-tuning budget of the demo (CPU, 2 cores: a few minutes)."""

    preset: str = "tl6"
    rank: int = 8
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-2
    max_seq_length: int = 64
    tokens_to_generate: int = 3
    seed: int = 1234  # adapter initialization and training-data order
    compare: bool = True  # also train and evaluate LoRA at the same rank on the same budget
    update: str = "fused"  # diagnostic: "reference" runs the plain composition (demo/reference_update.py)


def _run(args: list[str], *, log: Path, title: str) -> None:
    """Run a NeMo entry script (or our own command) bound to the demo: Lightning's progress bar and our summary
    lines reach the terminal, everything goes to `log`."""
    run_logged(args, log=log, title=title, echo=True)


def _data_overrides(data, settings: DemoSettings) -> list[str]:
    common = [
        f"model.data.train_ds.max_seq_length={settings.max_seq_length}",
        f"model.data.validation_ds.max_seq_length={settings.max_seq_length}",
        "model.data.train_ds.memmap_workers=1",
        "model.data.train_ds.num_workers=0",
    ]
    return [
        f"model.data.train_ds.file_names=[{data.train}]",
        f"model.data.validation_ds.file_names=[{data.validation}]",
        "model.data.validation_ds.names=[validation]",
        *common,
    ]


def _script(name: str, settings: DemoSettings) -> list[str]:
    """The command that runs entry script `name`: directly, or through the reference-update launcher."""
    if settings.update == "reference":
        return [sys.executable, "-m", "nemo_tiedlora.apps.demo.reference_update", str(entry_script(name))]
    if settings.update != "fused":
        raise ValueError(f"update must be 'fused' or 'reference', got {settings.update!r}")
    return [sys.executable, str(entry_script(name))]


def finetune(*, base: Path, data, work: Path, settings: DemoSettings, extra: tuple[str, ...] = ()) -> Path:
    """Fine-tune through examples/.../megatron_gpt_finetuning.py (plus hydra overrides `extra`); return the
    adapter .nemo."""
    exp_dir = work / "runs"
    name = f"demo_{settings.preset}_r{settings.rank}"
    args = [
        *_script("megatron_gpt_finetuning.py", settings),
        f"model.restore_from_path={base}",
        "model.peft.peft_scheme=tiedlora",
        f"model.peft.tiedlora_tuning.preset={settings.preset}",
        f"model.peft.tiedlora_tuning.adapter_dim={settings.rank}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"trainer.max_steps={settings.steps}",
        f"trainer.val_check_interval={settings.steps}",
        "trainer.limit_val_batches=4",
        "trainer.log_every_n_steps=10",
        f"model.global_batch_size={settings.batch_size}",
        f"model.micro_batch_size={settings.batch_size}",
        f"model.optim.lr={settings.lr}",
        "model.optim.sched.warmup_steps=20",
        f"model.seed={settings.seed}",
        f"model.peft.tiedlora_tuning.seed={settings.seed}",
        f"model.data.train_ds.seed={settings.seed}",
        f"exp_manager.exp_dir={exp_dir}",
        f"name={name}",
        "exp_manager.resume_if_exists=False",
        "exp_manager.checkpoint_callback_params.save_top_k=1",
        *_data_overrides(data, settings),
        *extra,
    ]
    _run(args, log=work / f"{name}.finetune.log", title=f"fine-tune {settings.preset} (rank {settings.rank})")
    adapters = sorted((exp_dir / name).rglob("checkpoints/*.nemo"), key=os.path.getmtime)
    if not adapters:
        raise RuntimeError(f"fine-tuning wrote no adapter .nemo under {exp_dir / name}")
    return adapters[-1]


def evaluate(*, base: Path, adapter: Path | None, data, work: Path, settings: DemoSettings, label: str,
             extra: tuple[str, ...] = (), scorer=score) -> float:
    """Greedy generation on the test split through examples/.../megatron_gpt_generate.py (plus hydra overrides
    `extra`); exact-match score."""
    prefix = work / f"predictions_{label}"
    args = [
        *_script("megatron_gpt_generate.py", settings),
        f"model.restore_from_path={base}",
        f"model.peft.restore_from_path={adapter if adapter else 'null'}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"model.data.test_ds.file_names=[{data.test}]",
        "model.data.test_ds.names=[test]",
        f"model.data.test_ds.tokens_to_generate={settings.tokens_to_generate}",
        "model.data.test_ds.global_batch_size=32",
        "model.data.test_ds.micro_batch_size=32",
        f"model.data.test_ds.max_seq_length={settings.max_seq_length}",
        "model.data.test_ds.write_predictions_to_file=True",
        f"model.data.test_ds.output_file_path_prefix={prefix}",
        *extra,
    ]
    _run(args, log=work / f"{label}.generate.log", title=f"evaluate {label} on the test split")
    files = sorted(work.glob(f"predictions_{label}*.jsonl"), key=os.path.getmtime)
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return scorer([row["pred"] for row in rows], [row["label"] for row in rows])


def _trainable_counts(base: Path, settings: DemoSettings) -> dict:
    """Closed-form counts for the base's shape (the fine-tuning log shows the instantiated ones)."""
    from nemo_tiedlora.core.param_counts import params_report

    spec = json.loads(base.with_suffix(".json").read_text())["spec"]
    report = params_report(
        hidden_size=spec["hidden_size"],
        num_layers=spec["num_layers"],
        rank=settings.rank,
        num_attention_heads=spec["num_attention_heads"],
        num_query_groups=spec["num_query_groups"],
    )
    return report


def main(*, work: Path = Path(".cache/demo"), settings: DemoSettings = DemoSettings()) -> dict:
    """Run the whole demo (the chosen preset and, when `settings.compare`, LoRA at the same rank on the same budget);
    print and return the summary."""
    import dataclasses

    started = time.time()
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print("== data: tokenizer, corpus and the supervised task (cached)", flush=True)
    data = build_all(work / "data")
    base = embedded_base(work, data, echo=True)
    base_report = json.loads(base.with_suffix(".json").read_text())
    presets = [settings.preset] + (["lora"] if settings.compare and settings.preset != "lora" else [])
    runs = {preset: dataclasses.replace(settings, preset=preset) for preset in presets}
    adapters = {preset: finetune(base=base, data=data, work=work, settings=run) for preset, run in runs.items()}
    base_score = evaluate(base=base, adapter=None, data=data, work=work, settings=settings, label="base")
    scores = {preset: evaluate(base=base, adapter=adapters[preset], data=data, work=work, settings=run, label=preset)
              for preset, run in runs.items()}
    report = _trainable_counts(base, settings)
    rows = {preset: {"trainable_parameters": report["presets"][preset]["total"],
                     "percent_of_lora": report["presets"][preset]["percent_of_lora"],
                     "adapted_exact_match": scores[preset], "adapter": str(adapters[preset])} for preset in presets}
    row = rows[settings.preset]
    summary = {
        "preset": settings.preset,
        "rank": settings.rank,
        "seed": settings.seed,
        "steps": settings.steps,
        "lr": settings.lr,
        "update": settings.update,
        "trainable_parameters": row["trainable_parameters"],
        "percent_of_lora": row["percent_of_lora"],
        "lora_parameters": report["lora_parameters"],
        "base_exact_match": base_score,
        "adapted_exact_match": row["adapted_exact_match"],
        "adapter": row["adapter"],
        "presets": rows,
        "base_model": str(base),
        "base_pretrain_loss": base_report["final_loss"],
        "seconds": round(time.time() - started, 1),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    table = "\n".join(
        f"  {preset:<8} {r['trainable_parameters']:>10,}  {r['percent_of_lora']:6.1f}%   "
        f"{100 * base_score:5.1f}%  ->  {100 * r['adapted_exact_match']:5.1f}%" for preset, r in rows.items())
    adapters_text = "\n".join(f"  adapter .nemo ({preset}) {r['adapter']}" for preset, r in rows.items())
    print(
        "\n"
        f"  Tied-LoRA demo (rank {settings.rank}, {settings.steps} steps, lr {settings.lr:g}, seed {settings.seed}) "
        "on the embedded task\n"
        f"  preset   trainable   % of LoRA   test exact match: base -> adapted\n"
        f"{table}\n"
        f"{adapters_text}\n"
        f"  wall time              {summary['seconds']:.0f} s\n",
        flush=True,
    )
    return summary

"""The fine-tuning entry script as the multi-process tests run it: one command line, its TP1 reference, the result.

`finetune_command` is the command a user types (the example entry script with Hydra overrides) on the tiny 4-layer
GQA base of `dist_base`: 4 optimizer steps, Adam with eps far above every |grad| (momentum SGD, linear in the
gradients, so rounding-level gradient differences of a split run stay rounding-level; see test_equivalence.py).
Launchers (the relaunch under torchrun, torchrun across nodes, srun, sbatch) put their own words in front of it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples/nlp/language_modeling/tuning/megatron_gpt_finetuning.py"


def finetune_command(base: Path, data: Path, work: Path, name: str, devices: int, *overrides: str,
                     python: str = sys.executable, script: Path = SCRIPT) -> list[str]:
    return [
        python, str(script), f"model.restore_from_path={base}", "trainer.accelerator=cpu",
        f"trainer.devices={devices}", "trainer.max_steps=4", "trainer.gradient_clip_val=0.0",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=False",
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.optim.lr=3e3", "+model.optim.eps=1e4",
        "model.optim.sched.warmup_steps=0", "model.peft.tiedlora_tuning.adapter_dim=4",
        f"model.data.train_ds.file_names=[{data / 'train.jsonl'}]",
        f"model.data.validation_ds.file_names=[{data / 'validation.jsonl'}]",
        "model.data.validation_ds.names=[validation]", "model.data.train_ds.max_seq_length=64",
        "model.data.validation_ds.max_seq_length=64", "model.data.train_ds.memmap_workers=1",
        f"exp_manager.exp_dir={work}", f"name={name}", *overrides,
    ]


def adapter_archive(work: Path, name: str) -> Path:
    """The adapter .nemo the run `name` wrote at the end of training."""
    archives = sorted((work / name).rglob("checkpoints/*.nemo"))
    assert archives, f"no adapter .nemo written by {name}"
    return archives[-1]


def run_finetune(base: Path, data: Path, work: Path, name: str, devices: int, *overrides: str) -> Path:
    """Run the entry script on this host (trainer.devices > 1: it relaunches itself under torchrun)."""
    from tests.script_env import script_env

    command = finetune_command(base, data, work, name, devices, "exp_manager.resume_if_exists=False", *overrides)
    log = work / f"{name}.log"
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=script_env(), cwd=REPO,
                                timeout=900)
    assert result.returncode == 0, "".join(log.read_text().splitlines(True)[-30:])
    return adapter_archive(work, name)


def assert_same_adapter(run, reference, *, what: str) -> None:
    """One logical, TP/PP-independent state: the same keys (A, B once; u/v by global layer), equal at fp32's
    rounding of a split run (rtol 1e-5, atol 1e-6), and trained away from B's zero init."""
    assert sorted(run.tensors) == sorted(reference.tensors)
    for key, tensor in reference.tensors.items():
        torch.testing.assert_close(run.tensors[key], tensor, rtol=1e-5, atol=1e-6,
                                   msg=lambda report, key=key: f"{what} {key}: {report}")
    assert float(reference.tensors["B"].abs().sum()) > 0


def largest_difference(run, reference) -> float:
    """max over the adapter's tensors of max |run - reference| / max |reference| (for the logs)."""
    return max(float((run.tensors[k] - t).abs().max() / t.abs().max().clamp_min(1e-30))
               for k, t in reference.tensors.items())

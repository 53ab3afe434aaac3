"""What a user reads in the output of the commands they type : our own
lines at INFO (parameter summary, replica check, adapter written, resume), NeMo's per-field "does not have
field.name ... Add this key to cfg" warnings summarized in one line, in the entry script, ``merge`` and ``convert``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.script_env import script_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples/nlp/language_modeling/tuning/megatron_gpt_finetuning.py"
SUMMARY = re.compile(r"(\d+) config keys not used by this model")


def _run(command: list[str]) -> str:
    done = subprocess.run(command, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def _finetune(base: Path, data, work: Path, steps: int) -> str:
    return _run([
        sys.executable, str(SCRIPT), f"model.restore_from_path={base}", "trainer.accelerator=cpu", "trainer.devices=1",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=False", "model.global_batch_size=8", "model.micro_batch_size=8",
        "model.peft.tiedlora_tuning.check_replicas_every=1",
        f"model.data.train_ds.file_names=[{data.train}]", f"model.data.validation_ds.file_names=[{data.validation}]",
        "model.data.validation_ds.names=[validation]", "model.data.train_ds.max_seq_length=64",
        "model.data.validation_ds.max_seq_length=64", "model.data.train_ds.memmap_workers=1",
        f"exp_manager.exp_dir={work}", "name=logs", "exp_manager.resume_if_exists=True",
    ])


def _no_per_field_warnings(output: str) -> None:
    assert "Add this key to cfg" not in output
    counts = [int(n) for n in SUMMARY.findall(output)]
    assert len(counts) == 1 and counts[0] > 50, counts  # one line for ~120 keys


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    """(output of a 2-step fine-tuning run through the entry script, its work folder)."""
    base, data, _ = tiny
    work = tmp_path_factory.mktemp("logs")
    return _finetune(base, data, work, steps=2), work


def test_entry_script_shows_our_lines_and_one_summary(first_run):
    output, _ = first_run
    _no_per_field_warnings(output)
    assert "Tied-LoRA trainable parameters (preset=tl6" in output
    assert re.search(r"Tied-LoRA: checked \d+ replicas at step 0: bitwise identical on all 1 rank", output)
    assert re.search(r"saved Tied-LoRA adapter \(\d+ tensors\) to \S+\.nemo", output)
    assert "resuming from" not in output


def test_resumed_run_says_so(tiny, first_run):
    base, data, _ = tiny
    _, work = first_run
    second = _finetune(base, data, work, steps=4)  # the same run, continued
    assert re.search(r"resuming from \S+\.ckpt: adapter, optimizer and LR-scheduler state", second)
    _no_per_field_warnings(second)


def test_merge_shows_one_summary(tiny, first_run, tmp_path):
    base, _, _ = tiny
    _, work = first_run
    adapter = sorted((work / "logs").rglob("checkpoints/*.nemo"))[-1]
    output = _run([sys.executable, "-m", "nemo_tiedlora", "merge", "--base", str(base), "--adapter", str(adapter),
                   "--out", str(tmp_path / "merged.nemo")])
    _no_per_field_warnings(output)
    assert f"merged .nemo: {tmp_path / 'merged.nemo'}" in output


def test_convert_shows_one_summary(tiny, tmp_path):
    base, _, _ = tiny
    output = _run([sys.executable, "-m", "nemo_tiedlora", "convert", "--in", str(base), "--out",
                   str(tmp_path / "converted.nemo")])
    _no_per_field_warnings(output)
    assert f"converted .nemo: {tmp_path / 'converted.nemo'}" in output

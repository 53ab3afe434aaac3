"""The fine-tuning entry script with the overrides the README shows, typed as shown:
``model.num_layers_in_first_pipeline_stage=3`` (uneven pipeline, 3+1 layers on PP=2) and
``model.peft.tiedlora_tuning.check_replicas_every=1`` on two CPU processes. The log must say that the replicas were
checked and show our own lines, with NeMo's per-field config warnings summarized in one line."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.distributed.conftest import REPO
from tests.entry_runs import finetune_command
from tests.script_env import script_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_readme_overrides_run_and_the_log_says_what_happened(dist_base):
    from nemo_tiedlora.formats.adapter_archive import load_archive

    base, data, work = dist_base
    command = finetune_command(
        base, data, work, "readme_overrides", 2, "model.pipeline_model_parallel_size=2",
        "model.num_layers_in_first_pipeline_stage=3",  # README, "Model parallelism"
        "model.peft.tiedlora_tuning.check_replicas_every=1",  # README, "Model parallelism"
        "exp_manager.resume_if_exists=False")
    result = subprocess.run(command, capture_output=True, text=True, env=script_env(), cwd=REPO, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Could not override" not in log
    # item 1: the check is active and says so (A, B + u, v of the stage's layers: 2 + 2 * 3 on stage 0)
    checked = re.search(r"Tied-LoRA: checked (\d+) replicas at step 0: bitwise identical on all 2 rank", log)
    assert checked and int(checked.group(1)) == 2 + 2 * 3, log[-4000:]
    # item 6: NeMo's per-field warnings summarized once, our own lines visible
    assert "Add this key to cfg" not in log
    assert len(re.findall(r"\d+ config keys not used by this model", log)) == 1
    assert "Tied-LoRA trainable parameters (preset=tl6, rank=4" in log
    assert "saved Tied-LoRA adapter" in log
    # item 2: 3 + 1 layers; the adapter holds every layer's u and v once
    (adapter,) = sorted((work / "readme_overrides").rglob("checkpoints/*.nemo"))
    tensors = load_archive(adapter).tensors
    assert sorted(k for k in tensors if k.startswith("layers.")) == [
        f"layers.{n}.{f}" for n in range(1, 5) for f in ("u", "v")]

"""The NeMo entry script end to end with more than one process: `trainer.devices=2` on CPU (relaunched under
torchrun), TP=2, against the same command at TP=1. Compared: the adapter .nemo each run writes (one logical,
TP/PP-independent state)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.conftest import REPO
from tests.script_env import script_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SCRIPT = REPO / "examples/nlp/language_modeling/tuning/megatron_gpt_finetuning.py"


def _finetune(base, data, work: Path, name: str, tp: int) -> Path:
    env = script_env()
    command = [
        sys.executable, str(SCRIPT), f"model.restore_from_path={base}", "trainer.accelerator=cpu",
        f"trainer.devices={tp}", f"model.tensor_model_parallel_size={tp}", "trainer.max_steps=4",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=False",
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.optim.lr=5e-3",
        "model.optim.sched.warmup_steps=0", "model.peft.tiedlora_tuning.adapter_dim=4",
        f"model.data.train_ds.file_names=[{data / 'train.jsonl'}]",
        f"model.data.validation_ds.file_names=[{data / 'validation.jsonl'}]",
        "model.data.validation_ds.names=[validation]", "model.data.train_ds.max_seq_length=64",
        "model.data.validation_ds.max_seq_length=64", "model.data.train_ds.memmap_workers=1",
        f"exp_manager.exp_dir={work}", f"name={name}", "exp_manager.resume_if_exists=False",
    ]
    log = work / f"{name}.log"
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, "".join(log.read_text().splitlines(True)[-30:])
    archives = sorted((work / name).rglob("checkpoints/*.nemo"))
    assert archives, f"no adapter .nemo written by {name}"
    return archives[-1]


def test_entry_script_tp2_equals_tp1(dist_base):
    from nemo_tiedlora.checkpoint import load_archive

    base, data, work = dist_base
    tp1 = load_archive(_finetune(base, data, work, "script_tp1", 1))
    tp2 = load_archive(_finetune(base, data, work, "script_tp2", 2))
    # one logical state whatever the TP size: A, B once, u/v by global layer
    assert sorted(tp2.tensors) == sorted(tp1.tensors)
    for key, tensor in tp1.tensors.items():
        torch.testing.assert_close(tp2.tensors[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    assert float(tp1.tensors["B"].abs().sum()) > 0  # trained away from its zero init

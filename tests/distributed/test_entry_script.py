"""The NeMo entry script end to end with more than one process: `trainer.devices=N` on CPU (relaunched under
torchrun) with each parallel layout the README calls supported (TP2, DP2, TP2 + SP, TP2 x PP2, PP2 with the
distributed optimizer), against the same command at TP=1. Compared: the adapter .nemo each run writes (one logical,
TP/PP-independent state). As in test_equivalence.py, Adam runs with eps far above every |grad| (momentum SGD,
linear in the gradients), so that rounding-level gradient differences of a split run stay rounding-level."""

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


def _finetune(base, data, work: Path, name: str, devices: int, *overrides: str) -> Path:
    env = script_env()
    command = [
        sys.executable, str(SCRIPT), f"model.restore_from_path={base}", "trainer.accelerator=cpu",
        f"trainer.devices={devices}", "trainer.max_steps=4", "trainer.gradient_clip_val=0.0",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=False",
        "model.global_batch_size=4", "model.micro_batch_size=2", "model.optim.lr=3e3", "+model.optim.eps=1e4",
        "model.optim.sched.warmup_steps=0", "model.peft.tiedlora_tuning.adapter_dim=4",
        f"model.data.train_ds.file_names=[{data / 'train.jsonl'}]",
        f"model.data.validation_ds.file_names=[{data / 'validation.jsonl'}]",
        "model.data.validation_ds.names=[validation]", "model.data.train_ds.max_seq_length=64",
        "model.data.validation_ds.max_seq_length=64", "model.data.train_ds.memmap_workers=1",
        f"exp_manager.exp_dir={work}", f"name={name}", "exp_manager.resume_if_exists=False", *overrides,
    ]
    log = work / f"{name}.log"
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, "".join(log.read_text().splitlines(True)[-30:])
    archives = sorted((work / name).rglob("checkpoints/*.nemo"))
    assert archives, f"no adapter .nemo written by {name}"
    return archives[-1]


LAYOUTS = {
    "tp2": (2, ["model.tensor_model_parallel_size=2"]),
    "dp2": (2, []),
    "tp2_sequence_parallel": (2, ["model.tensor_model_parallel_size=2", "model.sequence_parallel=True"]),
    "tp2_pp2": (4, ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"]),
    "pp2_distributed_optimizer": (2, ["model.pipeline_model_parallel_size=2",
                                      "model.optim.name=mcore_distributed_optim"]),
}


@pytest.fixture(scope="module")
def script_tp1(dist_base):
    from nemo_tiedlora.checkpoint import load_archive

    base, data, work = dist_base
    return load_archive(_finetune(base, data, work, "script_tp1", 1))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_entry_script_layout_equals_tp1(layout, dist_base, script_tp1):
    from nemo_tiedlora.checkpoint import load_archive

    base, data, work = dist_base
    devices, overrides = LAYOUTS[layout]
    run = load_archive(_finetune(base, data, work, f"script_{layout}", devices, *overrides))
    # one logical state whatever the layout: A, B once, u/v by global layer
    assert sorted(run.tensors) == sorted(script_tp1.tensors)
    for key, tensor in script_tp1.tensors.items():
        torch.testing.assert_close(run.tensors[key], tensor, rtol=1e-5, atol=1e-6,
                                   msg=lambda report, key=key: f"{layout} {key}: {report}")
    assert float(script_tp1.tensors["B"].abs().sum()) > 0  # trained away from its zero init

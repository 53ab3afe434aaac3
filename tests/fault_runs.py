"""Helpers of the fault tests: the fine-tuning entry script as a user runs it (one process or under torchrun), with
a fault from tests/fault_injection.py, and what a run leaves behind (adapter archive, last checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nemo_tiedlora.nemo.launch import free_port
from tests.script_env import script_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples/nlp/language_modeling/tuning/megatron_gpt_finetuning.py"
INJECT = REPO / "tests/fault_injection.py"


def finetune_args(base, data: Path, log_dir: Path, *, steps: int = 6, nproc: int = 1, tp: int = 1, pp: int = 1,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """The entry script's arguments: cosine schedule with warmup, a checkpoint every 2 steps, resume_if_exists."""
    return [
        f"model.restore_from_path={base}", "trainer.accelerator=cpu", f"trainer.devices={nproc}",
        f"model.tensor_model_parallel_size={tp}", f"model.pipeline_model_parallel_size={pp}",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=False", "trainer.gradient_clip_val=0.0", "model.global_batch_size=4",
        "model.micro_batch_size=2", "model.optim.lr=5e-3", "model.optim.sched.warmup_steps=2",
        "model.optim.sched.min_lr=0.0", "model.peft.tiedlora_tuning.adapter_dim=4",
        f"model.data.train_ds.file_names=[{data / 'train.jsonl'}]",
        f"model.data.validation_ds.file_names=[{data / 'validation.jsonl'}]", "model.data.validation_ds.names=[val]",
        "model.data.train_ds.max_seq_length=64", "model.data.validation_ds.max_seq_length=64",
        "model.data.train_ds.memmap_workers=1", "model.data.validation_ds.tokens_to_generate=8",
        f"exp_manager.explicit_log_dir={log_dir}", "exp_manager.resume_if_exists=True",
        "exp_manager.resume_ignore_no_checkpoint=True", "exp_manager.checkpoint_callback_params.save_top_k=1",
        *extra,
    ]


@dataclass
class Run:
    code: int
    output: str
    log: Path
    seconds: float


def run(args: list[str], log: Path, *, nproc: int = 1, fault: str = "", fault_rank: Optional[int] = None,
        kill_job_on_marker: bool = False) -> Run:
    """Run the entry script (under torchrun when nproc > 1) with `fault`; with `kill_job_on_marker`, SIGKILL the
    whole job (torchrun and every rank) once a rank reports it reached the fault's step."""
    env = script_env()
    env.pop("HYDRA_FULL_ERROR", None)
    marker = log.with_suffix(".marker")
    marker.unlink(missing_ok=True)
    if fault:
        env.update(TIEDLORA_FAULT=fault, TIEDLORA_FAULT_MARKER=str(marker))
        if fault_rank is not None:
            env["TIEDLORA_FAULT_RANK"] = str(fault_rank)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    command = [*launcher, *([str(INJECT)] if fault else []), str(SCRIPT), *args]
    start = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if kill_job_on_marker:
            while not marker.exists() and process.poll() is None:
                time.sleep(0.5)
            kill_tree(process.pid)
        code = process.wait(timeout=1800)
    return Run(code, log.read_text(), log, time.monotonic() - start)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (as a scheduler or a lost node would)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def adapter_nemo(log_dir: Path) -> Path:
    archives = sorted((log_dir / "checkpoints").glob("*.nemo"))
    assert len(archives) == 1, f"expected one adapter .nemo in {log_dir}/checkpoints, found {archives}"
    return archives[0]


def last_checkpoint_state(log_dir: Path) -> dict[str, torch.Tensor]:
    """Adapter tensors and optimizer state of the -last checkpoint (rank 0's file), flattened to tensors."""
    paths = sorted((log_dir / "checkpoints").rglob("*-last.ckpt"))
    assert paths, f"no -last.ckpt under {log_dir}"
    checkpoint = torch.load(paths[0], map_location="cpu", weights_only=False)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)

    walk("state_dict", checkpoint["state_dict"])
    walk("optimizer", checkpoint["optimizer_states"])
    return flat


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    differ = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not differ, f"{what}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:5]}"


def assert_resumed_equal(killed_dir: Path, reference_dir: Path) -> None:
    """The killed-and-resumed run ends bitwise equal to the uninterrupted one: adapter .nemo and -last checkpoint
    (adapter and optimizer state), and nothing partial is left in its checkpoints folder."""
    from nemo_tiedlora.formats.adapter_archive import load_archive

    assert_same_tensors(load_archive(adapter_nemo(killed_dir)).tensors,
                        load_archive(adapter_nemo(reference_dir)).tensors, "adapter .nemo")
    assert_same_tensors(last_checkpoint_state(killed_dir), last_checkpoint_state(reference_dir), "-last checkpoint")
    leftovers = [p.name for p in (killed_dir / "checkpoints").rglob("*")
                 if p.name.endswith((".partial", "-unfinished"))]
    assert not leftovers, f"partial files left: {leftovers}"

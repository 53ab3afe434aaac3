"""Killed runs, one process: the fine-tuning entry script SIGKILLed at five points (during checkpoint saves and while
the end-of-training adapter .nemo is written included), each time restarted with the identical command
(exp_manager.resume_if_exists=True), ends bitwise equal to an uninterrupted run (NeMo's cosine schedule with warmup;
the mcore distributed optimizer, whose end-of-training best-checkpoint restore needed the compat fix
`peft-checkpoint-chunk-keys`). Also bf16 O2, a NaN gradient, and kills during `merge` and `convert`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.fault_runs import REPO, adapter_nemo, assert_resumed_equal, finetune_args, run
from tests.integration.test_user_errors import adapter  # noqa: F401  (fixture)
from tests.script_env import script_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DIST_OPT = ("model.optim.name=mcore_distributed_optim",)
BF16_O2 = ("model.megatron_amp_O2=True", "trainer.precision=bf16-mixed")
KILLED = -signal.SIGKILL

# Each restart of the killed job meets the next fault; the last restart runs to the end. With a checkpoint every
# 2 of 6 steps: before any checkpoint; in the 1st checkpoint file of step 2 (half written); in step 2's 2nd file;
# after step 5 (resumed from step 4); while the final adapter .nemo is written (step 6's checkpoints complete).
FIVE_FAULTS = ("kill-after-step:1", "kill-in-ckpt:1", "kill-in-ckpt:2", "kill-after-step:5", "kill-in-nemo")


def _data(tiny):
    base, data, _ = tiny
    return base, data.train.parent


def test_killed_at_five_points_resumes_bitwise_distributed_optimizer(tiny, tmp_path):
    base, data = _data(tiny)
    reference = run(finetune_args(base, data, tmp_path / "reference", extra=DIST_OPT), tmp_path / "reference.log")
    assert reference.code == 0, reference.output[-3000:]
    killed = tmp_path / "killed"
    for number, fault in enumerate(FIVE_FAULTS):
        attempt = run(finetune_args(base, data, killed, extra=DIST_OPT), tmp_path / f"killed{number}.log", fault=fault)
        assert attempt.code == KILLED, f"{fault}: {attempt.output[-3000:]}"
        if fault == "kill-in-nemo":  # the archive's temporary file is there, no archive under its name
            assert not list((killed / "checkpoints").glob("*.nemo"))
    final = run(finetune_args(base, data, killed, extra=DIST_OPT), tmp_path / "final.log")
    assert final.code == 0, final.output[-3000:]
    assert_resumed_equal(killed, tmp_path / "reference")


def test_bf16_o2_distributed_optimizer_resumes_bitwise(tiny, tmp_path):
    base, data = _data(tiny)
    extra = (*DIST_OPT, *BF16_O2)
    reference = run(finetune_args(base, data, tmp_path / "reference", steps=4, extra=extra), tmp_path / "ref.log")
    assert reference.code == 0, reference.output[-3000:]
    killed = tmp_path / "killed"
    attempt = run(finetune_args(base, data, killed, steps=4, extra=extra), tmp_path / "k.log",
                  fault="kill-after-step:3")
    assert attempt.code == KILLED, attempt.output[-3000:]
    final = run(finetune_args(base, data, killed, steps=4, extra=extra), tmp_path / "final.log")
    assert final.code == 0, final.output[-3000:]
    assert_resumed_equal(killed, tmp_path / "reference")
    from nemo_tiedlora.formats.adapter_archive import load_archive

    assert str(load_archive(adapter_nemo(killed)).tensors["B"].dtype) == "torch.bfloat16"


def test_nan_gradient_stops_the_run_and_writes_no_adapter(tiny, tmp_path):
    base, data = _data(tiny)
    result = run(finetune_args(base, data, tmp_path / "nan", steps=4), tmp_path / "nan.log", fault="nan-grad:3")
    last = result.output.strip().splitlines()[-1]
    assert result.code == 2, result.output[-3000:]
    assert last.startswith("error: non-finite (NaN/Inf) adapter gradient at optimizer step 3 in ['"), last
    assert "Traceback" not in result.output
    assert not list((tmp_path / "nan" / "checkpoints").glob("*.nemo"))  # the step-2 checkpoint stays, finite


@pytest.mark.parametrize("command", ["merge", "convert"])
def test_kill_during_merge_or_convert_leaves_no_output(tiny, adapter, tmp_path, command):  # noqa: F811
    from nemo_tiedlora.nemo.base_archive import checkpoint_format, read_base

    base, _, _ = tiny
    out = tmp_path / f"{command}.nemo"
    args = (["merge", "--base", base, "--adapter", adapter, "--out", out] if command == "merge"
            else ["convert", "--in", base, "--out", out, "--tp", "2", "--format", "legacy"])
    env = {**script_env(), "TIEDLORA_FAULT": "kill-in-output"}
    log = tmp_path.parent / f"{command}_killed.log"
    with open(log, "w") as handle:  # its own session: megatron's checkpoint-writer helpers outlive a SIGKILLed parent
        killed = subprocess.Popen([sys.executable, str(REPO / "tests/fault_injection.py"), "-m", "nemo_tiedlora",
                                   *map(str, args)], env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        code = killed.wait(timeout=900)
    try:
        os.killpg(killed.pid, signal.SIGKILL)  # the orphaned helpers, if any
    except ProcessLookupError:
        pass
    assert code == KILLED, log.read_text()[-3000:]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    again = subprocess.run([sys.executable, "-m", "nemo_tiedlora", *map(str, args)], env=script_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpoint_format(out) == ("dist" if command == "merge" else "legacy")
    assert read_base(out).state  # a complete archive

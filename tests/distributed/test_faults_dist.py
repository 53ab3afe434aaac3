"""Killed and lost ranks under torchrun (gloo, CPU), through the fine-tuning entry script as a multi-node user runs
it (`torchrun ... megatron_gpt_finetuning.py ...`): TP2 and PP2, fp32 and bf16 O2, with the mcore distributed
optimizer where the README lists it.

- The whole job SIGKILLed mid-run (torchrun and every rank, as a scheduler or a lost node would) and then one rank
  SIGKILLed mid-step; each time the identical command restarts it (exp_manager.resume_if_exists=True), and the run
  ends bitwise equal to an uninterrupted one (adapter .nemo, -last checkpoint with the optimizer state).
- A lost rank ends the whole job: torchrun's monitor sees the rank die, stops the others and names the rank
  (`rank      : 1 (local_rank: 1)`, `exitcode  : -9`, `Signal 9 (SIGKILL)`); the time from the kill to the job's end is
  printed (not asserted). Without torchrun (srun), the process-group timeout bounds the wait
  (NEMO_TIEDLORA_DIST_TIMEOUT_MINUTES, default 10).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.fault_runs import assert_resumed_equal, finetune_args, run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DIST_OPT = ("model.optim.name=mcore_distributed_optim",)
BF16_O2 = ("model.megatron_amp_O2=True", "trainer.precision=bf16-mixed")


def _lost_rank(result, marker_time: float) -> float:
    """Assert torchrun ended the job naming the lost rank; seconds from the kill to the job's end."""
    assert result.code != 0
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\n\s+exitcode\s+: -9", result.output), result.output[-3000:]
    assert "Signal 9 (SIGKILL)" in result.output
    return time.time() - marker_time


def _killed_twice_then_resumed(dist_base, name: str, *, tp: int, pp: int, extra: tuple[str, ...]) -> None:
    base, data, work = dist_base
    folder = work / name
    folder.mkdir()

    def args(log_dir):
        return finetune_args(base, data, log_dir, steps=6, nproc=2, tp=tp, pp=pp, extra=extra)

    reference = run(args(folder / "reference"), folder / "reference.log", nproc=2)
    assert reference.code == 0, reference.output[-3000:]
    killed = folder / "killed"
    whole = run(args(killed), folder / "job.log", nproc=2, fault="wait-after-step:3", kill_job_on_marker=True)
    assert whole.code != 0
    lost = run(args(killed), folder / "rank.log", nproc=2, fault="kill-after-step:5", fault_rank=1)
    ended_after = _lost_rank(lost, float((folder / "rank.marker").read_text()))
    print(f"{name}: rank 1 SIGKILLed after step 5; the job ended {ended_after:.1f} s later")
    final = run(args(killed), folder / "final.log", nproc=2)
    assert final.code == 0, final.output[-3000:]
    assert_resumed_equal(killed, folder / "reference")


def test_tp2_distributed_optimizer_killed_job_and_lost_rank_resume_bitwise(dist_base):
    _killed_twice_then_resumed(dist_base, "faults_tp2", tp=2, pp=1, extra=DIST_OPT)


def test_pp2_killed_job_and_lost_rank_resume_bitwise(dist_base):
    _killed_twice_then_resumed(dist_base, "faults_pp2", tp=1, pp=2, extra=())


def test_tp2_bf16_o2_distributed_optimizer_lost_rank_resume_bitwise(dist_base):
    base, data, work = dist_base
    folder = work / "faults_tp2_bf16"
    folder.mkdir()

    def args(log_dir):
        return finetune_args(base, data, log_dir, steps=4, nproc=2, tp=2, extra=(*DIST_OPT, *BF16_O2))

    reference = run(args(folder / "reference"), folder / "reference.log", nproc=2)
    assert reference.code == 0, reference.output[-3000:]
    lost = run(args(folder / "killed"), folder / "rank.log", nproc=2, fault="kill-after-step:3", fault_rank=1)
    _lost_rank(lost, float((folder / "rank.marker").read_text()))
    final = run(args(folder / "killed"), folder / "final.log", nproc=2)
    assert final.code == 0, final.output[-3000:]
    assert_resumed_equal(folder / "killed", folder / "reference")


def test_rank_lost_inside_a_collective_ends_the_job(dist_base):
    """TP2: rank 1 dies while rank 0 waits for it inside an all-reduce (step 2's forward); torchrun ends the job
    naming rank 1, rank 0 ends on torchrun's SIGTERM (no SIGKILL escalation, no process-group or socket timeout
    message: it did not wait for the collective's timeout), and the identical command then resumes."""
    base, data, work = dist_base
    folder = work / "faults_collective"
    folder.mkdir()
    args = finetune_args(base, data, folder / "run", steps=4, nproc=2, tp=2)
    lost = run(args, folder / "rank.log", nproc=2, fault="kill-in-collective:2", fault_rank=1)
    ended_after = _lost_rank(lost, float((folder / "rank.marker").read_text()))
    print(f"rank 1 SIGKILLed inside an all-reduce; the job ended {ended_after:.1f} s later")
    assert re.search(r"Sending process \d+ closing signal SIGTERM", lost.output), lost.output[-3000:]
    assert "closing signal SIGKILL" not in lost.output  # rank 0 ended on the SIGTERM, blocked in nothing
    assert not re.search(r"[Tt]imed out|Socket Timeout|Watchdog caught", lost.output), lost.output[-3000:]
    final = run(args, folder / "final.log", nproc=2)
    assert final.code == 0, final.output[-3000:]

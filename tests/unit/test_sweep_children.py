"""The sweep's bookkeeping that the README promises, without NeMo:

- steps run are counted from the per-step training scalars, not from scalars logged per validation batch;
- ``limit_val_batches: 1`` means one batch (an int), ``1.0`` the whole validation set (a float);
- a child process stops with its sweep: Ctrl-C stops its process group; a SIGKILLed parent takes it along
  (PR_SET_PDEATHSIG); a run folder that a live orphan writes into is not reused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nemo_tiedlora.apps import runner as runner_mod
from nemo_tiedlora.apps.study.child import PID_FILE, RunFolderBusy, claim_run_folder
from nemo_tiedlora.apps.study.sweep import RunSpec, SweepContext, finetune_args, parse_config, training_record
from tests.processes import process_gone

LINUX = sys.platform.startswith("linux")


def _write_events(log_dir: Path, *, steps: int, val_every: int, val_batches: int) -> list[float]:
    """TensorBoard scalars as NeMo/Lightning log them: a training scalar at steps 0..steps-1, validation after every
    ``val_every`` steps at step n-1, and 'validation_step_timing in s' once per validation batch (its own counter)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    losses, timing_step = [], 0
    for step in range(steps):
        writer.add_scalar("reduced_train_loss", 5.0 - step * 0.1, step)
        writer.add_scalar("train_step_timing in s", 0.1, step)
        if (step + 1) % val_every == 0:
            loss = 4.0 + ((step + 1) // val_every - 2) ** 2  # best at the second validation
            losses.append(loss)
            writer.add_scalar("validation_loss", loss, step)
            for _ in range(val_batches):
                writer.add_scalar("validation_step_timing in s", 0.01, timing_step)
                timing_step += 1
    writer.close()
    return losses


def test_steps_run_ignore_per_validation_batch_scalars(tmp_path):
    losses = _write_events(tmp_path, steps=10, val_every=5, val_batches=30)  # 60 timing events > 10 steps
    steps, best = training_record(tmp_path, "validation_loss")
    assert steps == 10
    assert best == min(losses)


def test_steps_run_without_training_scalars_come_from_the_monitor(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in (3, 7):  # validations after 4 and 8 steps (log_every_n_steps larger than the run)
        writer.add_scalar("validation_loss", 1.0 / (step + 1), step)
    for index in range(40):
        writer.add_scalar("validation_step_timing in s", 0.01, index)
    writer.close()
    steps, best = training_record(tmp_path, "validation_loss", mode="max")
    assert steps == 8
    assert best == pytest.approx(0.25)


def _context(tmp_path: Path, limit) -> SweepContext:
    cfg = parse_config({"task": "squad", "output": str(tmp_path), "presets": ["tl6"], "ranks": [8], "lrs": [0.01],
                        "training": {"max_steps": 10, "val_check_interval": 5, "limit_val_batches": limit}})
    return SweepContext(cfg=cfg, base=tmp_path / "base.nemo", shape={}, sft={s: tmp_path / s for s in
                        ("train", "validation", "test")}, source=tmp_path, out=tmp_path, fingerprint="x")


@pytest.mark.parametrize("limit, expected", [(1, "1"), (4, "4"), (1.0, "1.0"), (0.25, "0.25")])
def test_limit_val_batches_keeps_int_batches_and_float_fractions(tmp_path, limit, expected):
    args = finetune_args(RunSpec("squad", "tl6", 8, 0.01), _context(tmp_path, limit), exp_dir=tmp_path / "runs")
    assert f"trainer.limit_val_batches={expected}" in args


@pytest.mark.parametrize("limit", [0, 1.5, 2.0, "all"])
def test_bad_limit_val_batches_is_named(tmp_path, limit):
    from nemo_tiedlora.apps.study.sweep import SweepConfigError

    with pytest.raises(SweepConfigError, match="training.limit_val_batches"):
        _context(tmp_path, limit)


# ------------------------------------------------------------------------------------------------ child processes

# A stand-in for an entry script: prints its pid, then runs until stopped (SIGTERM) or for 60 s.
_CHILD = "import os, sys, time; print('child', os.getpid(), flush=True); time.sleep(60)"


def _parent_script(tmp_path: Path) -> Path:
    """A parent that runs the child through run_logged, as the sweep does, and says how it ended."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from nemo_tiedlora.apps.runner import run_logged
        try:
            run_logged([sys.executable, "-c", {_CHILD!r}, "name=run_x"], log=Path({str(tmp_path / 'child.log')!r}),
                       title="child", pid_file=Path({str(tmp_path / 'run' / PID_FILE)!r}), marker="name=run_x")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
    """))
    return script


def _wait_for_child(tmp_path: Path, parent: subprocess.Popen) -> int:
    pid_file = tmp_path / "run" / PID_FILE
    deadline = time.time() + 60
    while time.time() < deadline:
        if pid_file.exists() and "child" in (tmp_path / "child.log").read_text():
            return int(pid_file.read_text().split()[0])
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.1)
    raise AssertionError("the child never started")


def _start_parent(tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    # start_new_session: the parent leads its own group, like a shell job; the terminal's Ctrl-C is a SIGINT to it
    # SIGINT at its default, as in a terminal (a test run started with `&` inherits it ignored)
    return subprocess.Popen([sys.executable, str(_parent_script(tmp_path))], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_stops_the_child_group(tmp_path):
    parent = _start_parent(tmp_path)
    child = _wait_for_child(tmp_path, parent)
    assert os.getpgid(child) == child != os.getpgid(parent.pid)  # its own group: the terminal's SIGINT misses it
    os.killpg(parent.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the foreground group
    out, _ = parent.communicate(timeout=60)
    assert parent.returncode == 130 and "interrupted" in out
    assert process_gone(child), "the child runs on after Ctrl-C"
    assert not (tmp_path / "run" / PID_FILE).exists()


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only")
def test_sigkilled_parent_takes_its_child_along(tmp_path):
    parent = _start_parent(tmp_path)
    child = _wait_for_child(tmp_path, parent)
    parent.kill()
    parent.wait(timeout=30)
    assert process_gone(child), "the child runs on as an orphan after its parent was SIGKILLed"


def test_a_folder_a_live_process_writes_into_is_not_reused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "kept.txt").write_text("written by the orphan")
    orphan = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)",
                               "name=run_x"], stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "ready"  # exec'd: its command line is the orphan's
        (run_dir / PID_FILE).write_text(f"{orphan.pid} name=run_x\n")
        with pytest.raises(RunFolderBusy, match=rf"process {orphan.pid}.*kill {orphan.pid}"):
            claim_run_folder(run_dir)
        assert (run_dir / "kept.txt").exists()
    finally:
        orphan.kill()
        orphan.wait()
    claim_run_folder(run_dir)  # the process is gone: the stale attempt is cleared
    assert not run_dir.exists()


@pytest.mark.skipif(not LINUX, reason="claim_run_folder reads a live process's command line from /proc (Linux)")
def test_a_recycled_pid_running_something_else_does_not_block(tmp_path):
    """A PID file naming a live process whose command line does not name this run (here: pytest's parent) is
    stale: the folder is claimed and cleared."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / PID_FILE).write_text(f"{os.getppid()} name=some_other_run\n")
    claim_run_folder(run_dir)
    assert not run_dir.exists()


_STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "grandchild = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
             "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'], "
             "stdout=subprocess.PIPE, text=True); grandchild.stdout.readline(); "
             "print(grandchild.pid, flush=True); time.sleep(60)")


def test_stop_group_escalates_to_sigkill(tmp_path):
    """A process and its grandchild (one process group) that both ignore SIGTERM: stop_group kills both with
    SIGKILL."""
    stubborn = subprocess.Popen([sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
    grandchild = int(stubborn.stdout.readline())
    try:
        assert os.getpgid(grandchild) == stubborn.pid
        runner_mod.stop_group(stubborn, grace=1.0)
        assert stubborn.returncode == -signal.SIGKILL
        assert process_gone(grandchild), "the grandchild in the stopped group runs on"
    finally:  # a group id is not reused while the group has members: this reaches only what the test started
        try:
            os.killpg(stubborn.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_child_started_inside_a_torchrun_job_is_not_taken_for_its_rank(tmp_path):
    """Every variable torchrun sets in the rank it launches (read from a real torchrun, not from our list) is gone from
    a child's environment, except the two that say nothing about ranks; so the child's own launch check finds itself
    not launched."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        from nemo_tiedlora.nemo import launch
        from nemo_tiedlora.apps.runner import child_env
        child = child_env()
        json.dump({"rank": sorted(os.environ), "child": sorted(child),
                   "launched": [m for m in launch._LAUNCHED_MARKERS if m in child]}, open(sys.argv[1], "w"))
    """))
    parent = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH")}
    out = tmp_path / "env.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=0",
                    str(script), str(out)], env=parent, check=True, capture_output=True, timeout=120)
    seen = json.loads(out.read_text())
    added_by_torchrun = set(seen["rank"]) - set(parent)
    assert {"RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "GROUP_RANK"} <= added_by_torchrun  # the reference is real
    inherited = added_by_torchrun & set(seen["child"])
    assert inherited <= {"LC_CTYPE", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}, inherited
    assert seen["launched"] == []

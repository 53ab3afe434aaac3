"""``python -m nemo_tiedlora sweep`` as a user types it on the tiny base:

- a run that reaches ``max_steps`` records exactly ``max_steps`` steps and no early stop, and
  ``limit_val_batches: 1`` validates on one batch;
- Ctrl-C ends the sweep with one line and exit code 130, and its fine-tuning child stops with it;
- a SIGKILLed sweep takes its child along (no orphan writing into the run folder).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_tiedlora.apps.study.child import PID_FILE
from tests.processes import process_gone
from tests.script_env import script_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RUN = "homes_tl6_r2_lr0.01"


def _config(tmp_path: Path, base: Path, *, max_steps: int, val_every: int) -> Path:
    config = tmp_path / "study.yaml"
    config.write_text(
        "task: homes\n"
        "data: sample\n"
        f"base: {base}\n"
        f"output: {tmp_path / 'sweep'}\n"
        "presets: [tl6]\nranks: [2]\nlrs: [1.0e-2]\n"
        f"training: {{max_steps: {max_steps}, val_check_interval: {val_every}, global_batch_size: 4, "
        "micro_batch_size: 4, max_seq_length: 64, limit_val_batches: 1}\n"
        "early_stopping: {enabled: true, monitor: validation_loss, patience: 100, min_delta: 0.0}\n"
        "generation: {tokens_to_generate: 3, batch_size: 8}\n"
    )
    return config


def _sweep(config: Path, **popen) -> subprocess.Popen:
    # SIGINT at its default, as in a terminal: a test run started in the background (`pytest ... &`) inherits
    # SIGINT ignored, and a Python started with it ignored never raises KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", "nemo_tiedlora", "sweep", "--config", str(config)], cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def test_run_to_max_steps_counts_max_steps_and_one_validation_batch(tiny, tmp_path):
    base, _, _ = tiny
    config = _config(tmp_path, base, max_steps=6, val_every=3)
    done = subprocess.run([sys.executable, "-m", "nemo_tiedlora", "sweep", "--config", str(config)], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "sweep" / "results.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["status"] == "ok"
    assert (int(row["steps_run"]), int(row["max_steps"])) == (6, 6)
    assert row["early_stopped"] == "false"
    log = Path(row["finetune_log"]).read_text()
    assert "limit_val_batches=1)` was configured so 1 batch will be used" in log  # Lightning's own message
    assert "6/6" in done.stdout  # the summary's steps column


def _child_pid(sweep: subprocess.Popen, run_dir: Path, timeout: float = 300) -> int:
    pid_file = run_dir / PID_FILE
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert sweep.poll() is None, sweep.communicate()
        if pid_file.exists():
            return int(pid_file.read_text().split()[0])
        time.sleep(0.2)
    raise AssertionError("the fine-tuning child never started")


def test_ctrl_c_exits_130_with_one_line_and_stops_the_child(tiny, tmp_path):
    base, _, _ = tiny
    config = _config(tmp_path, base, max_steps=2000, val_every=1000)
    sweep = _sweep(config, start_new_session=True)  # its own group, like a shell's foreground job
    child = _child_pid(sweep, tmp_path / "sweep" / "runs" / RUN)
    os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("sweep interrupted:") and "run the same command again to resume" in last
    assert process_gone(child), "the fine-tuning child runs on after Ctrl-C"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_sigkilled_sweep_leaves_no_orphan(tiny, tmp_path):
    base, _, _ = tiny
    config = _config(tmp_path, base, max_steps=2000, val_every=1000)
    sweep = _sweep(config, start_new_session=True)
    child = _child_pid(sweep, tmp_path / "sweep" / "runs" / RUN)
    sweep.kill()
    sweep.communicate(timeout=60)
    assert process_gone(child), "the fine-tuning child runs on as an orphan after the sweep was SIGKILLed"

"""Smoke tests of the two-node fixtures: the nodes are distinct hosts on a shared network (a torchrun job spans them)
and the SLURM cluster on them schedules, runs batch jobs and notices a node crash."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.script_env import script_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("gloo_allreduce.py")
TASK_LINE = 'echo "$SLURM_PROCID $SLURM_LOCALID $(hostname) $(command -v python) $PYTHONPATH"'
BLOCK_LAYOUT = {(0, 0, "node1"), (1, 1, "node1"), (2, 0, "node2"), (3, 1, "node2")}


def task_env() -> dict[str, str]:
    """What every task gets: this interpreter first on PATH, the checkout under test on PYTHONPATH."""
    env = script_env()
    env["PYTHONPATH"] = str(REPO)
    env["TORCH_CPP_LOG_LEVEL"] = "ERROR"  # c10d cannot reverse-resolve peers (no DNS in the namespaces)
    return env


def layout(text: str) -> set[tuple[int, int, str]]:
    """(SLURM_PROCID, SLURM_LOCALID, hostname) of every line TASK_LINE printed; checks that every task found this
    interpreter as `python` and the checkout under test on PYTHONPATH (the login's environment reached it)."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    assert {(python, path) for *_, python, path in rows} == {(str(Path(sys.executable).parent / "python"), str(REPO))}
    return {(int(procid), int(localid), host) for procid, localid, host, *_ in rows}


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout:.0f} s; output so far:\n{out.decode()}\n{err.decode()}")
    return out.decode(), err.decode()


def test_torchrun_all_reduce_spans_the_two_nodes(two_nodes):
    """One torchrun per node (c10d rendezvous on node1's address, 2 processes each) forms a 4-rank gloo group: every
    rank's all_reduce of rank+1 gives 1+2+3+4 = 10, ranks 0-1 run on one node and 2-3 on the other, each rank's
    hostname resolves to its own node's address."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={two_nodes.address('node1')}:29400", "--rdzv_id=smoke",
               str(WORKER)]
    procs = [two_nodes.run(node, command, env=task_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for node in ("node1", "node2")]
    outputs = [finish(proc, 600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, f"torchrun failed:\n{out}\n{err[-3000:]}"
    reports = {r["rank"]: r for out, _ in outputs for r in map(json.loads, out.splitlines()) if r}
    assert sorted(reports) == [0, 1, 2, 3]
    assert {r["sum"] for r in reports.values()} == {4 * 5 / 2}
    assert {r["world"] for r in reports.values()} == {4}
    assert reports[0]["host"] == reports[1]["host"] != reports[2]["host"] == reports[3]["host"]
    assert {r["host"] for r in reports.values()} == {"node1", "node2"}
    for r in reports.values():
        assert r["address"] == two_nodes.address(r["host"])


def test_srun_places_two_tasks_on_each_node(slurm_cluster):
    """`srun -N2 --ntasks-per-node=2` runs 4 tasks in block order: procid 0,1 (localid 0,1) on node1, 2,3 on node2,
    each with the login's PATH and PYTHONPATH."""
    proc = slurm_cluster.login(["srun", "-N2", "--ntasks-per-node=2", "sh", "-c", TASK_LINE], env=task_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = finish(proc, 120)
    assert proc.returncode == 0, err
    assert layout(out) == BLOCK_LAYOUT


def test_sbatch_with_inner_srun_completes(slurm_cluster, tmp_path):
    """A batch script asking for 2 nodes x 2 tasks, whose srun prints the task layout, ends COMPLETED and wrote the
    same block layout as a direct srun."""
    script, output = tmp_path / "job.sh", tmp_path / "job.out"
    script.write_text(f"#!/bin/sh\n#SBATCH -N2 --ntasks-per-node=2 --output={output}\nsrun sh -c '{TASK_LINE}'\n")
    proc = slurm_cluster.login(["sbatch", "--parsable", str(script)], env=task_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    out, err = finish(proc, 60)
    assert proc.returncode == 0, err
    state = slurm_cluster.wait_job(out.strip().split(";")[0], timeout=120)
    assert state == "COMPLETED", f"{state}: {output.read_text() if output.exists() else 'no output'}"
    assert layout(output.read_text()) == BLOCK_LAYOUT


def test_crash_of_node2_ends_a_running_srun(slurm_cluster):
    """SIGKILL of everything on node2 during `srun -N2 --ntasks-per-node=2 sleep 60` makes srun end (within a
    generous 90 s, well before the sleep would) with a non-zero code and an error naming node2; node2 comes back
    idle once its slurmd is restarted."""
    proc = slurm_cluster.login(["srun", "-N2", "--ntasks-per-node=2", "sleep", "60"], env=task_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while sum(Path(f"/proc/{p}/comm").read_text().strip() == "sleep" for p in slurm_cluster.pids("node2")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the step never started on node2"
            time.sleep(0.2)
        slurm_cluster.kill_node("node2")
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("srun still running 90 s after node2 crashed")
        assert proc.returncode != 0
        assert "node2" in err.decode()
    finally:
        proc.kill()
        proc.communicate()
        slurm_cluster.start_node("node2")
        slurm_cluster.wait_idle(timeout=120)

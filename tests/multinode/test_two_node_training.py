"""Fine-tuning across two real nodes as clusters launch it, against the one-process run (TP=PP=DP=1).

Two nodes on this host (`tests/multinode/cluster.py`: network namespaces with their own addresses and hostnames on a
bridge), the README's launch commands run as written, 2 processes per node:
- torchrun on each node: ``torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=node1:29400``;
- SLURM (slurmctld + a slurmd per node): ``srun -N2 --ntasks-per-node=2 python <entry script> ...`` from the login
  host, and the repository's sbatch script (`examples/.../tuning/slurm/tiedlora_finetuning.sbatch`).
Each trains TP2 x DP2 and PP2 x DP2 with the replica check on every step; the adapter .nemo it writes must equal the
TP1 run's (`tests/entry_runs.assert_same_adapter`: fp32 rounding of a split run), and the log must show the world
spanning both hosts. Killing one node's processes mid-training must end the whole job within the documented
timeout, the output naming what was lost.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.entry_runs import REPO, adapter_archive, assert_same_adapter, finetune_command, largest_difference
from tests.script_env import script_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SBATCH = REPO / "examples/nlp/language_modeling/tuning/slurm/tiedlora_finetuning.sbatch"
LAYOUTS = {
    "tp2_dp2": ["model.tensor_model_parallel_size=2"],
    "pp2_dp2": ["model.pipeline_model_parallel_size=2"],
}
CHECKED = ["model.peft.tiedlora_tuning.check_replicas_every=1", "exp_manager.resume_if_exists=False"]
RENDEZVOUS_PORT = 29400
TIMEOUT_MINUTES = 1  # NEMO_TIEDLORA_DIST_TIMEOUT_MINUTES for the kill tests: no collective waits longer
SPANS_BOTH = "process groups: 4 ranks on 2 host(s) (node1: ranks 0-1; node2: ranks 2-3)"


def _env() -> dict[str, str]:
    env = script_env()
    env["TORCH_CPP_LOG_LEVEL"] = "ERROR"  # c10d's "hostname of the client socket cannot be retrieved" (no DNS)
    env["NEMO_TIEDLORA_DIST_TIMEOUT_MINUTES"] = str(TIMEOUT_MINUTES)
    return env


def _overrides(base: Path, data: Path, work: Path, name: str, *extra: str) -> list[str]:
    """The entry script's overrides (everything after the script path in `finetune_command`)."""
    return finetune_command(base, data, work, name, 2, "trainer.num_nodes=2", *extra)[2:]


def _torchrun(two_nodes, node: str, run_id: str, overrides: list[str], log: Path) -> subprocess.Popen:
    """The README's torchrun command on `node` (the same on both nodes; node1 hosts the rendezvous)."""
    command = ["torchrun", "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=node1:{RENDEZVOUS_PORT}", f"--rdzv_id={run_id}",
               "examples/nlp/language_modeling/tuning/megatron_gpt_finetuning.py", *overrides]
    return two_nodes.run(node, command, env=_env(), cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _srun(slurm_cluster, overrides: list[str], log: Path) -> subprocess.Popen:
    command = ["srun", "-N2", "--ntasks-per-node=2", "python",
               "examples/nlp/language_modeling/tuning/megatron_gpt_finetuning.py", *overrides]
    return slurm_cluster.login(command, env=_env(), cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _finished(process: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    process.wait(timeout=timeout)
    text = log.read_text(errors="replace")
    assert process.returncode == 0, f"{log.name} failed (rc {process.returncode}):\n" + "".join(
        text.splitlines(True)[-40:])
    return text


def _check_run(text: str, work: Path, name: str, reference, what: str) -> None:
    from nemo_tiedlora.formats.adapter_archive import load_archive

    assert SPANS_BOTH in text, f"{what}: the world did not span both nodes"
    assert "bitwise identical on all 4 rank(s)" in text, f"{what}: the replica check did not run"
    run = load_archive(adapter_archive(work, name))
    assert_same_adapter(run, reference, what=what)
    print(f"{what}: largest relative difference from TP1 {largest_difference(run, reference):.2e}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torchrun_across_two_nodes_equals_tp1(layout, two_nodes, dist_base, script_tp1):
    """torchrun --nnodes=2 (c10d rendezvous on node1), one agent per node: the adapter equals the TP1 run's."""
    base, data, work = dist_base
    name = f"torchrun_{layout}"
    overrides = _overrides(base, data, work, name, *LAYOUTS[layout], *CHECKED)
    logs = [work / f"{name}.{node}.log" for node in ("node1", "node2")]
    agents = [_torchrun(two_nodes, node, name, overrides, log) for node, log in zip(("node1", "node2"), logs)]
    texts = [_finished(agent, log) for agent, log in zip(agents, logs)]
    _check_run("".join(texts), work, name, script_tp1, f"torchrun {layout}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_srun_across_two_nodes_equals_tp1(layout, slurm_cluster, dist_base, script_tp1):
    """srun -N2 --ntasks-per-node=2 from the login host (only SLURM's variables in each task): equals TP1."""
    base, data, work = dist_base
    name = f"srun_{layout}"
    log = work / f"{name}.log"
    text = _finished(_srun(slurm_cluster, _overrides(base, data, work, name, *LAYOUTS[layout], *CHECKED), log), log)
    _check_run(text, work, name, script_tp1, f"srun {layout}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sbatch_script_equals_tp1(layout, slurm_cluster, dist_base, script_tp1):
    """The repository's sbatch script, submitted as the README shows with the entry script's overrides after it
    (its node and task counts given on sbatch's command line): the job completes and equals TP1."""
    base, data, work = dist_base
    name = f"sbatch_{layout}"
    log = work / f"{name}.out"
    overrides = [o for o in _overrides(base, data, work, name, *LAYOUTS[layout], *CHECKED)
                 if not o.startswith(("trainer.devices=", "trainer.num_nodes="))]  # the script takes SLURM's
    submit = slurm_cluster.login(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--output={log}",
                                  str(SBATCH), *overrides], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    out, err = submit.communicate(timeout=60)
    assert submit.returncode == 0, err.decode()
    state = slurm_cluster.wait_job(out.decode().strip().split(";")[0], timeout=900)
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", f"sbatch job {state}:\n" + "".join(text.splitlines(True)[-40:])
    _check_run(text, work, name, script_tp1, f"sbatch {layout}")


def _wait_for(log: Path, needle: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text(errors="replace"):
        assert process.poll() is None, f"ended before '{needle}':\n{log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"no '{needle}' in {log.name} after {timeout:.0f} s"
        time.sleep(0.5)


LONG = ["trainer.max_steps=100000", "trainer.val_check_interval=100000", "trainer.limit_val_batches=0"]
ENDS_WITHIN = TIMEOUT_MINUTES * 60 + 60  # the documented bound: the collective timeout, plus detection slack


def test_torchrun_job_ends_when_a_node_is_killed(two_nodes, dist_base):
    """TP2 x DP2 under torchrun; every process of node2 SIGKILLed mid-training: node1's agent ends (non-zero)
    within the collective timeout, its output naming the lost peer (node2's address) or the failed ranks."""
    base, data, work = dist_base
    name = "torchrun_kill"
    overrides = _overrides(base, data, work, name, *LAYOUTS["tp2_dp2"], *CHECKED, *LONG)
    logs = [work / f"{name}.{node}.log" for node in ("node1", "node2")]
    agents = [_torchrun(two_nodes, node, name, overrides, log) for node, log in zip(("node1", "node2"), logs)]
    try:
        _wait_for(logs[0], "bitwise identical on all 4 rank(s)", agents[0])
        killed = time.monotonic()
        two_nodes.kill_node("node2")
        agents[0].wait(timeout=ENDS_WITHIN)
        ended = time.monotonic() - killed
    finally:
        for agent in agents:
            agent.kill()
    text = logs[0].read_text(errors="replace")
    assert agents[0].returncode != 0
    lost = [line for line in text.splitlines() if f"[{two_nodes.address('node2')}]" in line]
    assert lost, text[-3000:]  # gloo: "Read error [<node2's address>]:<port>: Connection reset by peer"
    print(f"torchrun: {lost[0].strip()[:160]}")
    print(f"torchrun: node1's agent ended {ended:.1f} s after node2 was killed")


def test_srun_job_ends_when_a_node_is_killed(slurm_cluster, dist_base):
    """TP2 x DP2 under srun; every process of node2 SIGKILLed mid-training (slurmd included, as in a crash): srun
    ends (non-zero) within SLURM's node-failure detection (SlurmdTimeout) or the collective timeout, naming node2;
    the node is back to idle once its slurmd restarts."""
    base, data, work = dist_base
    name = "srun_kill"
    log = work / f"{name}.log"
    job = _srun(slurm_cluster, _overrides(base, data, work, name, *LAYOUTS["tp2_dp2"], *CHECKED, *LONG), log)
    try:
        _wait_for(log, "bitwise identical on all 4 rank(s)", job)
        killed = time.monotonic()
        slurm_cluster.kill_node("node2")
        job.wait(timeout=ENDS_WITHIN)
        ended = time.monotonic() - killed
    finally:
        job.kill()
        slurm_cluster.start_node("node2")
        slurm_cluster.wait_idle(timeout=120)
    text = log.read_text(errors="replace")
    assert job.returncode != 0
    lost = [line for line in text.splitlines() if "node2" in line and "NeMo" not in line]
    assert lost, text[-3000:]  # "srun: error: Node failure on node2"
    print(f"srun: {lost[0].strip()[:160]}")
    print(f"srun: ended {ended:.1f} s after node2 was killed")


def test_srun_layout_mismatch_refused_before_any_group(slurm_cluster, dist_base):
    """srun -N2 --ntasks-per-node=2 with trainer.num_nodes=1 (the trainer would build a 2-process world of 4
    tasks): every task ends with exit status 2 and one line naming both counts and the fix, before any process group
    forms (no rank waits at a rendezvous)."""
    base, data, work = dist_base
    log = work / "srun_mismatch.log"
    overrides = [o for o in _overrides(base, data, work, "srun_mismatch") if o != "trainer.num_nodes=2"]
    job = _srun(slurm_cluster, [*overrides, "trainer.num_nodes=1"], log)
    job.wait(timeout=300)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    assert job.returncode != 0
    assert len(lines) == 4, lines  # one per task
    assert all("SLURM started 4 tasks on 2 node(s)" in line and "trainer.num_nodes=1 x trainer.devices=2" in line
               and line.endswith("run srun -N1 --ntasks-per-node=2, or set trainer.num_nodes=2 trainer.devices=2")
               for line in lines), lines
    assert "process groups:" not in log.read_text(errors="replace")

"""The launcher's world (nemo glue layer): which processes exist, where this one sits, where they meet.

Rank, world size, local rank, node rank and the rendezvous address belong to whatever launched the job, read
through Lightning's cluster environments, in the order the Trainer picks them (torchelastic first, since torchrun
also runs inside SLURM allocations; then SLURM, LSF, MPI; else Lightning's own). `environment()` is the one the
Trainer of this process chose when `remember(trainer)` was called (the entry scripts do), else the same choice made
afresh from the process environment. Nothing here falls back to a loopback address for a job that spans hosts.

`check_launch(trainer_cfg)` compares what the launcher started with what the trainer asks for (SLURM's task counts,
torchrun's world) and refuses a mismatch with one line, before any process group forms.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import weakref
from dataclasses import dataclass
from typing import Any, Optional

from nemo_tiedlora.core.errors import TiedLoraConfigError

_trainer: list[weakref.ref] = []  # the trainer the entry script built, held weakly (a dropped one is forgotten)


def remember(trainer: Any) -> None:
    """Use the cluster environment and node count of `trainer` (built by NeMo's trainer builder) from now on."""
    _trainer[:] = [weakref.ref(trainer)]


def forget() -> None:
    _trainer.clear()


def _remembered() -> Optional[Any]:
    return _trainer[0]() if _trainer else None


def environment() -> Any:
    """The Lightning cluster environment of this process (the Trainer's, or chosen as the Trainer chooses)."""
    trainer = _remembered()
    if trainer is not None:
        return trainer.strategy.cluster_environment
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    for kind in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if kind.detect():
            return kind()
    return LightningEnvironment()


@dataclass(frozen=True)
class World:
    """This process's place in the job, as its launcher defines it."""

    launcher: str  # "torchrun", "SLURM", "LSF", "MPI" or "none" (a single process, or Lightning's own spawn)
    world_size: int
    global_rank: int
    local_rank: int
    node_rank: int
    num_nodes: int
    external: bool  # the launcher started every process (torchrun, srun, mpirun): the world exists now

    def rendezvous(self) -> tuple[str, int]:
        """(address, port) of the job's TCP store, from the launcher; refused when it is a loopback address seen
        from a node other than the first (those ranks would dial themselves)."""
        env = environment()
        address, port = str(env.main_address), int(env.main_port)
        if self.num_nodes > 1 and self.node_rank != 0 and _is_loopback(address):
            raise TiedLoraConfigError(
                f"the job spans {self.num_nodes} nodes but its rendezvous address {address} (MASTER_ADDR) is a "
                f"loopback address on node {self.node_rank}: set MASTER_ADDR to the first node's hostname or "
                "address, reachable from every node (under SLURM leave it unset: the first host of "
                "SLURM_JOB_NODELIST is used), and make that name resolve to a non-loopback address")
        return address, port


_LAUNCHER_NAMES = {"TorchElasticEnvironment": "torchrun", "SLURMEnvironment": "SLURM", "LSFEnvironment": "LSF",
                   "MPIEnvironment": "MPI"}


def world() -> World:
    """The launcher's world for this process."""
    env = environment()
    launcher = _LAUNCHER_NAMES.get(type(env).__name__, "none")
    return World(launcher=launcher, world_size=int(env.world_size()), global_rank=int(env.global_rank()),
                 local_rank=int(env.local_rank()), node_rank=int(env.node_rank()), num_nodes=_node_count(launcher),
                 external=bool(env.creates_processes_externally))


def _node_count(launcher: str) -> int:
    trainer = _remembered()
    if trainer is not None:
        return int(getattr(trainer, "num_nodes", 1) or 1)
    if launcher == "SLURM":
        return int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
    if launcher == "torchrun":
        return int(os.environ.get("GROUP_WORLD_SIZE") or 1)
    return 1


def _is_loopback(address: str) -> bool:
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(address, None)}
    except OSError:
        return False  # unresolvable here: init_process_group says so itself
    return any(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in resolved)


def _tasks_per_node(text: str) -> Optional[int]:
    """SLURM's per-node task count ("2", "2(x2)"); None when the nodes differ ("2,1")."""
    counts = {int(match.group(1)) for match in re.finditer(r"(\d+)(\(x\d+\))?", text)}
    return counts.pop() if len(counts) == 1 else None


def check_launch(trainer_cfg: Any) -> None:
    """One clear line when the processes the launcher started do not match trainer.num_nodes x trainer.devices
    (called before any relaunch or process group)."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if not isinstance(devices, int) or devices < 1:
        return  # "auto" / -1: Lightning counts the devices itself
    asked = f"trainer.num_nodes={nodes} x trainer.devices={devices} = {nodes * devices} processes"
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:
        started, per_node = int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        if started != nodes * devices or per_node != devices:
            raise TiedLoraConfigError(
                f"torchrun started {started} processes ({per_node} on this node) but the trainer asks for {asked}: "
                f"set trainer.devices to torchrun's --nproc_per_node and trainer.num_nodes to its --nnodes")
        return
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return  # not a SLURM step Lightning would take as its launcher
    ntasks, nnodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    per_node_text = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(ntasks)
    per_node = _tasks_per_node(per_node_text)
    if ntasks != nodes * devices or nnodes != nodes or per_node != devices:
        fix = f"run srun -N{nodes} --ntasks-per-node={devices}"
        fix += (f", or set trainer.num_nodes={nnodes} trainer.devices={per_node}" if per_node
                else " (every node the same number of tasks)")
        raise TiedLoraConfigError(
            f"SLURM started {ntasks} tasks on {nnodes} node(s) (SLURM_NTASKS={ntasks}, SLURM_NNODES={nnodes}, "
            f"tasks per node {per_node_text}) but the trainer asks for {asked}: {fix}")


VERSION_ENV = "NEMO_EXPM_VERSION"  # exp_manager's run-folder name when set (nemo.constants.NEMO_ENV_VARNAME_VERSION)


def share_run_folder(exp_manager_cfg: Any) -> None:
    """Give every rank of a launched job the same exp_manager version folder.

    With `exp_manager.resume_if_exists=False` and no `exp_manager.version`, NeMo names the run's folder after the
    time on rank 0 only; the other ranks (on other nodes: the same shared file system) would write their checkpoint
    shards elsewhere. The launcher's job identity is the same in every rank: SLURM's job and step id, torchrun's
    --rdzv_id (when given). With resume_if_exists (the YAML's default) NeMo makes no version folder: nothing to do."""
    manager = exp_manager_cfg or {}
    if manager.get("resume_if_exists", True) or manager.get("version") or manager.get("explicit_log_dir") \
            or os.environ.get(VERSION_ENV):
        return
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        if env["TORCHELASTIC_RUN_ID"] not in ("", "none"):
            os.environ[VERSION_ENV] = f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    elif "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        step = env.get("SLURM_STEP_ID")
        os.environ[VERSION_ENV] = f"slurm-{env['SLURM_JOB_ID']}" + (f".{step}" if step else "")

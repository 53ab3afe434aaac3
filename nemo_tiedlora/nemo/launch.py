"""Multi-process launch for the entry scripts.

megatron-core 0.13 needs every rank's process groups before NeMo builds the model, while Lightning's own launcher
starts the other ranks only later, inside `trainer.fit`. So a single-node run with `trainer.devices=N > 1` that was
not started by torchrun (or SLURM) re-executes itself under `torch.distributed.run` with N processes: the same
command line, the launcher NeMo users already use for multi-node runs.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

logger = logging.getLogger("nemo_tiedlora")

_LAUNCHED_MARKERS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def relaunch_under_torchrun_if_needed(trainer_cfg: Any) -> None:
    """exec `python -m torch.distributed.run --nproc_per_node=N <argv>` when N > 1 processes are asked for here."""
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if not isinstance(devices, int) or devices <= 1 or any(marker in os.environ for marker in _LAUNCHED_MARKERS):
        return
    if nodes > 1:
        raise RuntimeError(
            f"trainer.num_nodes={nodes}: start one process per device on every node with torchrun or SLURM "
            "(e.g. torchrun --nnodes=N --nproc_per_node=D --rdzv_endpoint=HOST:PORT <script> ...)"
        )
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={devices}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", sys.argv[0], *sys.argv[1:]]
    # exp_manager names each run's folder after the time it starts; every rank must pick the same one
    # (the PEFT checkpoints of all TP/PP ranks go into it), so the launcher fixes it for all of them.
    import time

    os.environ.setdefault("NEMO_EXPM_VERSION", time.strftime("%Y-%m-%d_%H-%M-%S"))
    logger.info("trainer.devices=%d: relaunching under torchrun: %s", devices, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def finish_distributed() -> None:
    """End of a multi-process script: every rank waits for the others (rank 0 may still be writing the .nemo),
    then the process groups are torn down explicitly. A gloo rank that simply exits while its threads still run
    can abort ("terminate called without an active exception", SIGABRT), and torchrun then kills the other ranks,
    rank 0 included, before its files are written."""
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

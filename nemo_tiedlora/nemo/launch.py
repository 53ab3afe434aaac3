"""Multi-process launch for the entry scripts (nemo glue layer): relaunch, process groups, timeouts, exit.

megatron-core 0.13 needs every rank's process groups before NeMo builds the model, while Lightning's own launcher
starts the other ranks only later, inside `trainer.fit`. So a single-node run with `trainer.devices=N > 1` that was
not started by torchrun (or SLURM) re-executes itself under `torch.distributed.run` with N processes: the same
command line, the launcher NeMo users already use for multi-node runs; `ensure_process_groups` creates the real
groups (called by the compat fix `real-process-groups` when NeMo initializes model parallelism, and by benchmarks).
The relaunched job runs under a small supervisor (`python -m nemo_tiedlora.nemo.launch`, stdlib only): when it
fails, the cause one of our ranks reported (`user_errors`) is the output's last line, after torchrun's summary.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Iterator

logger = logging.getLogger("nemo_tiedlora")

TIMEOUT_ENV = "NEMO_TIEDLORA_DIST_TIMEOUT_MINUTES"
ERROR_FILE_ENV = "NEMO_TIEDLORA_ERROR_FILE"  # set by the supervisor: ranks append their one-line cause there
DEFAULT_TIMEOUT_MINUTES = 10
_LAUNCHED_MARKERS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
# What torchrun (and Lightning, which sets LOCAL_RANK in the process that builds a trainer) set in a process they
# launch. A new single-process job started from such a process (the demo's, the study's or a test's child) must not
# inherit them: it would take itself for a rank of the surrounding job (see `_LAUNCHED_MARKERS`), skip its own
# relaunch and wait for ranks that never come.
_RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                         "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK")
_RENDEZVOUS_PREFIXES = ("TORCHELASTIC_",)


def without_launch_variables(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less every variable torchrun sets in a rank it launches (rendezvous, ranks, TORCHELASTIC_*)."""
    return {name: value for name, value in env.items()
            if name not in _RENDEZVOUS_VARIABLES and not name.startswith(_RENDEZVOUS_PREFIXES)}


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
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *_this_program(), *sys.argv[1:]]
    # exp_manager names each run's folder after the time it starts; every rank must pick the same one
    # (the PEFT checkpoints of all TP/PP ranks go into it), so the launcher fixes it for all of them.
    import time

    os.environ.setdefault("NEMO_EXPM_VERSION", time.strftime("%Y-%m-%d_%H-%M-%S"))
    logger.info("trainer.devices=%d: relaunching under torchrun: %s", devices, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    # a fresh small process supervises torchrun (this one, holding NeMo, is replaced and its memory freed)
    os.execv(sys.executable, [sys.executable, "-m", "nemo_tiedlora.nemo.launch", *command])


def _this_program() -> list[str]:
    """How torchrun starts this program again: ``-m <module>`` when it was started with ``python -m`` (its file
    run as a script would put the package's folder first on sys.path, where ``nemo_tiedlora/nemo`` hides NeMo),
    else the script's path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name.removesuffix(".__main__")]
    return [sys.argv[0]]


def supervise(command: list[str]) -> int:
    """Run the torchrun `command` and return its exit status; when it failed, end the output with the first cause a
    rank reported through $NEMO_TIEDLORA_ERROR_FILE (torchrun's summary names only the failed rank and its exit
    code). SIGTERM is passed on to torchrun (which stops the ranks); the terminal's Ctrl-C reaches torchrun and the
    ranks directly, and the supervisor waits for them."""
    import signal
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="nemo_tiedlora-launch-") as folder:
        errors = Path(folder) / "errors.txt"
        process = subprocess.Popen(command, env={**os.environ, ERROR_FILE_ENV: str(errors)})
        signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = process.wait()
        causes = errors.read_text(errors="replace").splitlines() if errors.exists() else []
        if code != 0 and causes:
            sys.stdout.flush()
            sys.stderr.write(causes[0] + "\n")
            sys.stderr.flush()
    return code


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Around an entry script's work: our own errors (bad config, data, archive) end the script with their message
    as the last line of the output and exit status 2, without Hydra's traceback (a gradient anomaly too);
    `HYDRA_FULL_ERROR=1` keeps the traceback (the exception propagates to Hydra unchanged)."""
    from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError, TiedLoraGradientError

    try:
        yield
    except (TiedLoraConfigError, TiedLoraCheckpointError, TiedLoraGradientError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stdout.flush()
        rank = os.environ.get("RANK")
        prefix = f"rank {rank}: " if rank not in (None, "0") else ""
        # the entry script's last line, as the user reads it: not a log record (no logger prefix or handler)
        line = f"error: {prefix}{' '.join(str(error).split())}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if os.environ.get(ERROR_FILE_ENV):  # relaunched: the supervisor repeats it after torchrun's summary
            with contextlib.suppress(OSError), open(os.environ[ERROR_FILE_ENV], "a", encoding="utf-8") as report:
                report.write(line + "\n")
        raise SystemExit(2) from None


def dist_timeout() -> datetime.timedelta:
    """How long a collective waits for a missing rank before it fails: $NEMO_TIEDLORA_DIST_TIMEOUT_MINUTES (default
    10), instead of torch's 30 minutes. Every rank of a job must use the same value."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if minutes <= 0:
        from nemo_tiedlora.core.errors import TiedLoraConfigError

        raise TiedLoraConfigError(f"{TIMEOUT_ENV}={raw!r}: set it to a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


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


def _log_world(launcher: str, backend: str) -> None:
    """Rank 0 says where the ranks run (one all-gather of the host names, once per job)."""
    import socket

    import torch.distributed as dist

    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    if dist.get_rank() != 0:
        return
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    spans = [f"{host}: ranks {_ranges(found)}" for host, found in ranks.items()]
    shown = "; ".join(spans[:4]) + ("; ..." if len(spans) > 4 else "")
    logger.info("process groups: %d ranks on %d host(s) (%s), launched by %s, rendezvous %s:%s, backend %s",
                len(hosts), len(ranks), shown, launcher, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                os.environ.get("MASTER_PORT", "-"), backend)


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], ranks[0]
    for previous, current in zip(ranks, [*ranks[1:], None]):
        if current != previous + 1:
            parts.append(f"{start}-{previous}" if previous != start else f"{start}")
            start = current
    return ",".join(parts)


def ensure_process_groups(
    *,
    world_size: int,
    global_rank: int,
    local_rank: int | None = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
) -> None:
    """Create the real torch.distributed and megatron-core groups before NeMo builds the model.

    megatron-core 0.13 modules read their process groups at construction, while NeMo 1.x only *fakes* the
    model-parallel init there and creates the groups later in ``NLPDDPStrategy.setup_distributed`` (which skips
    them when they already exist). Launch multi-process runs with torchrun or SLURM, so every rank exists now.

    Rank, local rank, world size and the rendezvous address are the launcher's (`nemo_tiedlora.nemo.cluster`);
    `world_size` / `global_rank` / `local_rank` (what NeMo derived from the trainer) must agree with them. The
    device is the local rank's.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_tiedlora.nemo import cluster

    timeout = dist_timeout()
    if not dist.is_initialized():
        launched = cluster.world()
        asked = (world_size, global_rank, launched.local_rank if local_rank is None else local_rank)
        if launched.external and asked != (launched.world_size, launched.global_rank, launched.local_rank):
            from nemo_tiedlora.core.errors import TiedLoraConfigError

            raise TiedLoraConfigError(
                f"{launched.launcher} started this process as rank {launched.global_rank} of {launched.world_size} "
                f"(local rank {launched.local_rank}) but the trainer places it as rank {asked[1]} of {asked[0]} "
                f"(local rank {asked[2]}): set trainer.num_nodes and trainer.devices to the launcher's node count "
                "and processes per node")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(launched.local_rank)
        if world_size == 1 and not launched.external:
            # A private port, not exported: child processes (e.g. a script this one launches) must not inherit it.
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            address, port = launched.rendezvous()
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)  # Lightning reads them later
            init_method = "env://"
        # A bounded wait for a lost rank (dist_timeout; torch's default is 30 minutes).
        dist.init_process_group(backend=backend, init_method=init_method, rank=global_rank, world_size=world_size,
                                timeout=timeout)
        if world_size > 1:
            _log_world(launched.launcher, backend)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            distributed_timeout_minutes=int(max(1, timeout.total_seconds() // 60)),
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
        )
        model_parallel_cuda_manual_seed(seed)
        # NLPDDPStrategy.setup_distributed skips NeMo's init_model_parallel once the groups exist, and with it
        # the AppState fields it fills in; checkpoint saving reads them (data_parallel_rank == 0 saves).
        from nemo.utils import AppState

        app_state = AppState()
        app_state.tensor_model_parallel_group = parallel_state.get_tensor_model_parallel_group()
        app_state.data_parallel_group = parallel_state.get_data_parallel_group()
        app_state.data_parallel_rank = parallel_state.get_data_parallel_rank()
        app_state.data_parallel_size = parallel_state.get_data_parallel_world_size()
        app_state.pipeline_model_parallel_group = parallel_state.get_pipeline_model_parallel_group()


if __name__ == "__main__":  # the supervisor of a relaunched job: python -m nemo_tiedlora.nemo.launch <torchrun command>
    sys.exit(supervise(sys.argv[1:]))

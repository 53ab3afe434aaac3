"""Multi-process runs: torchrun + gloo on CPU (the tiny base `dist_base` is in tests/conftest.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch

from nemo_tiedlora.nemo.launch import free_port
from tests.script_env import script_env

DRIVER = Path(__file__).with_name("driver.py")
REPO = Path(__file__).resolve().parents[2]


def torchrun(script: Path, nproc: int, args: list[str], log: Path) -> subprocess.CompletedProcess:
    """Launch `script` under torchrun on loopback with a fresh port; output goes to `log`."""
    env = script_env()
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args]
    with open(log, "w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=900)


def run_driver(dist_base, name: str, nproc: int, *args: str) -> dict:
    """The driver's result for `name` run with `args` on `nproc` ranks, run once per session: the result is kept
    under the name and the arguments together, so two tests share a run only when they ask for the same one."""
    base, data, work = dist_base
    key = hashlib.sha256(" ".join([str(nproc), *args]).encode()).hexdigest()[:12]
    out, log = work / f"{name}-{key}.pt", work / f"{name}-{key}.log"
    if not out.exists():
        result = torchrun(DRIVER, nproc, ["--base", str(base), "--data", str(data), "--out", str(out), *args], log)
        assert result.returncode == 0, f"{name} failed, see {log}:\n" + "".join(log.read_text().splitlines(True)[-30:])
    return torch.load(out)

"""Fixtures `two_nodes` and `slurm_cluster` (one per session, always torn down) and what they need from the host.

Both need root, `ip netns` and util-linux's nsenter/unshare; the SLURM one also needs slurmctld, slurmd, srun and
munged, which it installs with apt-get (Debian's slurm-wlm and munge) the first time they are missing. A test is
skipped, with a one-line reason, only where the host refuses namespaces or the packages cannot be installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.multinode.cluster import SlurmCluster, TwoNodes

SLURM_PROGRAMS = ("slurmctld", "slurmd", "srun", "munged")
_preflight: dict[str, str | None] = {}  # check name -> skip reason (None: ok), each check done once per session


def _first_line(result: subprocess.CompletedProcess) -> str:
    text = (result.stderr or result.stdout or "").strip()
    return text.splitlines()[0] if text else f"rc {result.returncode}"


def _namespaces_refused() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH (iproute2 / util-linux)"
    probe = f"ntl_probe{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"ip netns refused: {_first_line(added)}"
    try:
        entered = subprocess.run(["nsenter", f"--net=/run/netns/{probe}", "unshare", "--mount", "--uts", "true"],
                                 capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if entered.returncode == 0 else f"nsenter/unshare refused: {_first_line(entered)}"


def _slurm_missing() -> str | None:
    if "/usr/sbin" not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
    if all(shutil.which(p) for p in SLURM_PROGRAMS):
        return None
    if shutil.which("apt-get") is None:
        return f"{', '.join(SLURM_PROGRAMS)} not installed and no apt-get to install slurm-wlm + munge"
    install = ["apt-get", "install", "-y", "slurm-wlm", "munge"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        result = subprocess.run(install, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not all(shutil.which(p) for p in SLURM_PROGRAMS):
        return f"apt-get install slurm-wlm munge failed: {_first_line(result)}"
    return None


def _require(*checks) -> None:
    for check in checks:
        if check.__name__ not in _preflight:
            _preflight[check.__name__] = check()
        if _preflight[check.__name__]:
            pytest.skip(_preflight[check.__name__])


@pytest.fixture(scope="session")
def two_nodes(tmp_path_factory):
    """node1 (10.231.77.1) and node2 (10.231.77.2) as namespaces on this host, removed after the session."""
    _require(_namespaces_refused)
    nodes = TwoNodes(tmp_path_factory.mktemp("two_nodes"))
    try:
        yield nodes.up()
    finally:
        nodes.down()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A SLURM cluster (slurmctld + munged on ntlctl, slurmd on node1 and node2 in 10.231.78.0/24, 4 CPUs each),
    both nodes idle; stopped and removed after the session."""
    _require(_namespaces_refused, _slurm_missing)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.up()
    finally:
        cluster.down()

"""Two real nodes on one Linux host, and a real two-node SLURM cluster on them (root only; stdlib only).

Each node is a network namespace with its own address, entered together with a private mount namespace and its own
UTS namespace (hostname); a third namespace, the controller, holds a bridge that joins the nodes' veth pairs:

    <prefix>ctl  <subnet>.254  hostname ntlctl  bridge br0 (veth1, veth2); slurmctld, munged, the SLURM "login"
    <prefix>n1   <subnet>.1    hostname node1   eth0 (peer veth1); slurmd -N node1
    <prefix>n2   <subnet>.2    hostname node2   eth0 (peer veth2); slurmd -N node2

Every link is created directly inside a namespace: the root network namespace gets no interface, route or address,
and no namespace has a default route, so nothing leaves the subnet. Names resolve through /etc/netns/<ns>/hosts,
bind-mounted over /etc/hosts as `ip netns exec` would do. Commands run in a node see the host's filesystem (the
repository, /tmp), because the node's mount namespace starts as a copy of the host's.

Why not `ip netns exec`: it mounts a fresh sysfs over /sys, which hides /sys/fs/cgroup, and slurmd 22.05 always
initialises a cgroup plugin ("No filesystem mounted on /sys/fs/cgroup ... slurmd initialization failed"). `run`
therefore enters the netns with nsenter, unshares mount + UTS, parks the host's cgroup tree on a staging folder,
mounts a sysfs that matches the netns (so /sys/class/net lists only the node's links) and moves the cgroup tree back.

Everything the fixture starts lives inside its namespaces (munged too: a filesystem unix socket is reachable from
any netns), so `down` ends all of it by namespace membership and also clears what a crashed earlier run left. A
lock file per prefix makes a second test session wait for the first instead of tearing its cluster down.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

NODES = ("node1", "node2")
CONTROLLER = "ntlctl"

# Runs argv "on" a node: $1 netns name, $2 hostname, $3 staging folder, then argv. Started under
# `nsenter --net=... unshare --mount --uts --propagation private`, so every mount below is private to the command.
_ENTER = r"""
set -e
ns=$1 host=$2 stage=$3; shift 3
mkdir -p "$stage"
mount --rbind /sys/fs/cgroup "$stage"
mount -t sysfs sysfs /sys
mount --move "$stage" /sys/fs/cgroup
mount --bind "/etc/netns/$ns/hosts" /etc/hosts
mount --bind "/etc/netns/$ns/resolv.conf" /etc/resolv.conf
hostname "$host"
exec "$@"
"""


def _quiet(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check(argv: list[str]) -> None:
    result = _quiet(argv)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (rc {result.returncode}): {result.stderr.strip()}")


class TwoNodes:
    """node1 and node2 as network + mount + UTS namespaces joined by a bridge in a controller namespace.

    `up()` builds them (after clearing any leftover of the same prefix), `run()` starts a command on a node,
    `kill_node()` crashes a node, `down()` removes everything (idempotent)."""

    def __init__(self, base_dir: Path | str, *, prefix: str = "ntl_", subnet: str = "10.231.77"):
        self.base = Path(base_dir)
        self.prefix = prefix
        self.subnet = subnet
        self.netns = {"node1": f"{prefix}n1", "node2": f"{prefix}n2", CONTROLLER: f"{prefix}ctl"}
        self.addresses = {"node1": f"{subnet}.1", "node2": f"{subnet}.2", CONTROLLER: f"{subnet}.254"}
        self._lock_fd: int | None = None
        self._children: list[subprocess.Popen] = []  # background processes to reap after they are killed

    # -- naming -------------------------------------------------------------------------------------------------
    def address(self, node: str) -> str:
        """The IPv4 address of `node` ("node1", "node2" or the controller "ntlctl")."""
        return self.addresses[self._known(node)]

    def _known(self, node: str) -> str:
        if node not in self.netns:
            raise ValueError(f"unknown node {node!r}: use one of {sorted(self.netns)}")
        return node

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def up(self, lock_timeout: float = 1800.0) -> "TwoNodes":
        """Create the three namespaces, the bridge and the veth pairs; clears a half-up state first."""
        self._lock(lock_timeout)
        atexit.register(self.down)  # a last resort if the caller never gets to down()
        try:
            self._clear()
            for sub in ("run", "log"):
                (self.base / sub).mkdir(parents=True, exist_ok=True)
            self._net_up()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill every process in our namespaces and delete them; safe to call any number of times."""
        try:
            self._clear()
        finally:
            self._unlock()
            atexit.unregister(self.down)

    def _clear(self) -> None:
        for node in self.netns:
            self.kill_node(node)
        for child in self._children:
            child.wait()
        self._children.clear()
        for ns in self.netns.values():
            if Path("/run/netns", ns).exists():
                _check(["ip", "netns", "del", ns])
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)

    def _net_up(self) -> None:
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.addresses[n]} {n}\n" for n in self.netns)
        for ns in self.netns.values():
            _check(["ip", "netns", "add", ns])
            folder = Path("/etc/netns", ns)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts)
            (folder / "resolv.conf").write_text("# no DNS: names come from the hosts file\n")
        ctl = self.netns[CONTROLLER]
        batches = {ctl: ["link set lo up", "link add br0 type bridge",
                         f"addr add {self.address(CONTROLLER)}/24 dev br0", "link set br0 up"]}
        for i, node in enumerate(NODES, start=1):
            batches[ctl] += [f"link add veth{i} type veth peer name eth0 netns {self.netns[node]}",
                             f"link set veth{i} master br0 up"]
            batches[self.netns[node]] = ["link set lo up", f"addr add {self.address(node)}/24 dev eth0",
                                         "link set eth0 up"]
        for ns, batch in batches.items():
            result = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(batch) + "\n", text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if result.returncode != 0:
                raise RuntimeError(f"setting up the links of {ns} failed: {result.stderr.strip()}")

    # -- processes ----------------------------------------------------------------------------------------------
    def run(self, node: str, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | str | None = None,
            stdout=None, stderr=None, stdin=subprocess.DEVNULL, start_new_session: bool = False) -> subprocess.Popen:
        """Start `argv` on `node` (its netns, a private mount ns with its hosts file, its hostname); the Popen's pid
        is the command itself (nsenter and unshare exec into it)."""
        ns = self.netns[self._known(node)]
        wrapper = ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "--propagation", "private",
                   "/bin/sh", "-c", _ENTER, "sh", ns, node, str(self.base / "run" / f"cgstage.{node}")]
        return subprocess.Popen(wrapper + [str(a) for a in argv], env=env, cwd=cwd, stdin=stdin, stdout=stdout,
                                stderr=stderr, start_new_session=start_new_session)

    def check_output(self, node: str, argv: list[str], *, env: dict[str, str] | None = None,
                     timeout: float = 60.0) -> str:
        """Run `argv` on `node` to the end and return its stdout; raises with its stderr if it fails."""
        proc = self.run(node, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} on {node} failed (rc {proc.returncode}): {err.decode().strip()}")
        return out.decode()

    def pids(self, node: str) -> list[int]:
        """The processes whose network namespace is `node`'s."""
        try:
            target = os.stat(f"/run/netns/{self.netns[self._known(node)]}")
        except FileNotFoundError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(entry))
        return found

    def kill_node(self, node: str) -> None:
        """Crash `node`: SIGKILL every process in its network namespace (repeated until none is left)."""
        for _ in range(50):
            pids = [p for p in self.pids(node) if p != os.getpid()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"processes in {node}'s namespace survive SIGKILL: {self.pids(node)}")

    # -- cross-session lock -------------------------------------------------------------------------------------
    def _lock(self, timeout: float) -> None:
        if self._lock_fd is not None:
            return
        path = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
        fd = os.open(path / f"{self.prefix}twonodes.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise TimeoutError(f"namespaces {self.prefix}* are held by pid {holder or '?'}; wait for that "
                                       f"session to end") from exc
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class SlurmCluster(TwoNodes):
    """TwoNodes plus SLURM: slurmctld and munged in the controller namespace, one slurmd per node, 4 CPUs each.

    Authentication is auth/munge + cred/munge against a private munged (own key, socket, pid, log and seed under the
    base folder); slurm finds it through AuthInfo=socket=. Nothing is written to /etc/slurm or /etc/munge."""

    def __init__(self, base_dir: Path | str, *, prefix: str = "ntl_s", subnet: str = "10.231.78", cpus: int = 4,
                 slurmd_timeout: int = 3, message_timeout: int = 5):
        super().__init__(base_dir, prefix=prefix, subnet=subnet)
        self.cpus, self.slurmd_timeout, self.message_timeout = cpus, slurmd_timeout, message_timeout
        self.conf = self.base / "etc" / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket"

    def up(self, lock_timeout: float = 1800.0) -> "SlurmCluster":
        """Namespaces, then munged, slurmctld and both slurmd; returns once both nodes are idle."""
        super().up(lock_timeout)
        try:
            shutil.rmtree(self.base / "state", ignore_errors=True)
            self._write_conf()
            self._start_munged()
            self._daemon(CONTROLLER, "slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            self._wait("slurmctld answering", lambda: "is UP" in self._try(["scontrol", "ping"]))
            for node in NODES:
                self.start_node(node)
            self.wait_idle()
        except BaseException:
            self.down()
            raise
        return self

    def slurm_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """`env` (default: this process's) with SLURM_CONF pointing at the cluster's slurm.conf."""
        out = dict(os.environ if env is None else env)
        out["SLURM_CONF"] = str(self.conf)
        return out

    def login(self, argv: list[str], env: dict[str, str] | None = None, **popen_kwargs) -> subprocess.Popen:
        """Start a client command (srun, sbatch, squeue, scontrol, ...) on the controller, the cluster's login host.
        `env` goes to the job as it is: SLURM exports the submitting environment to tasks (--export=ALL)."""
        return self.run(CONTROLLER, argv, env=self.slurm_env(env), **popen_kwargs)

    def start_node(self, node: str) -> None:
        """Start `node`'s slurmd (after `kill_node`, ReturnToService=2 brings it back to idle on registration)."""
        self._daemon(node, f"slurmd.{node}", ["slurmd", "-D", "-N", node, "-f", self.conf])

    def node_states(self) -> dict[str, str]:
        """{node: sinfo state}, e.g. {"node1": "idle", "node2": "down*"}."""
        lines = self._try(["sinfo", "-h", "-N", "-o", "%N %t"]).split("\n")
        return dict(line.split() for line in lines if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until both nodes are idle."""
        self._wait("both nodes idle", lambda: self.node_states() == {n: "idle" for n in NODES}, timeout)

    def job_state(self, job_id: str | int) -> str:
        """The JobState slurmctld reports for `job_id` (finished jobs are kept for MinJobAge=300 s)."""
        fields = self.check_output(CONTROLLER, ["scontrol", "-o", "show", "job", str(job_id)],
                                   env=self.slurm_env()).split()
        return next(f.split("=", 1)[1] for f in fields if f.startswith("JobState="))

    def wait_job(self, job_id: str | int, timeout: float = 120.0) -> str:
        """Wait until batch job `job_id` leaves the pending/running states and return its final JobState; a failed
        query is asked again until `timeout`."""
        active = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
                  "STAGE_OUT"}
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.job_state(job_id)
            except RuntimeError:  # a busy slurmctld can drop one query ("Unexpected missing socket error"): ask again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            if state not in active:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")
            time.sleep(0.5)

    def logs(self) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.base / "log").glob("*")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"== {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- internals ----------------------------------------------------------------------------------------------
    def _try(self, argv: list[str]) -> str:
        proc = self.run(CONTROLLER, argv, env=self.slurm_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            return proc.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return ""

    def _wait(self, what: str, ready, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM cluster: no {what} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)

    def _daemon(self, node: str, name: str, argv: list) -> None:
        with open(self.base / "log" / f"{name}.stdio", "ab") as out:
            self._children.append(self.run(node, argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                           env=self.slurm_env()))

    def _start_munged(self) -> None:
        munge = self.base / "munge"
        munge.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o700)
        key = munge / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # --force: munged refuses a socket folder that is not world-executable; every client here is root.
        self.check_output(CONTROLLER, ["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                                       f"--pid-file={self.base / 'run' / 'munged.pid'}",
                                       f"--log-file={self.base / 'log' / 'munged.log'}",
                                       f"--seed-file={munge / 'munged.seed'}"])
        self._wait("munge socket", self.munge_socket.exists, 10.0)

    def _write_conf(self) -> None:
        if len(str(self.munge_socket)) > 100:
            raise ValueError(f"base folder {self.base} is too long for a unix socket path; use a shorter one")
        for folder in ("etc", "state/ctld", *(f"state/{n}" for n in NODES)):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        b = self.base
        nodes = "".join(f"NodeName={n} NodeAddr={self.address(n)} NodeHostname={n} CPUs={self.cpus} "
                        f"RealMemory=1000 State=UNKNOWN\n" for n in NODES)
        self.conf.write_text(
            f"# written by tests/multinode/cluster.py\n"
            f"ClusterName=ntl\nSlurmctldHost={CONTROLLER}({self.address(CONTROLLER)})\n"
            f"SlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={self.munge_socket}\n"
            f"SlurmctldPort=6817\nSlurmdPort=6818\n"
            f"StateSaveLocation={b}/state/ctld\nSlurmdSpoolDir={b}/state/%n\n"
            f"SlurmctldPidFile={b}/run/slurmctld.pid\nSlurmdPidFile={b}/run/slurmd.%n.pid\n"
            f"SlurmctldLogFile={b}/log/slurmctld.log\nSlurmdLogFile={b}/log/slurmd.%n.log\n"
            f"SlurmctldDebug=info\nSlurmdDebug=info\n"
            f"ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            f"JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
            f"JobCompType=jobcomp/none\nMpiDefault=none\nSwitchType=switch/none\n"
            f"SchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            f"SlurmdParameters=config_overrides\nReturnToService=2\n"
            f"SlurmctldTimeout=30\nSlurmdTimeout={self.slurmd_timeout}\nMessageTimeout={self.message_timeout}\n"
            f"InactiveLimit=0\nKillWait=5\nMinJobAge=300\n"
            f"{nodes}PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP\n")

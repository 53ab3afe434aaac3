"""The sweep's child processes (entry scripts, scorers, the embedded base's build) and the run folders they write.

A child never outlives the sweep that started it:

- it runs in its own process group, so the terminal's Ctrl-C reaches only the sweep, which then stops the child's
  whole group (SIGTERM, then SIGKILL after a grace period) and exits with one line;
- on Linux it is also bound to its parent with ``PR_SET_PDEATHSIG``: if the sweep is killed outright (SIGKILL, OOM),
  the kernel kills the child too, instead of leaving an orphan that keeps writing into its run folder.

Where that binding is unavailable (or for a folder left by an older sweep), :func:`claim_run_folder` refuses to
reuse a run folder while the process recorded in its pid file is still alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

PID_FILE = ".sweep-child.pid"  # in the run folder: "<pid> <marker>" of the child writing there
_ECHO_MARKS = ("Epoch", "Testing", "pre-train", "base model:", "Tied-LoRA", "  A:", "  B:", "  u:", "  v:", "total:",
               "LoRA at rank", "Error", "error")
_GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


class RunFolderBusy(RuntimeError):
    """A live process (an orphan of an interrupted sweep) still writes into the run folder."""


def _bind_to_parent(parent: int) -> None:
    """In the child before exec: own process group; on Linux, SIGKILL when the parent dies."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the binding: do not start at all
            os._exit(1)


def child_env() -> dict[str, str]:
    """This process's environment for a new single-process job (no inherited rendezvous), quiet warnings."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def stop_group(process: subprocess.Popen, *, grace: float = _GRACE_SECONDS) -> None:
    """Stop ``process`` and everything in its process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def _no_second_interrupt():
    """Ignore SIGINT while the child is being stopped (main thread only; elsewhere signals cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_logged(args: Sequence[str], *, log: Path, title: str, echo: bool = False,
               pid_file: Path | None = None, marker: str = "") -> None:
    """Run ``args`` as a child bound to this process; everything it prints goes to ``log``, progress lines also to
    the terminal when ``echo``. ``pid_file`` (if given) holds "<pid> <marker>" while the child runs.

    Raises:
        RuntimeError: the child failed (exit code and the last lines of its log).
        KeyboardInterrupt: after stopping the child's process group.
    """
    if echo:
        print(f"\n== {title}\n   {' '.join(args[:2])} ...  (log: {log})", flush=True)
    parent = os.getpid()
    with open(log, "w") as out:
        process = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=child_env(),
                                   text=True, preexec_fn=lambda: _bind_to_parent(parent))
        try:
            if pid_file is not None:
                pid_file.parent.mkdir(parents=True, exist_ok=True)
                pid_file.write_text(f"{process.pid} {marker}\n")
            for line in process.stdout:  # type: ignore[union-attr]
                out.write(line)
                out.flush()  # the log follows the run (tail -f)
                if echo and any(mark in line for mark in _ECHO_MARKS):
                    sys.stdout.write(line.rstrip("\n")[-200:] + "\n")
                    sys.stdout.flush()
            process.wait()
        except BaseException:
            with _no_second_interrupt():  # a second Ctrl-C must not abandon the child half-stopped
                stop_group(process)
            raise
        finally:
            if pid_file is not None and process.poll() is not None:
                pid_file.unlink(missing_ok=True)
    if process.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{title} failed (exit {process.returncode}); last lines of {log}:\n{tail}")


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and (where /proc shows it) its command line contains ``marker``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if marker and cmdline.exists():
        with contextlib.suppress(OSError):
            return marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return True


def claim_run_folder(run_dir: Path) -> None:
    """Make ``run_dir`` ready for a new attempt: refuse while a live child of an earlier sweep writes into it,
    else remove what an earlier attempt left (a stale attempt must not be read as this one).

    Raises:
        RunFolderBusy: naming the process and how to stop it.
    """
    pid_file = run_dir / PID_FILE
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid_text, _, marker = pid_file.read_text().strip().partition(" ")
        pid = int(pid_text)
        if pid != os.getpid() and _alive(pid, marker):
            raise RunFolderBusy(
                f"run folder {run_dir} is still being written by process {pid} (left running by an interrupted "
                f"sweep): stop it (kill {pid}) and run the sweep again"
            )
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)

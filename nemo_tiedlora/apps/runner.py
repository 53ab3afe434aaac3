"""Child processes for NeMo's entry scripts and the package's own commands (applications layer), shared by the demo, the
study sweep and the benchmark: where the entry scripts are, the environment of a new single-process job, and
:func:`run_logged`, which runs one child bound to its parent.

A child never outlives the process that started it:

- it runs in its own process group, so the terminal's Ctrl-C reaches only the parent, which then stops the child's
  whole group (SIGTERM, then SIGKILL after a grace period) and re-raises KeyboardInterrupt;
- on Linux it is also bound to its parent with ``PR_SET_PDEATHSIG``: if the parent is killed outright (SIGKILL,
  OOM), the kernel kills the child too, instead of leaving an orphan that keeps writing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from nemo_tiedlora.nemo.launch import without_launch_variables

__all__ = ["child_env", "entry_script", "run_checked", "run_logged", "stop_group"]

_ECHO_MARKS = ("Epoch", "Testing", "pre-train", "base model:", "Tied-LoRA", "  A:", "  B:", "  u:", "  v:", "total:",
               "LoRA at rank", "Error", "error")
_GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


def entry_script(name: str) -> Path:
    """The NeMo-style entry script ``name`` (``megatron_gpt_finetuning.py``, ``megatron_gpt_generate.py``, ...) as
    shipped in the package (``nemo_tiedlora/apps/entry_scripts/``), so a wheel runs it as a checkout does."""
    path = Path(__file__).resolve().parent / "entry_scripts" / name
    if not path.is_file():
        raise FileNotFoundError(f"entry script {name} not found in {path.parent}: reinstall nemo_tiedlora")
    return path


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
    env = dict(without_launch_variables(os.environ), PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
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


def run_checked(args: Sequence[str], *, what: str) -> subprocess.CompletedProcess:
    """Run a short child (``python -m nemo_tiedlora import-hf ...``) bound to this process, its output captured.

    Raises:
        RuntimeError: the child failed, with ``what``, its exit code and the end of its output.
    """
    parent = os.getpid()
    result = subprocess.run(list(args), capture_output=True, text=True, stdin=subprocess.DEVNULL, env=child_env(),
                            preexec_fn=lambda: _bind_to_parent(parent))
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")
    return result


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
        process = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=child_env(),
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

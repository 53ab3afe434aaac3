"""The run folders the sweep's children write (their children run through :mod:`nemo_tiedlora.apps.runner`, bound
to the sweep: Ctrl-C or a killed sweep stops them).

Where that binding is unavailable (or for a folder left by an older sweep), :func:`claim_run_folder` refuses to
reuse a run folder while the process recorded in its pid file is still alive.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PID_FILE = ".sweep-child.pid"  # in the run folder: "<pid> <marker>" of the child writing there


class RunFolderBusy(RuntimeError):
    """A live process (an orphan of an interrupted sweep) still writes into the run folder."""


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

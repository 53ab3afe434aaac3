"""The environment of a script a test starts (entry scripts, CLI commands, torchrun drivers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nemo_tiedlora.nemo.launch import without_launch_variables


def script_env() -> dict[str, str]:
    """This interpreter's bin folder first on PATH (NeMo builds its C++ data helpers with the python found there),
    one OpenMP thread per process (the test machine's cores are shared by every rank and by the test process), no
    warning noise in the logs, and no rendezvous variables inherited from a surrounding torchrun job."""
    env = without_launch_variables(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env

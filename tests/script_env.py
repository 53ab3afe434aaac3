"""The environment of a script a test starts (entry scripts, CLI commands, torchrun drivers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def script_env() -> dict[str, str]:
    """This interpreter's bin folder first on PATH (NeMo builds its C++ data helpers with the python found there),
    one OpenMP thread per process (the test machine's cores are shared by every rank and by the test process), no
    warning noise in the logs, and no rendezvous variables inherited from a surrounding torchrun job."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env

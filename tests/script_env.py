"""The environment of a script a test starts (entry scripts, CLI commands, torchrun drivers)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


# What torchrun / Lightning set in a process they launch (Lightning sets LOCAL_RANK in this very test process when a
# test builds a trainer in it): inherited, the entry scripts would take themselves for an already-launched rank and
# skip their torchrun relaunch (a trainer.devices=3 generation then waited for ranks that never came).
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                     "ROLE_RANK", "NODE_RANK")


def script_env() -> dict[str, str]:
    """This interpreter's bin folder first on PATH (NeMo builds its C++ data helpers with the python found there),
    one OpenMP thread per process (the test machine's cores are shared by every rank and by the test process), no
    warning noise in the logs, and no rendezvous variables inherited from a surrounding torchrun job."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("TORCHELASTIC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env

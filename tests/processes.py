"""Helpers for tests that watch processes end (the sweep's children)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether ``pid`` ends within ``timeout`` seconds (a zombie waiting to be reaped counts as ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().rsplit(") ", 1)[-1].startswith("Z"):
            return True
        time.sleep(0.1)
    return False

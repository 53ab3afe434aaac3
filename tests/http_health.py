"""Waiting for a server started as a child process to answer on loopback (the adapter server, vLLM)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_until_healthy(process: subprocess.Popen, url: str, log: Path, seconds: float = 600) -> None:
    """Return once ``GET url`` answers 200; raise with the log's tail if the process exits or time runs out."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not answer {url} within {seconds:.0f} s:\n{log.read_text()[-3000:]}")

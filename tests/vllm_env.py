"""The serving environment of the vLLM tests: its own venv (requirements/requirements-vllm.txt; vLLM needs
transformers 5, the project's venv pins 4.x), made by `bash scripts/run.sh test` the first time. Tests that need it
skip with one line where it is not installed; everything in it runs as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTRA = "requirements/requirements-vllm.txt"


def vllm_venv_path() -> Path:
    return Path(os.environ.get("NEMO_TIEDLORA_VLLM_VENV", REPO / ".venv-vllm"))


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """The serving venv (with its `vllm` command and transformers 5), or a skip naming how to install it."""
    venv = vllm_venv_path()
    if not list(venv.glob(".installed-vllm-*")) or not (venv / "bin" / "vllm").exists():
        pytest.skip(f"the serving extra ({EXTRA}) is not installed in {venv}: `bash scripts/run.sh test` installs it")
    return venv


def tokenizer_ids(python: str | Path, folder: Path, texts: list[str], chats: list[list[dict]], work: Path) -> dict:
    """tests/tokenizer_ids.py run by `python` (whose transformers it uses) on the tokenizer files in `folder`."""
    work.mkdir(parents=True, exist_ok=True)
    inputs, out = work / "texts.json", work / f"ids_{abs(hash((str(python), str(folder))))}.json"
    inputs.write_text(json.dumps({"texts": texts, "chats": chats}, ensure_ascii=False), encoding="utf-8")
    result = subprocess.run([str(python), str(REPO / "tests" / "tokenizer_ids.py"), str(folder), str(inputs), str(out)],
                            capture_output=True, text=True, timeout=600, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))

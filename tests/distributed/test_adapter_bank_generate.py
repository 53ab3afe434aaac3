"""Several adapters in one generation run: the generate entry script with a folder of adapter .nemo files and a
per-item ``adapter`` field answers every item exactly as the same script does with that adapter alone (or with no
adapter for items without the field): on the tiny 4-layer base at TP1 and at TP2 (torchrun, gloo), and on
SmolLM2-135M-Instruct.

The adapters and the reference runs: tests/bank_runs.py (three kinds, random factors that change the answers).
"""

from __future__ import annotations

import pytest

from tests.smollm2_assets import smollm2_gguf, smollm2_nemo  # noqa: F401 (pytest fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_one_run_with_every_adapter_answers_each_item_as_its_adapter_alone(bank_reference, tp, tmp_path):
    from tests.bank_runs import generate_script

    base, folder, items, answers = bank_reference
    mixed = generate_script(base, tmp_path, items, str(folder), tp=tp)
    assert mixed == answers


SMOLLM2_PROMPTS = ["The capital of France is", "Three primary colors are", "A good breakfast has",
                   "The tallest mountain on Earth is", "Water boils at", "The opposite of cold is"]


def test_smollm2_one_run_with_two_adapters_answers_each_item_as_its_adapter_alone(smollm2_nemo, tmp_path):
    """SmolLM2-135M-Instruct (GQA: 9 heads, 3 query groups, so TP 1 or 3; TP1 here, TP2 on the tiny base above)
    with a tl6 rank-8 and a lora rank-4 adapter and the base mixed in one batch."""
    from nemo_tiedlora.core.model_shape import model_shape
    from nemo_tiedlora.nemo.base_archive import base_config
    from tests.bank_runs import alone_answers, generate_script, random_archive

    shape = model_shape(base_config(smollm2_nemo))
    folder = tmp_path / "adapters"
    folder.mkdir()
    random_archive(folder / "first.nemo", "tl6", 8, shape, seed=1, scale=0.15)
    random_archive(folder / "second.nemo", "lora", 4, shape, seed=2, scale=0.15)
    plan = ["first", "second", None, "second", "first", None]
    items = [{"input": prompt, "output": "x", **({"adapter": name} if name else {})}
             for prompt, name in zip(SMOLLM2_PROMPTS, plan)]
    answers = alone_answers(smollm2_nemo, tmp_path, items, folder)
    assert generate_script(smollm2_nemo, tmp_path / "mixed", items, str(folder), tp=1) == answers

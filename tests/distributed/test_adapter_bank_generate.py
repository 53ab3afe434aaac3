"""Several adapters in one generation run: the generate entry script with a folder of adapter .nemo files and a
per-item ``adapter`` field answers every item exactly as the same script does with that adapter alone (or with no
adapter for items without the field), at TP1 and at TP2 (torchrun, gloo).

The adapters and the reference runs: tests/bank_runs.py (three kinds, random factors that change the answers).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_one_run_with_every_adapter_answers_each_item_as_its_adapter_alone(bank_reference, tp, tmp_path):
    from tests.bank_runs import generate_script

    base, folder, items, answers = bank_reference
    mixed = generate_script(base, tmp_path, items, str(folder), tp=tp)
    assert mixed == answers

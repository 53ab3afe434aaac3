"""Log-likelihood scoring of multiple-choice endings (the paper's HellaSwag protocol) on the real tiny base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.script_env import script_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_batched_scores_equal_a_position_by_position_reference(tiny):
    from nemo_tiedlora.nemo.cpu_restore import restore_base as _restore_base
    from nemo_tiedlora.apps.study.loglik import ending_loglikelihoods

    base, _, _ = tiny
    model = _restore_base(base).model
    model.eval()
    generator = torch.Generator().manual_seed(11)
    items = []
    for length, start in ((9, 4), (17, 12), (5, 1), (30, 29), (12, 6)):
        items.append((torch.randint(4, 200, (length,), generator=generator).tolist(), start))
    batched = ending_loglikelihoods(model, items, batch_size=3, pad_id=0)  # mixed lengths: padding inside batches
    for (tokens, start), value in zip(items, batched):
        ids = torch.tensor([tokens])
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=torch.arange(len(tokens)).unsqueeze(0), attention_mask=None)
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        expected = sum(float(logprobs[p - 1, tokens[p]]) for p in range(start, len(tokens)))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match="needs a non-empty context and a non-empty ending"):
        ending_loglikelihoods(model, [([5, 6, 7], 3)])


def test_loglik_command_scores_every_test_item(tiny, tmp_path):
    from nemo_tiedlora.apps.study.tasks import TASKS

    base, _, _ = tiny
    task = TASKS["hellaswag"]
    task.write_sample(tmp_path / "hellaswag")
    examples = task.load(tmp_path / "hellaswag", "test")
    out = tmp_path / "scores.json"
    env = script_env()
    result = subprocess.run([sys.executable, "-m", "nemo_tiedlora.apps.study.loglik", "--base", str(base), "--task",
                             "hellaswag", "--data", str(tmp_path / "hellaswag"), "--out", str(out),
                             "--max-seq-length", "256"], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    scores = json.loads(out.read_text())
    assert scores["count"] == len(examples) > 0
    assert scores["metric"] == scores["accuracy_norm"]
    for key in ("accuracy", "accuracy_norm"):
        hits = scores[key] * len(examples) / 100
        assert 0 <= scores[key] <= 100 and abs(hits - round(hits)) < 1e-6  # a whole number of items

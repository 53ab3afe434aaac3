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


def _direct_loglikelihoods(model, items) -> list[float]:
    """Summed log-probability of each item's ending, token by token from the model's logits in float64."""
    sums = []
    for tokens, start in items:
        ids = torch.tensor([tokens])
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=torch.arange(len(tokens)).unsqueeze(0), attention_mask=None)
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        sums.append(sum(float(logprobs[p - 1, tokens[p]]) for p in range(start, len(tokens))))
    return sums


def _pick_bounds(sums, endings, label, margin=1e-3):
    """(lowest, highest) hit (0/1) of one item, by summed and by per-character log-likelihood. Endings within
    ``margin`` of the best one could go either way at float32 rounding: they widen the bounds instead of deciding."""
    bounds = []
    for values in (sums, [value / max(len(ending), 1) for value, ending in zip(sums, endings)]):
        near = [i for i, value in enumerate(values) if value >= max(values) - margin]
        bounds.append((int(near == [label]), int(label in near)))
    return bounds


def test_loglik_command_accuracy_equals_a_direct_computation(tiny, tmp_path):
    """The command's accuracy and accuracy_norm equal the fraction of items whose labelled ending has the highest
    log-likelihood (summed, and per character) computed in the test from the base's logits, token by token, for
    the tokens NeMo's SFT dataset gives each (prompt, ending) pair under the generate YAML's template. The 16 sample
    items are relabelled from that computation (3 in 4 with the best ending, 1 in 4 with the worst), so the known
    accuracy is far from chance and from the accuracy of a reversed pick."""
    from nemo_tiedlora.apps.study.loglik import tokenize_pairs
    from nemo_tiedlora.apps.study.tasks import TASKS
    from nemo_tiedlora.nemo.cpu_restore import restore_base
    from nemo_tiedlora.nemo.finetune import tuning_config

    base, _, _ = tiny
    task = TASKS["hellaswag"]
    folder = task.write_sample(tmp_path / "hellaswag")
    records = [json.loads(line) for split in ("train", "test")
               for line in (folder / task.split_files[split]).read_text().splitlines() if line.strip()]
    (folder / task.split_files["test"]).write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = task.load(folder, "test")
    assert len(examples) == len(records) == 16

    restored = restore_base(base)
    model = restored.model
    model.eval()
    data_cfg = tuning_config("generate").model.data.test_ds
    data_cfg.max_seq_length = 256
    choices = [task.choices(example) for example in examples]
    pairs = [(context, ending) for context, endings in choices for ending in endings]
    (tmp_path / "tokens").mkdir()
    sums = _direct_loglikelihoods(model, tokenize_pairs(restored.tokenizer, pairs, data_cfg, tmp_path / "tokens"))
    per_item = [sums[4 * n:4 * n + 4] for n in range(len(examples))]
    assert all(len(endings) == 4 for _, endings in choices)
    for number, (record, values) in enumerate(zip(records, per_item)):
        record["label"] = values.index(max(values) if number % 4 else min(values))
    (folder / task.split_files["test"]).write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = task.load(folder, "test")

    out = tmp_path / "scores.json"
    result = subprocess.run([sys.executable, "-m", "nemo_tiedlora.apps.study.loglik", "--base", str(base), "--task",
                             "hellaswag", "--data", str(folder), "--out", str(out), "--max-seq-length", "256"],
                            capture_output=True, text=True, env=script_env(), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    scores = json.loads(out.read_text())
    assert scores["count"] == len(examples)
    assert scores["metric"] == scores["accuracy_norm"]
    bounds = {"accuracy": [0, 0], "accuracy_norm": [0, 0]}
    for example, values, (_, endings) in zip(examples, per_item, choices):
        for key, (low, high) in zip(bounds, _pick_bounds(values, endings, example.label)):
            bounds[key][0] += low
            bounds[key][1] += high
    assert bounds["accuracy"][1] - bounds["accuracy"][0] <= 2, bounds  # near ties decide few items
    for key, (low, high) in bounds.items():
        assert 100.0 * low / len(examples) <= scores[key] <= 100.0 * high / len(examples), (key, bounds, scores)

"""The imported real model loaded at TP3 (9 heads / 3 query groups: one group per rank) and PP2 through real process
groups (torchrun + gloo): NeMo's full-vocabulary logits equal `transformers`' on the same token ids within 1e-4 in
fp32, for several prompts including one longer than 1024 tokens.

NeMo's side is the distributed driver's ``--logits-out`` mode (the fine-tuning entry script's code path, a tiedlora
adapter whose zero factor makes it the base, one validation batch, logits gathered over TP from the last stage,
the batch's input ids from the first); the reference is the GGUF loaded by `transformers` (dequantized to float32).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.conftest import DRIVER, torchrun
from tests.smollm2_assets import hf_model, smollm2_gguf, smollm2_nemo  # noqa: F401 (pytest fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colors are",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    # 1113 tokens: past 1024, as short as that allows (every row of the batch is padded to it)
    " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones." for i in range(85)),
]


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)], ids=["tp3", "pp2"])  # TP1: tests/integration/test_smollm2.py
def test_logits_at_tp3_and_pp2_equal_transformers(tp, pp, smollm2_nemo, hf_model, tmp_path):
    model, tokenizer = hf_model
    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(json.dumps({"input": prompt, "output": "ok"}) + "\n" for prompt in PROMPTS)
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text(rows)
    out, log = tmp_path / "logits.pt", tmp_path / "driver.log"
    batch = str(len(PROMPTS))
    result = torchrun(DRIVER, tp * pp, ["--base", str(smollm2_nemo), "--data", str(data), "--out",
                                        str(tmp_path / "run.pt"), "--tp", str(tp), "--pp", str(pp), "--steps", "0",
                                        "--logits-out", str(out), "--gbs", batch, "--mbs", batch,
                                        "--max-seq-length", "2048", "--adapter-dim", "8"], log)
    assert result.returncode == 0, "".join(log.read_text().splitlines(True)[-30:])
    actual = torch.load(out).transpose(0, 1)  # megatron's [sequence, batch, vocab] -> [batch, sequence, vocab]
    ids = torch.load(f"{out}.input_ids.pt")
    assert ids.shape[0] == len(PROMPTS) and ids.shape[1] > 1024  # the long prompt made it into the batch whole
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in PROMPTS]
    assert max(lengths) > 1024
    with torch.no_grad():
        expected = torch.cat([model(ids[i:i + 1]).logits for i in range(ids.shape[0])])
    assert actual.shape == expected.shape
    # the batch is padded to its longest row with one repeated pad id; compare every real position of each row
    # (its tokens and the first pad, i.e. the end of the text), not the runs of pad tokens behind it
    real = [_real_length(row) for row in ids]
    assert sorted(real)[-1] > 1024 and all(length >= 4 for length in real)
    difference = [float((actual[i, :n] - expected[i, :n]).abs().max()) for i, n in enumerate(real)]
    print(f"TP{tp} PP{pp}: max |NeMo - transformers| per prompt = {[f'{d:.3g}' for d in difference]} over "
          f"{real} positions, logits up to {float(expected.abs().max()):.3g}")
    assert max(difference) <= 1e-4


def _real_length(row: torch.Tensor) -> int:
    """Positions up to and including the first of the trailing run of the row's last (pad) token."""
    pad = int(row[-1])
    length = row.numel()
    while length > 1 and int(row[length - 2]) == pad:
        length -= 1
    return length

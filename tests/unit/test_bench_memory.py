"""bench_memory's figures against closed forms worked out by hand from what each backward needs.

Per token per layer, beyond x, in elements (r = rank, out = the QKV width), with [f] = 1 if factor f is trained:
- reference composition: ``r [u]`` (``A x`` for u's grad) + ``r [B]`` (``u * A x`` for B's grad)
  + ``out [v]`` (``B (u * A x)`` for v's grad); LoRA: ``r``.
- fused, one piece: ``r`` if any of u, B, v is trained (``A x``; ``u * A x`` is recomputed), else 0.
- split (TP): ``r [u]`` (``A x``) + ``r [B or v]`` (``u * A x``, kept by the second half).
"""

from __future__ import annotations

import pytest
import torch
from spec_table import PRESET_NAMES, trained

from nemo_tiedlora.apps.bench_memory import adapter_traffic, saved_bytes_per_token

D, OUT, R = 512, 1536, 8


def _closed_form(preset: str, impl: str, *, r: int, out: int) -> int:
    t = trained(preset)
    if impl == "reference":
        return r * t["u"] + r * t["B"] + out * t["v"]
    if impl == "fused":
        return r * (t["u"] or t["B"] or t["v"])
    return r * t["u"] + r * (t["B"] or t["v"])


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_saved_bytes_equal_the_closed_form(preset, dtype, size):
    for impl in ("reference", "fused", "split"):
        got = saved_bytes_per_token(preset, hidden_size=D, out_features=OUT, rank=R, impl=impl, dtype=dtype)
        assert got == size * _closed_form(preset, impl, r=R, out=OUT), impl


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_fused_meets_the_target(preset):
    """Every preset within two r-sized fp32 vectors of LoRA's reference: <= 4 r + 8 r bytes per token per layer."""
    lora = 4 * R  # LoRA's reference keeps u * (A x) [tokens, r] for B's gradient
    for impl in ("fused", "split"):
        assert saved_bytes_per_token(preset, hidden_size=D, out_features=OUT, rank=R, impl=impl) <= lora + 8 * R


def test_traffic_by_construction():
    tokens, d, r = 4096, 4096, 8
    tp = adapter_traffic(tokens=tokens, hidden_size=d, rank=r, tp=2, sequence_parallel=False, bytes_per_element=2)
    before = [(c["pass"], c["collective"], c["elements"]) for c in tp["before"]]
    assert before == [("backward", "all-reduce", tokens * d)]
    after = [(c["collective"], c["elements"], c["bytes"]) for c in tp["after"]]
    assert after == [("all-reduce", tokens * r, tokens * r * 2)]
    assert tp["after"][0]["bytes_sent_per_rank"] == tokens * r * 2  # ring all-reduce at TP2: 2 (tp-1)/tp = 1
    sp = adapter_traffic(tokens=tokens, hidden_size=d, rank=r, tp=2, sequence_parallel=True, bytes_per_element=4)
    assert [c["collective"] for c in sp["after"]] == ["all-gather", "reduce-scatter"]
    assert all(c["elements"] == tokens * r and c["bytes_sent_per_rank"] == tokens * r * 4 // 2 for c in sp["after"])
    assert all(c["elements"] == tokens * d for c in sp["before"])
    assert adapter_traffic(tokens=tokens, hidden_size=d, rank=r, tp=1, sequence_parallel=False,
                           bytes_per_element=4) == {"before": [], "after": []}

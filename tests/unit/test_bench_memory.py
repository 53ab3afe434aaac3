"""bench_memory's figures against closed forms worked out by hand from what each backward needs.

Per token per layer, beyond x, in elements (r = rank, out = the QKV width), with [f] = 1 if factor f is trained:
- reference composition: ``r [u]`` (``A x`` for u's grad) + ``r [B]`` (``u * A x`` for B's grad)
  + ``out [v]`` (``B (u * A x)`` for v's grad); LoRA: ``r``.
- fused, one piece: ``r`` if any of u, B, v is trained (``A x``; ``u * A x`` is recomputed), else 0.
- split (TP): ``r [u]`` (``A x``) + ``r [B or v]`` (``u * A x``, kept by the second half).

adapter_traffic's table against the collectives recorded on a real 2-rank gloo group (tests/unit/collective_probe.py).
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


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def observed_collectives(request, tmp_path_factory):
    """What collective_probe records on a real 2-rank gloo group (two spawned processes), per layout."""
    import json

    import torch.multiprocessing as mp

    from collective_probe import observe

    work = tmp_path_factory.mktemp(f"collectives_{request.param}")
    out = work / "calls.json"
    mp.start_processes(observe, args=(str(work / "init"), str(out), request.param), nprocs=2, start_method="spawn")
    return getattr(torch, request.param), json.loads(out.read_text())


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_traffic_equals_the_observed_collectives(observed_collectives, sequence_parallel):
    """adapter_traffic's rows (pass, collective, elements, bytes) for TP=2 equal the collectives observed on a real
    gloo group: the region on g [s, b, r] ('after', the adapter) and on x [s, b, d] ('before'), one update's forward
    and backward; bytes_sent_per_rank is the ring's share of the observed bytes."""
    from collective_probe import BATCH, D, RANK, SEQ

    dtype, record = observed_collectives
    size = torch.tensor([], dtype=dtype).element_size()
    table = adapter_traffic(tokens=SEQ * BATCH, hidden_size=D, rank=RANK, tp=2, sequence_parallel=sequence_parallel,
                            bytes_per_element=size)
    for phase in ("before", "after"):
        seen = record[f"{phase} sp={sequence_parallel}"]
        assert [(c["pass"], c["collective"], c["elements"], c["bytes"]) for c in table[phase]] \
            == [tuple(call) for call in seen], phase
        ring = {"all-reduce": 2 * (2 - 1) / 2, "all-gather": (2 - 1) / 2, "reduce-scatter": (2 - 1) / 2}
        assert [c["bytes_sent_per_rank"] for c in table[phase]] == [ring[name] * nbytes for _, name, _, nbytes in seen]
    assert adapter_traffic(tokens=SEQ * BATCH, hidden_size=D, rank=RANK, tp=1, sequence_parallel=False,
                           bytes_per_element=size) == {"before": [], "after": []}

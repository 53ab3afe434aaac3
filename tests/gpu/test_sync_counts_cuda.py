"""The finite-gradient check on CUDA (run where a GPU is lent; skipped without CUDA): torch's own sync detector
(`torch.cuda.set_sync_debug_mode("warn")`, one warning per synchronizing call) counts one host sync for the check
over a tl6 adapter of 32 layers (66 gradients, fp32 and bf16), the fused kernel finds a NaN and an Inf, and leaves
every gradient bit for bit as it was. The CPU counts, with the same adapter: tests/unit/test_sync_counts.py."""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _syncs(work) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_check_syncs_once_on_cuda(dtype):
    from nemo_tiedlora.anomaly import check_finite_grads, non_finite_grads
    from tests.unit.test_sync_counts import TENSORS, tl6_chunk

    chunk = tl6_chunk(dtype).cuda()
    for param in chunk.parameters():
        param.grad = torch.randn_like(param)
    before = [param.grad.clone() for param in chunk.parameters()]
    torch.cuda.synchronize()
    assert len(before) == TENSORS
    assert _syncs(lambda: check_finite_grads([chunk], step=0)) == 1
    assert all(torch.equal(param.grad, old) for param, old in zip(chunk.parameters(), before))
    chunk.layers[16].vec_v.grad[3] = float("nan")
    chunk.shared.lora_b.grad[0, 0] = float("inf")
    assert non_finite_grads([chunk]) == ["shared.lora_b", "layers.16.vec_v"]

"""The per-step adapter checks on CUDA (run where a GPU is lent; skipped without CUDA). torch's own sync detector
(`torch.cuda.set_sync_debug_mode("warn")`, one warning per synchronizing call) counts one host sync for the check
over a tl6 adapter of 32 layers (66 gradients, fp32 and bf16), the fused kernel finds a NaN and an Inf, and leaves
every gradient bit for bit as it was. `reduction_stats.STATS.timed` brackets each gradient reduction with a device
synchronize (untimed: none). The CPU counts, with the same adapter: tests/unit/test_sync_counts.py."""

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
    from nemo_tiedlora.core.anomaly import check_finite_grads, non_finite_grads
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


@pytest.mark.parametrize("timed", [False, True])
def test_reduction_seconds_are_measured_after_a_device_synchronize(timed):
    """reduction_stats.STATS.timed brackets each adapter gradient reduction with torch.cuda.synchronize (two per
    reduction); untimed (training) it synchronizes nowhere, counts calls and bytes and leaves the seconds at 0. On a
    real gloo group of one rank in this process, CUDA tensors."""
    import torch.distributed as dist

    from nemo_tiedlora.nemo import grad_sync
    from nemo_tiedlora.nemo.reduction_stats import STATS
    from tests.host_syncs import DeviceTraffic

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group = dist.new_group([dist.get_rank()], backend="gloo")  # this rank alone
    grads = [torch.ones(8, device="cuda"), torch.ones(3, 4, device="cuda")]
    stats = STATS
    saved = (stats.calls, stats.bytes, stats.seconds, stats.timed)
    try:
        stats.calls, stats.bytes, stats.seconds, stats.timed = 0, 0, 0.0, timed
        with DeviceTraffic() as traffic:
            grad_sync._all_reduce(grads, group)
        assert traffic.host_reads.count("torch.cuda.synchronize") == (2 if timed else 0)
        assert (stats.calls, stats.bytes) == (1, 20 * 4)
        assert timed or stats.seconds == 0.0
    finally:
        stats.calls, stats.bytes, stats.seconds, stats.timed = saved
        if owned:
            dist.destroy_process_group()

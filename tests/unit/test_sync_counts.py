"""What the per-step adapter checks cost in host syncs and collectives, counted with tests/host_syncs.DeviceTraffic
(torch's function and dispatch modes; nothing of the code under test is patched) on a tl6 adapter of 32 layers at
rank 8: 66 tensors (the shared A, B and each layer's u, v).

Checked: the finite-gradient check reads the device once per step (one fused non-finite flag over all 66
gradients, read once), whatever the number of layers, and still names the bad tensors when the flag is set; the
replica check issues one all-reduce per replica kind (2) and one host read for all 66 tensors on a real gloo
process group (world size 1, in this process, with megatron-core's parallel state); the TP/PP gradient sums read
nothing on the host. The counter itself is checked first against per-tensor reads (66 of them), which is what the
per-tensor checks cost and what these counts must stay below. The same counts at world size 2 with the failure
paths across ranks: tests/distributed/test_replica_check.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nemo_tiedlora.core.anomaly import check_finite_grads, non_finite_anywhere, non_finite_grads
from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraGradientError
from nemo_tiedlora.core.modules import LayerFactors, SharedFactors
from tests.host_syncs import DeviceTraffic

LAYERS, D, OUT = 32, 16, 48
TENSORS = 2 + 2 * LAYERS  # A, B, and u_l, v_l per layer: 66


def tl6_chunk(dtype: torch.dtype = torch.float32) -> nn.Module:
    """One model chunk's adapter tensors (tl6, rank 8, 32 layers), each with a finite random gradient."""
    torch.manual_seed(0)
    cfg = TiedLoraConfig(preset="tl6", rank=8)
    chunk = nn.Module()
    chunk.shared = SharedFactors(cfg, in_features=D, out_features=OUT)
    chunk.layers = nn.ModuleList(LayerFactors(cfg, in_features=D, out_features=OUT, layer_number=n + 1,
                                              shared=chunk.shared) for n in range(LAYERS))
    chunk.to(dtype)
    for param in chunk.parameters():
        param.grad = torch.randn_like(param)
    return chunk


def test_counter_counts_one_host_read_per_tensor_for_per_tensor_checks():
    """The counter sees each per-tensor read (bool of a device value, torch.equal, tolist): 66 tensors, 66 reads."""
    grads = [param.grad for param in tl6_chunk().parameters()]
    assert len(grads) == TENSORS
    with DeviceTraffic() as traffic:
        [bool(torch.isfinite(grad).all()) for grad in grads]
    assert traffic.host_reads == ["__bool__"] * TENSORS
    with DeviceTraffic() as traffic:
        [torch.equal(grad, grad.clone()) for grad in grads]
        grads[0].tolist()
    assert traffic.host_reads == ["aten.equal"] * TENSORS + ["tolist"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_check_reads_the_device_once_per_step(dtype):
    """check_finite_grads, non_finite_grads and non_finite_anywhere (what the fp16 loss-scaling check calls) on 66
    finite gradients: one host read each, no collective (no
    process group), and the gradients are left bitwise as they were."""
    chunk = tl6_chunk(dtype)
    before = [param.grad.clone() for param in chunk.parameters()]
    with DeviceTraffic() as traffic:
        check_finite_grads([chunk], step=0)
    assert (traffic.host_reads, traffic.collectives) == (["item"], [])
    with DeviceTraffic() as traffic:
        assert non_finite_grads([chunk]) == []
    assert len(traffic.host_reads) == 1
    with DeviceTraffic() as traffic:  # the fp16 loss-scaling check's path
        assert non_finite_anywhere([chunk]) is None
    assert (traffic.host_reads, traffic.collectives) == (["item"], [])
    assert all(torch.equal(param.grad, old) for param, old in zip(chunk.parameters(), before))


def test_flag_set_names_every_bad_tensor():
    """NaN in layer 17's v and -Inf in the shared A (bf16 and fp32 gradients mixed): both named, in order; the
    error names them too. The per-tensor search runs only here, after the flag."""
    chunk = tl6_chunk()
    chunk.layers[0].to(torch.bfloat16)
    chunk.layers[0].vec_u.grad = torch.randn(8, dtype=torch.bfloat16)
    chunk.layers[16].vec_v.grad[3] = float("nan")
    chunk.shared.lora_a.grad[0, 1] = -float("inf")
    assert non_finite_grads([chunk]) == ["shared.lora_a", "layers.16.vec_v"]
    assert non_finite_grads([chunk, tl6_chunk()]) == ["chunk0.shared.lora_a", "chunk0.layers.16.vec_v"]
    with pytest.raises(TiedLoraGradientError, match=r"step 3 in \['shared.lora_a', 'layers.16.vec_v'\] on rank 0"):
        check_finite_grads([chunk], step=2)


@pytest.fixture
def gloo_world_of_one():
    """A real gloo process group of one rank in this process, with megatron-core's parallel state (TP=PP=1). An
    earlier in-process NeMo test of the same session may have left exactly that: it is used as it is, and kept."""
    from megatron.core import parallel_state

    made_group = not dist.is_initialized()
    if made_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    made_state = not parallel_state.model_parallel_is_initialized()
    if made_state:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    if made_state:
        parallel_state.destroy_model_parallel()
    if made_group:
        dist.destroy_process_group()


def test_one_step_costs_a_fixed_number_of_syncs_and_collectives(gloo_world_of_one):
    """A training step's adapter work on a real process group: the TP/PP sums (nothing to sum at TP=PP=1: no
    collective, no read), the replica check (2 all-reduces, 1 read, 66 tensors checked) and the finite check (1
    read; no flag all-reduce in a world of one)."""
    from nemo_tiedlora.nemo.replica_check import check_replicas
    from nemo_tiedlora.nemo.grad_sync import reduce_adapter_grads

    chunk = tl6_chunk()
    with DeviceTraffic() as sums:
        reduce_adapter_grads([chunk])
    with DeviceTraffic() as replicas:
        checked = check_replicas([chunk], step=0)
    with DeviceTraffic() as finite:
        check_finite_grads([chunk], step=0)
    assert checked == TENSORS
    assert (sums.host_reads, sums.collectives) == ([], [])
    assert replicas.collectives == ["allreduce_", "allreduce_"]  # model-wide A/B over the world, u/v over TP x DP
    assert replicas.host_reads == ["tolist"]
    assert (finite.host_reads, finite.collectives) == (["item"], [])

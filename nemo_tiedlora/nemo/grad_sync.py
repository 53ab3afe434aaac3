"""Replication of the adapter tensors over model parallelism (docs/design.md section 5).

Every adapter tensor is a full replica on the ranks that use it:
- A and B (tag ``model``): on every TP rank, every PP stage and every virtual-pipeline chunk.
- u_l, v_l and untied A_l, B_l (tag ``layer``): on every TP rank of the stage that owns layer l.

A and u are applied before the tensor-parallel region (``nemo/adapters.py``: what crosses TP ranks is
``g = u * (A x)`` [tokens, r]), B and v after it, on the rank's own output rows. Hence, per TP rank:
- B, v (and B_l): partial by rows (the other rows' gradients are zero here): summed over the TP group.
- A, u (and A_l), tagged ``tiedlora_before_tp_region``: without sequence parallelism the input is the same on
  every TP rank and the region's backward all-reduces dg, so their gradients are already complete and identical
  on every TP rank: *not* summed over TP (a sum would count them TP times). With sequence parallelism each rank
  saw only its own sequence shard: partial, summed over TP.
A and B are also used by every stage and every chunk, so their gradients are summed over the chunks of a rank and
over the PP group (like tied embeddings in megatron's ``finalize_model_grads``). This happens before the
data-parallel reduction (before the distributed optimizer's reduce-scatter; with plain all-reduce the order does not
matter). Afterwards every replica holds the same gradient, the optimizer makes the same update everywhere and the
replicas stay bitwise identical.

Gradient clipping counts a replicated tensor once: TP duplicates are skipped by megatron's
``param_is_not_tensor_parallel_duplicate`` (our tensors are not ``tensor_model_parallel``), and every A/B replica
but the one of chunk 0 on PP stage 0 is tagged ``shared`` (skipped by ``param_is_not_shared``).
"""

from __future__ import annotations

import time
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from nemo_tiedlora.nemo.reduction_stats import STATS
from nemo_tiedlora.core.modules import BEFORE_TP_REGION_TAG, REPLICA_TAG, REPLICATED_IN_LAYER, REPLICATED_MODEL_WIDE


def _tagged(chunk: nn.Module, kind: str) -> list[nn.Parameter]:
    return [p for p in chunk.parameters() if getattr(p, REPLICA_TAG, None) == kind and p.requires_grad]


def _grad(param: nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient buffer the optimizer will read: megatron DDP's ``main_grad`` if present, else ``grad``."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def _synchronize(tensor: torch.Tensor) -> None:
    """Wait for the work queued on ``tensor``'s device (nothing to wait for on the CPU)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _all_reduce(tensors: Sequence[torch.Tensor], group) -> None:
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(list(tensors))
    if STATS.timed:
        _synchronize(flat)
        started = time.perf_counter()
    dist.all_reduce(flat, group=group)
    if STATS.timed:
        _synchronize(flat)
        STATS.seconds += time.perf_counter() - started
    for tensor, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, list(tensors))):
        tensor.copy_(synced)
    STATS.calls += 1
    STATS.bytes += flat.numel() * flat.element_size()


def _grads_or_zeros(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    grads = []
    for param in params:
        grad = _grad(param)
        if grad is None:  # a replica whose stage produced no gradient this step still joins the sum
            param.grad = torch.zeros_like(param)
            grad = param.grad
        grads.append(grad)
    return grads


def _needs_tp_sum(param: nn.Parameter, sequence_parallel: bool) -> bool:
    return sequence_parallel or not getattr(param, BEFORE_TP_REGION_TAG, False)


def reduce_adapter_grads(chunks: Sequence[nn.Module], *, sequence_parallel: Optional[bool] = None) -> None:
    """Sum adapter gradients over TP (those that are partial there, see the module docstring), over the VPP chunks
    of this rank (A, B) and over PP (A, B). Not idempotent: call it exactly once between the last backward and the
    DP reduction. ``sequence_parallel`` defaults to the chunks' megatron ``config.sequence_parallel``."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        return
    if sequence_parallel is None:
        sequence_parallel = any(getattr(getattr(chunk, "config", None), "sequence_parallel", False) for chunk in chunks)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    shared = [_tagged(chunk, REPLICATED_MODEL_WIDE) for chunk in chunks]
    local = [p for chunk in chunks for p in _tagged(chunk, REPLICATED_IN_LAYER)]
    if tp_size > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        partial = [p for p in local + shared[0] if _needs_tp_sum(p, sequence_parallel)]
        _all_reduce(_grads_or_zeros(partial), group)
        for replicas in shared[1:]:
            _all_reduce(_grads_or_zeros([p for p in replicas if _needs_tp_sum(p, sequence_parallel)]), group)
    if not shared[0]:
        return
    # Virtual pipeline: sum the chunks' replicas into chunk 0, then over PP, then copy back to every chunk.
    total = _grads_or_zeros(shared[0])
    for replicas in shared[1:]:
        for acc, grad in zip(total, _grads_or_zeros(replicas)):
            acc.add_(grad)
    if pp_size > 1:
        _all_reduce(total, parallel_state.get_pipeline_model_parallel_group())
    for replicas in shared[1:]:
        for acc, grad in zip(total, _grads_or_zeros(replicas)):
            grad.copy_(acc)


def tag_for_clipping(chunks: Sequence[nn.Module]) -> None:
    """Mark every A/B replica but one (chunk 0 of PP stage 0) ``shared``: gradient-norm clipping counts it once."""
    from megatron.core import parallel_state

    first_stage = parallel_state.get_pipeline_model_parallel_rank() == 0
    for index, chunk in enumerate(chunks):
        for param in chunk.parameters():
            if getattr(param, REPLICA_TAG, None) == REPLICATED_MODEL_WIDE:
                param.shared = not (first_stage and index == 0)

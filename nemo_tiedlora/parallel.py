"""Replication of the adapter tensors over model parallelism (spec section 5).

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
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from nemo_tiedlora.modules import BEFORE_TP_REGION_TAG, REPLICA_TAG, REPLICATED_IN_LAYER, REPLICATED_MODEL_WIDE


def _tagged(chunk: nn.Module, kind: str) -> list[nn.Parameter]:
    return [p for p in chunk.parameters() if getattr(p, REPLICA_TAG, None) == kind and p.requires_grad]


def _grad(param: nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient buffer the optimizer will read: megatron DDP's ``main_grad`` if present, else ``grad``."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


@dataclass
class ReductionStats:
    """What the adapter's extra gradient reductions cost on this rank (for benchmarks; reset freely).

    ``calls`` and ``bytes`` are always counted. ``seconds`` only when ``timed`` is set: each reduction is then
    bracketed by a device synchronize (CUDA tensors), so it measures the collective itself rather than the time to
    queue it (or the backward still running ahead of it); that costs two host syncs per reduction, so it is off in
    training and on in benchmarks."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    timed: bool = False


STATS = ReductionStats()


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


class ReplicaDriftError(RuntimeError):
    """Replicas of an adapter tensor differ between ranks (the message names the tensor, the ranks and the step)."""


def _group_ranks(group) -> list[int]:
    """Global ranks of ``group`` (None: the world), in group-rank order."""
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


# Replicas are compared by bit pattern (bitwise identical is the invariant; -0.0 vs 0.0 counts as drift, the same NaN
# on every rank does not): each element's bits as a signed integer of its width, widened to int32 (NCCL reduces no
# int16) or int64 for 8-byte elements.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.int64 if tensor.element_size() == 8 else torch.int32


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``tensor`` [numel] as int32 (elements of up to 4 bytes) or int64."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(_BITS[flat.element_size()]).to(_bits_dtype(flat))


def _drift_message(name: str, chunk: int, param: torch.Tensor, group, step: Optional[int]) -> str:
    """Which ranks hold a copy of ``param`` that differs from the lowest rank's, and by how much (collective)."""
    ranks = _group_ranks(group)
    copies = [torch.empty_like(param) for _ in ranks]
    dist.all_gather(copies, param.detach().contiguous(), group=group)
    reference = copies[0]
    differing = {rank: float((copy.double() - reference.double()).abs().max()) for rank, copy in zip(ranks, copies)
                 if not torch.equal(_bits(copy), _bits(reference))}
    where = f" at step {step}" if step is not None else ""
    return (
        f"Tied-LoRA replica drift{where}: {name} (model chunk {chunk}) on rank(s) {sorted(differing)} differs from "
        f"rank {ranks[0]}'s copy (ranks compared: {ranks}; largest difference {max(differing.values()):.3e}). "
        "Every replica must stay bitwise identical; possible causes: its TP/PP gradient sum was skipped or ran twice "
        "(a second hook around NeMo's finalize_model_grads/allreduce_gradients), a non-deterministic kernel "
        "computed a different gradient on some ranks, or code changed the tensor outside the optimizer on some "
        "ranks (weights loaded or edited on one rank only). To find the first bad step, rerun with "
        "model.peft.tiedlora_tuning.check_replicas_every=1."
    )


def check_replicas(chunks: Sequence[nn.Module], *, step: Optional[int] = None) -> int:
    """Verify that every replica is bitwise identical on all ranks holding it; return the number of tensors checked.

    A/B are compared over the whole world (every rank holds them); per-layer tensors over the TP x DP group of
    their stage. Collective: every rank of the world must call it. Cost per check, whatever the number of layers:
    one all-reduce per replica kind (at most two) of one flat int32 buffer (int64 for 8-byte tensors, a second
    buffer if both widths occur): the bit patterns of all that kind's tensors next to their complement (MAX of
    both gives each element's highest and lowest pattern over the group), and one host sync. Only on a mismatch
    are the tensors looked at one by one: raises ReplicaDriftError (on every rank of the group) naming the first
    differing tensor, the ranks whose copy differs, the largest difference and ``step`` (when given).
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        return 0
    groups = {
        REPLICATED_MODEL_WIDE: None,  # world
        REPLICATED_IN_LAYER: parallel_state.get_tensor_and_data_parallel_group(),
    }
    entries: dict[str, list[tuple[str, int, nn.Parameter]]] = {kind: [] for kind in groups}
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            kind = getattr(param, REPLICA_TAG, None)
            if kind is not None:
                entries[kind].append((name, index, param))
    compared, equal = [], []
    for kind, group in groups.items():
        by_width: dict[torch.dtype, list[tuple[str, int, nn.Parameter]]] = {}
        for entry in entries[kind]:
            by_width.setdefault(_bits_dtype(entry[2]), []).append(entry)
        for bucket in by_width.values():  # one in practice: all adapter tensors share the model's dtype
            bits = torch.cat([_bits(param) for _, _, param in bucket])  # [n]
            both = torch.cat([bits, ~bits])  # ~ reverses the order: max(~x) == ~min(x)
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
            high, low = both[: bits.numel()], ~both[bits.numel():]
            compared.append((bucket, group, high, low))
            equal.append((high == low).all())  # on the device: no sync yet
    if not compared:
        return 0
    for (bucket, group, high, low), same in zip(compared, torch.stack(equal).tolist()):  # the one host sync
        if same:
            continue
        offset = 0
        for name, index, param in bucket:
            end = offset + param.numel()
            if not torch.equal(high[offset:end], low[offset:end]):
                raise ReplicaDriftError(_drift_message(name, index, param, group, step))
            offset = end
    return sum(len(found) for found in entries.values())

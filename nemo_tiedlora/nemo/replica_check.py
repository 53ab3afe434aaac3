"""The replica check: every replicated adapter tensor is bitwise identical on all ranks holding it (nemo glue layer:
the groups are megatron's).

The replication it checks is described in ``nemo.grad_sync``: A and B on every rank of the world, per-layer tensors on
the TP x DP group of their stage (tags from ``core.modules``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from nemo_tiedlora.core.modules import REPLICA_TAG, REPLICATED_IN_LAYER, REPLICATED_MODEL_WIDE


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

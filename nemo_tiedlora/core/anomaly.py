"""Gradient anomalies: a NaN/Inf in an adapter gradient stops the run before the optimizer step applies it.

`check_finite_grads` runs once per optimizer step after the adapter's TP/PP sums (nemo_tiedlora.nemo.grad_hooks), on the
adapter's own parameters only. Its cost is one host sync per step whatever the number of layers: one fused
non-finite reduction over all adapter gradients on their device (`torch._amp_foreach_non_finite_check_and_unscale_`,
the check torch's GradScaler runs, here with a scale of 1: the gradients are left as they are), one all-reduce of
the resulting flag over the world group, and one read of that flag on the host. Which tensors are bad is worked
out only when the flag is set. Every rank takes the same decision (the flag's all-reduce), so the whole job stops
with the same error instead of one rank leaving the others waiting in a collective. Nothing is written: the
checkpoint callback and the end-of-training adapter `.nemo` never see the poisoned factors (and
`formats.adapter_archive.save_archive` refuses non-finite tensors anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from nemo_tiedlora.core.errors import TiedLoraGradientError
from nemo_tiedlora.core.modules import REPLICA_TAG


def _grad(param: nn.Parameter) -> Optional[torch.Tensor]:
    grad = getattr(param, "main_grad", None)  # megatron DDP's buffer, the one the optimizer reads
    return grad if grad is not None else param.grad


def _adapter_grads(chunks: Sequence[nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """(name, gradient) of this rank's trainable adapter parameters that have a gradient."""
    named = []
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if getattr(param, REPLICA_TAG, None) is None or not param.requires_grad:
                continue
            grad = _grad(param)
            if grad is not None:
                named.append((name if len(chunks) == 1 else f"chunk{index}.{name}", grad))
    return named


def _non_finite_flag(grads: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """[1] float32 on `device`: 1.0 if any of `grads` holds a NaN or Inf, else 0.0. No host sync (device work only).

    One fused kernel per device (and, on CUDA, per dtype) over all gradients; the inverse scale of 1.0 leaves
    every value as it is (x * 1 == x bit for bit for every float but NaN, which stays NaN; checked on CPU by
    tests/unit/test_sync_counts.py and on CUDA by tests/gpu/test_sync_counts_cuda.py)."""
    flag = torch.zeros(1, dtype=torch.float32, device=device)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    for where, tensors in by_device.items():
        found = torch.zeros(1, dtype=torch.float32, device=where)
        with torch.no_grad():
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=where))
        flag = torch.maximum(flag, found.to(device))  # CUDA grads with a gloo group: the step's one sync
    return flag


def _names_of_non_finite(named: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """Per-tensor test (a host sync per tensor): only run once the fused flag said something is wrong."""
    return [name for name, grad in named if not bool(torch.isfinite(grad).all())]


def non_finite_grads(chunks: Sequence[nn.Module]) -> list[str]:
    """Names of this rank's adapter parameters whose gradient holds a NaN or Inf (one host sync when none does)."""
    named = _adapter_grads(chunks)
    if not named:
        return []
    if not _non_finite_flag([grad for _, grad in named], named[0][1].device).item():
        return []
    return _names_of_non_finite(named)


def non_finite_anywhere(chunks: Sequence[nn.Module]) -> Optional[list[str]]:
    """``None`` when every rank's adapter gradients are finite; else this rank's non-finite ones by name (empty when
    only another rank has one). One flag all-reduce and one host sync on a clean step.

    Collective when a process group of more than one rank exists: every rank of the world must call it."""
    named = _adapter_grads(chunks)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        device = _device()
    elif named:
        device = named[0][1].device
    else:
        return None
    flag = _non_finite_flag([grad for _, grad in named], device)
    if distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():  # the one host sync of a clean step
        return None
    return _names_of_non_finite(named)


def where_non_finite(bad: Sequence[str]) -> str:
    """Where a non-finite gradient was seen, for an error message: this rank's parameters, or another rank."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return f"in {list(bad[:4])}{' ...' if len(bad) > 4 else ''} on rank {rank}" if bad else "on another rank"


def check_finite_grads(chunks: Sequence[nn.Module], *, step: int) -> None:
    """Raise TiedLoraGradientError on every rank if any rank's adapter gradient is non-finite.

    Collective when a process group of more than one rank exists: every rank of the world must call it."""
    bad = non_finite_anywhere(chunks)
    if bad is None:
        return
    raise TiedLoraGradientError(
        f"non-finite (NaN/Inf) adapter gradient at optimizer step {step + 1} {where_non_finite(bad)}: the step is not "
        "applied and the run stops (no adapter .nemo is written from it). Lower model.optim.lr, set "
        "trainer.gradient_clip_val (e.g. 1.0), check the data; then resume from the last checkpoint with "
        "exp_manager.resume_if_exists=True"
    )


def _device() -> torch.device:
    """Where the flag lives: NCCL needs a CUDA tensor, gloo a CPU one."""
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

"""Gradient anomalies: a NaN/Inf in an adapter gradient stops the run before the optimizer step applies it.

`check_finite_grads` runs once per optimizer step after the adapter's TP/PP sums (nemo_tiedlora.nemo.grad_hooks), on the
adapter's own parameters only (a few tensors: no measurable cost). Every rank takes the same decision (one
all-reduce of a flag over the world group), so the whole job stops with the same error instead of one rank
leaving the others waiting in a collective. Nothing is written: the checkpoint callback and the end-of-training
adapter `.nemo` never see the poisoned factors (and `checkpoint.save_archive` refuses non-finite tensors anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from nemo_tiedlora.errors import TiedLoraGradientError
from nemo_tiedlora.modules import REPLICA_TAG


def _grad(param: nn.Parameter) -> Optional[torch.Tensor]:
    grad = getattr(param, "main_grad", None)  # megatron DDP's buffer, the one the optimizer reads
    return grad if grad is not None else param.grad


def non_finite_grads(chunks: Sequence[nn.Module]) -> list[str]:
    """Names of this rank's adapter parameters whose gradient holds a NaN or Inf."""
    bad = []
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if getattr(param, REPLICA_TAG, None) is None or not param.requires_grad:
                continue
            grad = _grad(param)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                bad.append(name if len(chunks) == 1 else f"chunk{index}.{name}")
    return bad


def check_finite_grads(chunks: Sequence[nn.Module], *, step: int) -> None:
    """Raise TiedLoraGradientError on every rank if any rank's adapter gradient is non-finite."""
    bad = non_finite_grads(chunks)
    anywhere = bool(bad)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anywhere = bool(flag.item())
    if anywhere:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        where = f"in {bad[:4]}{' ...' if len(bad) > 4 else ''} on rank {rank}" if bad else "on another rank"
        raise TiedLoraGradientError(
            f"non-finite (NaN/Inf) adapter gradient at optimizer step {step + 1} {where}: the step is not applied and "
            "the run stops (no adapter .nemo is written from it). Lower model.optim.lr, set "
            "trainer.gradient_clip_val (e.g. 1.0), check the data; then resume from the last checkpoint with "
            "exp_manager.resume_if_exists=True"
        )


def _device() -> torch.device:
    """Where the flag lives: NCCL needs a CUDA tensor, gloo a CPU one."""
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

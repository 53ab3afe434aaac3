"""fp16 loss scaling and the adapter's NaN guard (nemo glue layer).

In fp16 (``trainer.precision=16``) NeMo multiplies the loss by a scale (nlp_overrides.py ``GradScaler``, a
``torch.cuda.amp.GradScaler`` with hysteresis) before backward. The gradients our hook sees (before the DP
reduction, ``nemo_tiedlora.nemo.grad_hooks``) are the scaled ones, so a NaN/Inf there is usually the scaler's normal
overflow: after the closure the scaler unscales, finds it, skips ``optimizer.step`` and lowers the scale. The rule:

- fp16 with an enabled scaler: an overflow is left to the scaler (the step is skipped, the scale lowered, the run goes
  on); the run stops with one line (``TiedLoraGradientError``) only for what the scaler cannot fix:
  ``fp16_max_skipped_steps`` optimizer steps skipped in a row, or an overflow while the loss scale is already at or
  below ``fp16_min_loss_scale`` (keys of ``model.peft.tiedlora_tuning``,
  ``nemo_tiedlora.core.config.LossScalingGuard``);
- bf16, fp32, or fp16 without a scaler (NeMo's PEFT trainer builder disables it at PP > 1): a non-finite gradient
  stops the run at once (``nemo_tiedlora.core.anomaly.check_finite_grads``).

Every rank takes the same decision (one flag all-reduce over the world group), so all ranks skip or stop together.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch.distributed as dist
from torch import nn

from nemo_tiedlora.core.config import LossScalingGuard
from nemo_tiedlora.core.errors import TiedLoraGradientError

logger = logging.getLogger("nemo_tiedlora")

_FIX = ("Lower model.optim.lr, set trainer.gradient_clip_val (e.g. 1.0), check the data, or train in bf16 "
        "(trainer.precision=bf16-mixed); then resume from the last checkpoint with exp_manager.resume_if_exists=True")


def active_scaler(model: Any) -> Optional[Any]:
    """The enabled loss scaler of `model`'s trainer (fp16 only), or None (bf16, fp32, scaler disabled)."""
    plugin = getattr(getattr(model, "_trainer", None), "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not callable(getattr(scaler, "is_enabled", None)) or not scaler.is_enabled():
        return None
    return scaler


def guard_of(model: Any) -> LossScalingGuard:
    """The model's `LossScalingGuard` from ``cfg.peft.tiedlora_tuning`` (read once, kept on the model)."""
    guard = getattr(model, "_tiedlora_loss_guard", None)
    if guard is None:
        cfg = getattr(model, "cfg", None)
        peft = cfg.get("peft", None) if cfg is not None else None
        tuning = peft.get("tiedlora_tuning", None) if peft is not None else None
        guard = LossScalingGuard.from_nemo(tuning or {})
        model._tiedlora_loss_guard = guard
    return guard


def check_scaled_grads(model: Any, chunks: Sequence[nn.Module], scaler: Any, *, step: int) -> bool:
    """fp16: count an overflow of the scaled adapter gradients (the scaler will skip this step); raise
    TiedLoraGradientError on every rank when the scaler cannot fix it. Returns whether this step overflowed."""
    from nemo_tiedlora.core.anomaly import non_finite_anywhere, where_non_finite

    bad = non_finite_anywhere(chunks)  # collective: one flag all-reduce
    if bad is None:
        model._tiedlora_skipped_in_a_row = 0
        return False
    skipped = getattr(model, "_tiedlora_skipped_in_a_row", 0) + 1
    model._tiedlora_skipped_in_a_row = skipped
    guard, scale = guard_of(model), float(scaler.get_scale())
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    where = where_non_finite(bad)
    if scale <= guard.min_loss_scale:
        raise TiedLoraGradientError(
            f"fp16 overflow (NaN/Inf adapter gradient) at optimizer step {step + 1} {where} with the loss scale at "
            f"{scale:g} <= fp16_min_loss_scale={guard.min_loss_scale:g}: the gradients are non-finite without "
            f"amplification, which the loss scaler cannot fix; the step is not applied and the run stops. {_FIX}")
    if skipped >= guard.max_skipped_steps:
        raise TiedLoraGradientError(
            f"fp16 overflow (NaN/Inf adapter gradient) in {skipped} optimizer steps in a row "
            f"(fp16_max_skipped_steps={guard.max_skipped_steps}), the last at step {step + 1} {where} with the loss "
            f"scale at {scale:g}: the loss scaler does not recover; the step is not applied and the run stops. {_FIX}")
    if rank == 0:
        logger.info("Tied-LoRA: fp16 overflow at optimizer step %d (loss scale %g, %d skipped in a row): the grad "
                    "scaler skips the step and lowers the scale (NeMo's after model.hysteresis overflows in a row)",
                    step + 1, scale, skipped)
    return True

"""Which of NeMo's optimizer paths a Tied-LoRA run can take (nemo glue layer), decided on the user's config before
anything is launched or built (`check_optimizer_path`, called by ``finetune._prepare`` before its CPU rewrites, so
the answer is the one a GPU run gets).

Tied-LoRA's gradient sums over TP/PP, replica check and NaN guard run where NeMo's ``training_step``
(megatron_gpt_model.py) reduces the gradients over DP: ``allreduce_gradients`` (plain optimizers without
``megatron_amp_O2``) or megatron's ``finalize_model_grads`` (``mcore_distributed_optim``), both hooked by
``nemo_tiedlora.nemo.grad_hooks``. Passing through (tested against TP=PP=1): ``adam``/``fused_adam`` and the like
without O2 (``async_grad_allreduce`` true or false: NeMo reads it only on the O2 path), and
``mcore_distributed_optim`` with or without O2 and without overlap. Refused, each with one
``TiedLoraConfigError`` naming cause and fix:

- ``megatron_amp_O2=True`` with a plain optimizer: apex's ``MainParamsOptimizerWrapper`` reduces the main
  gradients from backward hooks (``async_grad_allreduce=True``) or in ``allreduce_main_grads`` (False, or PP/SP);
  ``training_step`` calls neither hooked function, so the guards would be off at any DP size;
- ``distributed_fused_adam`` (apex): its own bucketed reduce-scatter from backward hooks, same consequence;
- ``mcore_distributed_optim`` with ``overlap_grad_sync`` (or ``overlap_param_sync``, which NeMo only allows with
  it): each bucket's reduce-scatter starts in backward, before ``finalize_model_grads``, where the adapter's TP/PP
  sums must precede it;
- fp16 (``trainer.precision=16``) with O2 or with the distributed optimizer: NeMo's loss scaler cannot unscale
  gradients it does not see (with the distributed optimizer NeMo fails at the first step, "No inf checks were
  recorded for this optimizer": seen on CPU with torch's scaler, whose ``step`` NeMo's GradScaler inherits);
  ``nemo_tiedlora.nemo.loss_scaling`` handles the plain-optimizer fp16 path.
"""

from __future__ import annotations

from typing import Any

from nemo_tiedlora.core.errors import TiedLoraConfigError

MCORE_DISTRIBUTED = "mcore_distributed_optim"
APEX_DISTRIBUTED = "distributed_fused_adam"
FP16 = ("16", "16-mixed")


def check_optimizer_path(cfg: Any, *, training: bool) -> None:
    """Refuse (TiedLoraConfigError) a training config whose optimizer path bypasses the adapter's sums and guards."""
    model = cfg.get("model", {})
    if not training or model.get("peft", {}).get("peft_scheme") != "tiedlora":
        return
    optim = model.get("optim", None) or {}
    name = str(optim.get("name", "fused_adam"))
    o2 = bool(model.get("megatron_amp_O2", False))
    fp16 = str(cfg.get("trainer", {}).get("precision", 32)) in FP16
    if name == APEX_DISTRIBUTED:
        raise TiedLoraConfigError(
            f"model.optim.name={APEX_DISTRIBUTED} (apex's DistributedFusedAdam) reduce-scatters the gradients from its "
            "own backward hooks and NeMo's training_step then calls neither allreduce_gradients nor "
            "finalize_model_grads, so tiedlora's TP/PP gradient sums, NaN guard and replica check would never run: "
            f"use model.optim.name={MCORE_DISTRIBUTED} (or adam / fused_adam with megatron_amp_O2=False)")
    if fp16 and o2:
        raise TiedLoraConfigError(
            "trainer.precision=16 with model.megatron_amp_O2=True: NeMo 2.4.1 does not train fp16 with O2 (a plain "
            "optimizer stops in configure_optimizers: 'fp16 training is not yet supported with O2'; with the "
            "distributed optimizer its loss scaler finds no gradients to unscale or check, as without O2): set "
            "model.megatron_amp_O2=False (fp16 autocast with NeMo's loss scaler) or "
            "trainer.precision=bf16-mixed")
    if fp16 and name == MCORE_DISTRIBUTED:
        raise TiedLoraConfigError(
            f"trainer.precision=16 with model.optim.name={MCORE_DISTRIBUTED}: NeMo's fp16 loss scaler looks for the "
            "gradients in the optimizer's param.grad, but megatron's distributed optimizer keeps them in its own "
            "buffers, so the scaler has nothing to unscale or check (NeMo fails at the first step: 'No inf checks were "
            "recorded for this optimizer'): use model.optim.name=fused_adam (or adam) for fp16, or "
            "trainer.precision=bf16-mixed")
    if o2 and name != MCORE_DISTRIBUTED:
        when = ("from backward hooks (async_grad_allreduce=True)" if model.get("async_grad_allreduce", True)
                else "in allreduce_main_grads (async_grad_allreduce=False)")
        raise TiedLoraConfigError(
            f"model.megatron_amp_O2=True with model.optim.name={name}: NeMo keeps the gradients in apex's "
            f"MainParamsOptimizerWrapper and reduces them {when}, and its training_step calls neither "
            "allreduce_gradients nor finalize_model_grads, so tiedlora's NaN guard and replica check would be off: "
            f"use model.optim.name={MCORE_DISTRIBUTED} (fp32 main parameters as well) or model.megatron_amp_O2=False")
    overlap = [key for key in ("overlap_grad_sync", "overlap_param_sync") if optim.get(key, False)]
    if name == MCORE_DISTRIBUTED and overlap:
        raise TiedLoraConfigError(
            f"model.optim.{'/'.join(overlap)}=True with {MCORE_DISTRIBUTED}: megatron starts each gradient bucket's "
            "reduce-scatter from backward hooks (overlap_param_sync needs overlap_grad_sync in NeMo), before "
            "finalize_model_grads, where tiedlora sums its replicated factors' gradients over TP/PP and checks them: "
            "the sums and the NaN guard would work on buffers already in flight; set model.optim.overlap_grad_sync="
            "False and model.optim.overlap_param_sync=False")

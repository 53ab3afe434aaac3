"""The adapter's gradient sums in NeMo's training step (nemo glue layer).

Once per optimizer step, after the pipeline's backward and before the data-parallel reduction, the replicated
factors' gradients are summed over TP/PP (`nemo_tiedlora.nemo.grad_sync`), optionally the replicas are compared, and a
NaN/Inf gradient stops the run (`nemo_tiedlora.core.anomaly`; in fp16 with a loss scaler an overflow is the scaler's to
skip first: `nemo_tiedlora.nemo.loss_scaling`). NeMo reaches that point in one of two functions (the optimizer
paths that reach neither are refused before launch: `nemo_tiedlora.nemo.optimizer_paths`):

- plain optimizers: ``MegatronBaseModel.allreduce_gradients`` (the DP all-reduce NeMo's training_step calls);
- megatron's distributed optimizer: ``finalize_model_grads`` (its DP reduce-scatter), which the GPT and SFT model
  modules each import by name; it only sees the model chunks, so `track` maps a model's first chunk back to the
  NeMo model (weakly: a model that is dropped is garbage collected).

The wrappers are installed through `nemo_tiedlora.nemo.compat` (entries `tiedlora-allreduce-gradients` and
`tiedlora-finalize-model-grads`); models without Tied-LoRA adapters pass through them unchanged.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from typing import Any, Callable, Optional

from nemo_tiedlora.nemo.compat.patch import replace
from nemo_tiedlora.nemo.find_adapters import model_chunks, unwrap

logger = logging.getLogger("nemo_tiedlora")

GPT_MODULES = ("nemo.collections.nlp.models.language_modeling.megatron_gpt_model",
               "nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model")

# first GPTModel chunk -> weakref to the NeMo model that owns it (neither is kept alive by this map)
_OWNERS: "weakref.WeakKeyDictionary[Any, weakref.ref]" = weakref.WeakKeyDictionary()


def track(model: Any) -> None:
    """Start the per-step work for `model` (called when its Tied-LoRA adapters are added)."""
    model._tiedlora_steps = 0
    _OWNERS[model_chunks(model)[0]] = weakref.ref(model)


def owner_of(chunk: Any) -> Optional[Any]:
    """The live NeMo model whose first chunk is `chunk` (DDP-wrapped or not), if it carries Tied-LoRA adapters."""
    try:
        ref = _OWNERS.get(unwrap(chunk))
    except TypeError:  # not weak-referenceable: not one of ours
        return None
    return ref() if ref is not None else None


def tracked_models() -> list[Any]:
    """The live models with Tied-LoRA adapters (for tests and diagnostics)."""
    return [model for model in (ref() for ref in list(_OWNERS.values())) if model is not None]


def before_data_parallel_reduction(model: Any) -> None:
    """Once per optimizer step, before the DP reduction: (optionally) check replicas, then sum adapter grads."""
    if not hasattr(model, "_tiedlora_steps"):
        return  # no tiedlora adapters in this model
    from nemo_tiedlora.core.anomaly import check_finite_grads
    from nemo_tiedlora.nemo.loss_scaling import active_scaler, check_scaled_grads
    from nemo_tiedlora.nemo.replica_check import check_replicas
    from nemo_tiedlora.nemo.grad_sync import reduce_adapter_grads

    chunks = model_chunks(model)
    every = getattr(model, "_tiedlora_check_every", 0)
    if every and model._tiedlora_steps % every == 0:
        step = model._tiedlora_steps  # optimizer steps done: the check sees the state the previous step left
        checked = check_replicas(chunks, step=step)
        _log_replica_check(checked, step)
    model._tiedlora_steps += 1
    reduce_adapter_grads(chunks)
    trainer = getattr(model, "_trainer", None)  # steps done, resumed runs included (our counter restarts at 0)
    done = trainer.global_step if trainer is not None else model._tiedlora_steps - 1
    scaler = active_scaler(model)
    if scaler is not None:  # fp16: the gradients are scaled; an overflow is the scaler's to skip (loss_scaling)
        check_scaled_grads(model, chunks, scaler, step=done)
    else:
        check_finite_grads(chunks, step=done)


_REPLICA_LOG_SECONDS = 60.0  # after the first check, at most one INFO line a minute (every check at DEBUG)
_last_replica_log: list[float] = []


def _log_replica_check(checked: int, step: int) -> None:
    """Rank 0: say that the replicas were checked (INFO for the first check, then at most once a minute)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    if not dist.is_initialized():  # one process holds the only copy of every tensor: nothing to compare
        logger.debug("Tied-LoRA: replica check at step %d skipped: no process group", step)
        return
    now = time.monotonic()
    world = dist.get_world_size()
    level = logging.DEBUG
    if not _last_replica_log or now - _last_replica_log[-1] >= _REPLICA_LOG_SECONDS:
        _last_replica_log[:] = [now]
        level = logging.INFO
    logger.log(level, "Tied-LoRA: checked %d replicas at step %d: bitwise identical on all %d rank(s)", checked, step,
               world)


def wrap_allreduce_gradients(original: Callable) -> Callable:
    """MegatronBaseModel.allreduce_gradients with the adapter's sums in front."""
    def allreduce_gradients(self):
        before_data_parallel_reduction(self)
        return original(self)

    return allreduce_gradients


def wrap_finalize_model_grads(original: Callable) -> Callable:
    """megatron's finalize_model_grads with the adapter's sums in front (they must precede the DP reduce-scatter)."""
    def finalize_model_grads(model, *args, **kwargs):
        owner = owner_of(model[0] if isinstance(model, list) else model)
        if owner is not None:
            before_data_parallel_reduction(owner)
        return original(model, *args, **kwargs)

    return finalize_model_grads


def install_allreduce_gradients() -> None:
    """Plain optimizers: NeMo's training_step calls allreduce_gradients (DP all-reduce) after the pipeline."""
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    replace(MegatronBaseModel, "allreduce_gradients", wrap_allreduce_gradients)


def install_finalize_model_grads() -> None:
    """Distributed optimizer: fwd_bwd_step installs megatron's finalize_model_grads (DP reduce-scatter) as the
    schedule's last step. The GPT model and the SFT model (which overrides fwd_bwd_step) each import their own
    reference to it: wrap both. Idempotent; called again when adapters are added, because the table's install can
    run while the SFT module is still being imported (its name does not exist yet)."""
    import importlib

    importlib.import_module(GPT_MODULES[0])
    for name in GPT_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "finalize_model_grads", None) is not None:
            replace(module, "finalize_model_grads", wrap_finalize_model_grads)


def finalize_model_grads_exists() -> bool:
    """The hooked reference exists (megatron_gpt_model imports finalize_model_grads by name)."""
    import importlib

    return callable(getattr(importlib.import_module(GPT_MODULES[0]), "finalize_model_grads", None))

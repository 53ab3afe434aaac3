"""Injection (nemo glue layer): Tied-LoRA's wrappers put into a NeMo GPT model in front of NeMo's `add_adapter`.

For a Tied-LoRA config, `add_adapter` wraps `linear_qkv` of every selected layer in a `TiedLoraQKV` and attaches a
`TiedLoraShared` owner to each model chunk, *before* NeMo records the base keys. NeMo's own loop then adds the
adapters to those wrappers (they are `AdapterModuleMixin`s), and NeMo's freezing, optimizer groups, PEFT state
dict, saving, loading and generation run unchanged. Installed through `nemo_tiedlora.nemo.compat` (entry
`tiedlora-add-adapter`); other PEFT schemes pass through unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin

from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.nemo import grad_hooks
from nemo_tiedlora.nemo.adapters import TiedLoraQKV, TiedLoraShared, tensor_parallel_rows
from nemo_tiedlora.nemo.compat.patch import replace
from nemo_tiedlora.nemo.peft import TiedLoraPEFTConfig
from nemo_tiedlora.nemo.summary import log_parameter_summary
from nemo_tiedlora.nemo.find_adapters import SHARED_ATTR, iter_layer_adapters, model_chunks

def attach(model: Any, peft_cfg: TiedLoraPEFTConfig) -> int:
    """Wrap `linear_qkv` of the selected layers and attach the shared owner; return the number of wrappers."""
    selection = set(peft_cfg.tiedlora.layer_selection or range(1, peft_cfg.shape["num_layers"] + 1))
    tied = peft_cfg.tiedlora.flags.tied
    wrapped = 0
    for chunk in model_chunks(model):
        owner = None
        if tied:
            owner = getattr(chunk, SHARED_ATTR, None)
            if owner is None:
                owner = TiedLoraShared()
                setattr(chunk, SHARED_ATTR, owner)
        for layer in chunk.decoder.layers:
            attention = layer.self_attention
            if layer.layer_number not in selection or isinstance(attention.linear_qkv, TiedLoraQKV):
                continue
            attention.linear_qkv = TiedLoraQKV(
                attention.linear_qkv,
                layer_number=layer.layer_number,
                shared_owner=owner,
                out_rows=tensor_parallel_rows(peft_cfg.shape["out_features"], peft_cfg.tensor_parallel_size),
                tensor_parallel_size=peft_cfg.tensor_parallel_size,
                sequence_parallel=peft_cfg.sequence_parallel,
            )
            wrapped += 1
    return wrapped


@contextlib.contextmanager
def _dropout_rng():
    """Megatron's data-parallel RNG tracker state: seeded alike on the ranks of a TP group and in a TP1 run, restored
    by activation recompute, and (unlike torch's default generator) not swapped for a per-TP-rank state inside a
    sequence-parallel transformer block. On CPU (no CUDA generator: the tracker holds CPU generator states) the
    same swap without megatron's fork, whose "CPU RNG state changed" warning would fire on every draw there."""
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, get_data_parallel_rng_tracker_name

    tracker, name = get_cuda_rng_tracker(), get_data_parallel_rng_tracker_name()
    if torch.cuda.is_available():
        with tracker.fork(name):
            yield
        return
    states, outside = tracker.get_states(), torch.get_rng_state()
    torch.set_rng_state(states[name])
    try:
        yield
    finally:
        states[name] = torch.get_rng_state()
        tracker.set_states(states)
        torch.set_rng_state(outside)


def configure_dropout(model: Any, peft_cfg: TiedLoraPEFTConfig) -> None:
    """Adapter dropout at any TP/SP draws the keep-masks of the TP1 run (`LayerFactors.set_dropout_source`)."""
    if not peft_cfg.tiedlora.dropout:
        return
    shard = None
    if peft_cfg.sequence_parallel:
        from megatron.core import parallel_state

        shard = (parallel_state.get_tensor_model_parallel_rank(), peft_cfg.tensor_parallel_size)
    for _, adapter in iter_layer_adapters(model):
        adapter.set_dropout_source(sequence_shard=shard, rng=_dropout_rng)


def tiedlora_configs(peft_cfgs: Any) -> list[TiedLoraPEFTConfig]:
    """The Tied-LoRA configs among what `add_adapter` was given (one config or a list)."""
    cfgs = peft_cfgs if isinstance(peft_cfgs, (list, tuple)) else [peft_cfgs]
    return [cfg for cfg in cfgs if isinstance(cfg, TiedLoraPEFTConfig)]


def wrap_add_adapter(original: Callable) -> Callable:
    """NLPAdapterModelMixin.add_adapter with Tied-LoRA's wrappers put in place first."""
    def add_adapter(self: NLPAdapterModelMixin, peft_cfgs: Any) -> None:
        tied_cfgs = tiedlora_configs(peft_cfgs)
        if len(tied_cfgs) > 1:
            raise TiedLoraConfigError("more than one tiedlora config given: combine them into one tiedlora_tuning")
        if tied_cfgs and getattr(self, "mcore_gpt", False) is not True:
            raise TiedLoraConfigError("tiedlora needs a megatron-core GPT model: set model.mcore_gpt=True")
        if tied_cfgs:
            attach(self, tied_cfgs[0])
        original(self, peft_cfgs)
        if tied_cfgs:
            from nemo_tiedlora.nemo.grad_sync import tag_for_clipping

            tag_for_clipping(model_chunks(self))
            configure_dropout(self, tied_cfgs[0])
            self._tiedlora_peft_cfg = tied_cfgs[0]
            self._tiedlora_check_every = tied_cfgs[0].check_replicas_every
            grad_hooks.track(self)
            grad_hooks.install_finalize_model_grads()  # the SFT module may have been imported since setup()
            log_parameter_summary(self, tied_cfgs[0])

    return add_adapter


def install_add_adapter() -> None:
    """Put `wrap_add_adapter` in front of NLPAdapterModelMixin.add_adapter (idempotent)."""
    replace(NLPAdapterModelMixin, "add_adapter", wrap_add_adapter)

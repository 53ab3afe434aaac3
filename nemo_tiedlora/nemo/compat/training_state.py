"""Fixes of NeMo 2.4.1's training-state bookkeeping (nemo glue layer; declared in `table.PATCHES`), GPU and CPU:
resumed epochs (against Lightning 2.x), PEFT checkpoints of list-held models and of the distributed optimizer.
"""

from __future__ import annotations

import torch

from nemo_tiedlora.nemo.compat.patch import original, replace, source, upstream_own


# ----------------------------------------------------------------------------------------------------------------
# lightning: NeMo's batch samplers vs Lightning's restored loop state
# ----------------------------------------------------------------------------------------------------------------
def epoch_length_from_epoch_start() -> None:
    import copy

    from nemo.collections.nlp.data.language_modeling.megatron import megatron_batch_samplers as samplers

    def make(upstream):
        def __len__(self):
            # Lightning counts an epoch's batches from the epoch's start and restores that count on resume; the
            # sampler still yields only the batches not yet consumed, so the two meet at the epoch's end.
            probe = copy.copy(self)
            probe.consumed_samples = 0
            return upstream(probe)

        return __len__

    for cls in (samplers.MegatronPretrainingBatchSampler, samplers.MegatronPretrainingRandomBatchSampler):
        replace(cls, "__len__", make)


def sampler_length_counts_from_resume_point() -> bool:
    """NeMo's batch sampler, resumed half-way through an epoch, reports fewer batches than a whole epoch's."""
    from nemo.collections.nlp.data.language_modeling.megatron import megatron_batch_samplers as samplers

    cls = samplers.MegatronPretrainingBatchSampler
    length = original(cls.__len__)

    def sampler(consumed: int):
        return cls(total_samples=16, consumed_samples=consumed, micro_batch_size=2, global_batch_size=4,
                   data_parallel_rank=0, data_parallel_size=1, drop_last=True)

    return length(sampler(8)) != length(sampler(0))


# ----------------------------------------------------------------------------------------------------------------
# nemo: the PEFT checkpoint of a model held as a list of chunks without a virtual pipeline
# ----------------------------------------------------------------------------------------------------------------
def peft_checkpoint_chunk_keys() -> None:
    from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin

    def make(upstream):
        def on_load_checkpoint(self, checkpoint) -> None:
            # get_peft_state_dict saves a list-held model (the distributed optimizer keeps [McoreDDP(chunk)] even
            # without a virtual pipeline) as {"model_0": {...}}; on_load_checkpoint unwraps "model_<i>" only under
            # a virtual pipeline. Unwrap the single chunk here; NeMo's hook then loads it (and empties it).
            state = checkpoint.get("state_dict")
            model = getattr(self, "model", None)
            if (isinstance(model, list) and len(model) == 1
                    and self.cfg.get("virtual_pipeline_model_parallel_size") is None
                    and isinstance(state, dict) and set(state) == {"model_0"}):
                checkpoint["state_dict"] = state["model_0"]
            return upstream(self, checkpoint)

        return on_load_checkpoint

    replace(NLPAdapterModelMixin, "on_load_checkpoint", make)


def peft_chunk_keys_disagree() -> bool:
    """get_peft_state_dict saves a list-held model under 'model_<i>' whenever it is a list, while
    on_load_checkpoint unwraps 'model_<i>' only with a virtual pipeline (nlp_adapter_mixins.py)."""
    from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin

    save, load = source(NLPAdapterModelMixin.get_peft_state_dict), source(NLPAdapterModelMixin.on_load_checkpoint)
    saves_chunks = 'f"model_{i}"' in save and "isinstance(self.model, list)" in save
    loads_only_with_vpp = "virtual_pipeline_model_parallel_size" in load and "f'model_{index}'" in load
    return saves_chunks and loads_only_with_vpp


PARAM_STATE_KEY = "nemo_tiedlora:distributed_optimizer_param_state"


def _dist_optimizers(optimizer) -> list:
    """The megatron DistributedOptimizers behind NeMo's McoreDistributedOptimizer (chained or not)."""
    inner = getattr(optimizer, "mcore_optimizer", None)
    if inner is None:
        return []
    chained = getattr(inner, "chained_optimizers", None) or [inner]
    return [opt for opt in chained if hasattr(opt, "get_parameter_state_dp_zero")]


def peft_distributed_optimizer_state() -> None:
    from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin
    from nemo.core.optim.mcore_optim import McoreDistributedOptimizer

    def make_save(upstream):
        def on_save_checkpoint(self, checkpoint) -> None:
            upstream(self, checkpoint)
            if not (getattr(self, "use_peft", False) and getattr(self, "setup_complete", False)):
                return
            trainer = getattr(self, "_trainer", None)
            optimizers = trainer.optimizers if trainer is not None else []
            states = checkpoint.get("optimizer_states") or []
            for optimizer, state in zip(optimizers, states):
                dist_opts = _dist_optimizers(optimizer)
                if dist_opts and isinstance(state, dict):
                    # collective over the data-parallel group: every rank dumps the checkpoint, DP rank 0 gets all
                    state[PARAM_STATE_KEY] = [opt.get_parameter_state_dp_zero() for opt in dist_opts]

        return on_save_checkpoint

    def make_load(upstream):
        def load_state_dict(self, state_dict):
            param_states = state_dict.pop(PARAM_STATE_KEY, None) if isinstance(state_dict, dict) else None
            upstream(self, state_dict)
            if param_states is not None:  # every DP rank read the same file; DP rank 0 scatters the shards
                with torch.no_grad():  # fp32 main params are views of the trained parameters
                    for opt, param_state in zip(_dist_optimizers(self), param_states):
                        # torch's Adam keeps a "step" tensor per parameter (set from param_groups by
                        # load_state_dict) that the parameter state does not carry: megatron would look it up
                        # there (KeyError)
                        inner = opt.optimizer.state
                        steps = {param: state.pop("step") for param, state in inner.items() if "step" in state}
                        opt.load_parameter_state_from_dp_zero(param_state)
                        for param, step in steps.items():  # one tensor each: megatron hands every parameter
                            inner[param]["step"] = step.clone()  # the same one, which Adam's += 1 counts N times

        return load_state_dict

    replace(NLPAdapterModelMixin, "on_save_checkpoint", make_save)
    replace(McoreDistributedOptimizer, "load_state_dict", make_load)


def peft_checkpoint_lacks_optimizer_moments() -> bool:
    """megatron's DistributedOptimizer.state_dict leaves the parameter state (Adam moments, main params) out
    (distrib_optimizer.py), and neither NeMo's McoreDistributedOptimizer.state_dict (mcore_optim.py) nor its PEFT
    checkpoint hook (nlp_adapter_mixins.py) adds it back."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin
    from nemo.core.optim.mcore_optim import McoreDistributedOptimizer

    megatron_state = source(DistributedOptimizer.state_dict)
    if "get_parameter_state" in megatron_state or '"state"' not in megatron_state:
        return False
    hook = upstream_own(NLPAdapterModelMixin, "on_save_checkpoint")  # NeMo 2.4.1 defines none
    upstream_hook = "" if hook is None else source(hook)
    return "get_parameter_state" not in source(McoreDistributedOptimizer.state_dict) + upstream_hook

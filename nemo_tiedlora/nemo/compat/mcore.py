"""Fixes for NeMo 2.4.1 against megatron-core 0.13 (nemo glue layer; declared in `table.PATCHES`), GPU and CPU.
"""

from __future__ import annotations

from nemo_tiedlora.nemo.compat.patch import have_module, original, replace, source


def real_process_groups() -> None:
    """After NeMo's (fake) model-parallel init, create the real groups (`nemo_tiedlora.nemo.launch`)."""
    import nemo.collections.nlp.models.language_modeling.megatron_base_model as base_model

    def make(upstream):
        def initialize_model_parallel_for_nemo(*args, **kwargs):
            from nemo_tiedlora.nemo.launch import ensure_process_groups

            upstream(*args, **kwargs)
            ensure_process_groups(
                world_size=kwargs["world_size"],
                global_rank=kwargs["global_rank"],
                local_rank=kwargs.get("local_rank"),
                tensor_model_parallel_size=kwargs.get("tensor_model_parallel_size", 1),
                pipeline_model_parallel_size=kwargs.get("pipeline_model_parallel_size", 1),
                virtual_pipeline_model_parallel_size=kwargs.get("virtual_pipeline_model_parallel_size"),
                context_parallel_size=kwargs.get("context_parallel_size", 1),
                seed=kwargs.get("seed", 1234),
            )

        return initialize_model_parallel_for_nemo

    replace(base_model, "initialize_model_parallel_for_nemo", make)


def nemo_fakes_process_groups() -> bool:
    """megatron-core reads its process groups when modules are built (it has ``process_groups_config``), while
    NeMo's initialize_model_parallel_for_nemo only calls fake_initialize_model_parallel (megatron_init.py)."""
    if not have_module("megatron.core.process_groups_config"):
        return False
    from nemo.collections.nlp.modules.common.megatron import megatron_init

    text = source(megatron_init.initialize_model_parallel_for_nemo)
    return "fake_initialize_model_parallel(" in text and "parallel_state.initialize_model_parallel(" not in text


def attention_mixin_forward_is_stale() -> bool:
    """NeMo's MCoreSelfAttentionMixin.forward lacks megatron-core 0.13's ``inference_context`` keyword."""
    import inspect

    from nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins import MCoreSelfAttentionMixin

    return "inference_context" not in inspect.signature(original(MCoreSelfAttentionMixin.forward)).parameters


def attention_mixin_forward() -> None:
    from megatron.core.transformer.attention import SelfAttention
    from nemo.collections.nlp.modules.common.megatron.adapters.mcore_mixins import MCoreSelfAttentionMixin
    from nemo.collections.nlp.modules.common.megatron.adapters.parallel_adapters import AdapterName

    def make(_stale):
        # NeMo's forward is not called: its megatron-core 0.11 signature is the defect
        def forward(self, *args, **kwargs):
            # megatron-core's own forward (current signature and return arity); it calls the mixin's
            # get_query_key_value_tensors, where NeMo applies its QKV LoRA / IA3 / ptuning adapters.
            dense = None
            if self.is_adapter_available():
                dense = self.get_adapter_module(AdapterName.LORA_DENSE_ATTENTION_ADAPTER)
                if dense is not None and not self.adapter_cfg[AdapterName.LORA_DENSE_ATTENTION_ADAPTER]["enabled"]:
                    dense = None
            if dense is None:
                return SelfAttention.forward(self, *args, **kwargs)

            def add_dense_lora(_module, inputs, output):  # NeMo: output = linear_proj(x) + lora(x)
                out, bias = output
                return out + dense(inputs[0]), bias

            handle = self.linear_proj.register_forward_hook(add_dense_lora)
            try:
                return SelfAttention.forward(self, *args, **kwargs)
            finally:
                handle.remove()

        return forward

    replace(MCoreSelfAttentionMixin, "forward", make)

"""Fixes for NeMo's 1.x NLP collection outside NVIDIA's PyTorch container (no apex, no TransformerEngine, no
``NVIDIA_PYTORCH_VERSION``) (nemo glue layer; declared in `table.PATCHES`).

Each function pair is one entry: the install function and the ``needed()`` test of the upstream condition.
"""

from __future__ import annotations

import os
import sys
import types

import torch

from nemo_tiedlora.nemo.compat.patch import have_module, replace, source


def set_nvidia_pytorch_version() -> None:
    os.environ["NVIDIA_PYTORCH_VERSION"] = "25.07"


def nvidia_pytorch_version_unset() -> bool:
    return "NVIDIA_PYTORCH_VERSION" not in os.environ


def open_apex_gate() -> None:
    import nemo.collections.nlp.parts.nlp_overrides as nlo

    replace(nlo, "HAVE_APEX", lambda _unset: True)  # a flag: the gated code paths need no apex on the mcore path


def apex_transformer_missing() -> bool:
    """nlp_overrides.py found no ``apex.transformer``: HAVE_APEX is False and its strategy and connector refuse."""
    import nemo.collections.nlp.parts.nlp_overrides as nlo

    return not nlo.HAVE_APEX


def define_apex_only_names() -> None:
    import nemo.collections.nlp.modules.common.megatron.build_model as build_model
    import nemo.collections.nlp.modules.common.megatron.utils as mutils
    from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes

    if not hasattr(build_model, "set_defaults_if_not_set_tensor_model_parallel_attributes"):
        build_model.set_defaults_if_not_set_tensor_model_parallel_attributes = (
            set_defaults_if_not_set_tensor_model_parallel_attributes
        )
    if not hasattr(mutils, "listify_model"):
        mutils.listify_model = lambda model: model if isinstance(model, list) else [model]
    for name, norm in (
        ("FusedLayerNorm", torch.nn.LayerNorm),
        ("FastLayerNorm", torch.nn.LayerNorm),
        ("MixedFusedRMSNorm", torch.nn.RMSNorm),
    ):
        if not hasattr(mutils, name):
            setattr(mutils, name, norm)


def apex_only_names_missing() -> bool:
    """build_model.py / megatron/utils.py lack a name they import only from apex."""
    import nemo.collections.nlp.modules.common.megatron.build_model as build_model
    import nemo.collections.nlp.modules.common.megatron.utils as mutils

    return not hasattr(build_model, "set_defaults_if_not_set_tensor_model_parallel_attributes") or not all(
        hasattr(mutils, name) for name in ("listify_model", "FusedLayerNorm", "FastLayerNorm", "MixedFusedRMSNorm"))


def torch_multi_tensor_l2norm() -> None:
    import nemo.collections.nlp.modules.common.megatron.clip_grads as clip_grads

    def multi_tensor_applier(op, overflow_buf, tensor_lists, per_tensor):  # apex signature, l2norm only
        norms = [torch.linalg.vector_norm(t.float()) for t in tensor_lists[0]]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float32)
        return total, None

    clip_grads.multi_tensor_applier = multi_tensor_applier
    clip_grads.amp_C = types.SimpleNamespace(multi_tensor_l2norm="l2norm")


def clip_grads_lacks_apex() -> bool:
    import nemo.collections.nlp.modules.common.megatron.clip_grads as clip_grads

    return not hasattr(clip_grads, "multi_tensor_applier")


DISPATCHER_IMPORTS = {
    # module imported unconditionally by text_generation_strategy.model_inference_strategy_dispatcher: class used
    "nemo.collections.multimodal.models.multimodal_llm.neva.neva_model": "MegatronNevaModel",  # torchvision
    "nemo.collections.nlp.models.language_modeling.megatron_griffin_model": "MegatronGriffinModel",  # accelerated_scan
    "nemo.collections.nlp.models.language_modeling.megatron_mamba_model": "MegatronMambaModel",  # mamba_ssm
}


def dispatcher_imports_fail() -> bool:
    import importlib

    for module in DISPATCHER_IMPORTS:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - any failure here is the defect (NameError without torchvision)
            return True
    return False


def stub_dispatcher_imports() -> None:
    import importlib

    for module, class_name in DISPATCHER_IMPORTS.items():
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001
            stub = types.ModuleType(module)
            # A class no model is an instance of: the dispatcher's isinstance test is simply false.
            setattr(stub, class_name, type(class_name, (), {}))
            sys.modules[module] = stub


def torch_norm_sequence_parallel() -> None:
    import copy

    from megatron.core.transformer import torch_norm

    def make(original_new):
        def __new__(cls, config, hidden_size, *args, **kwargs):
            if not config.sequence_parallel:
                return original_new(cls, config, hidden_size, *args, **kwargs)
            local = copy.copy(config)  # never mutate the shared config
            local.sequence_parallel = False
            norm = original_new(cls, local, hidden_size, *args, **kwargs)
            for param in norm.parameters():
                # as apex's FusedLayerNorm does: NeMo / megatron all-reduce these grads over the TP group
                param.sequence_parallel = True
            return norm

        return __new__

    replace(torch_norm.WrappedTorchNorm, "__new__", make)


def torch_norm_refuses_sequence_parallel() -> bool:
    """Without apex the local spec's norm is WrappedTorchNorm, whose constructor asserts not sequence_parallel."""
    if have_module("apex"):
        return False
    from megatron.core.transformer import torch_norm

    return "assert not config.sequence_parallel" in source(torch_norm.WrappedTorchNorm.__new__)


def te_free_specs() -> None:
    import nemo.collections.nlp.models.language_modeling.megatron_gpt_model as gpt_model

    def make(original):
        def get_specs(spec_name, transformer_config=None, use_te=True, hyena_cfg=None, fp8=False):
            if spec_name == "" and not use_te:  # the local spec, without building TE's (upstream: NameError)
                num_experts = transformer_config.num_moe_experts if transformer_config else None
                grouped = transformer_config.moe_grouped_gemm if transformer_config else False
                return gpt_model.get_gpt_layer_local_spec(num_experts, grouped)
            return original(spec_name, transformer_config, use_te, hyena_cfg, fp8)

        return get_specs

    replace(gpt_model, "get_specs", make)


def te_specs_built_without_te() -> bool:
    """No TransformerEngine here, and get_specs builds the TE specs eagerly (its name table calls them all)."""
    if have_module("transformer_engine"):
        return False
    import nemo.collections.nlp.models.language_modeling.megatron_gpt_model as gpt_model

    return "get_gpt_layer_with_transformer_engine_spec(" in source(gpt_model.get_specs)

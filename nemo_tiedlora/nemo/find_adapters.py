"""The model walk (nemo glue layer): the megatron GPT chunks of a NeMo model and the Tied-LoRA adapters in them.

Read by injection (where to wrap `linear_qkv`), the gradient hooks (which tensors to sum), the adapter state and
archive I/O (which tensors to save and load) and the parameter summary. Nothing here changes the model.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from nemo_tiedlora.nemo.adapters import ADAPTER_NAME, TiedLoraQKV

SHARED_ATTR = "tiedlora_shared"  # GPTModel.<this>: the TiedLoraShared owner of the tied A and B of one chunk


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The megatron GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(module, "decoder") and hasattr(module, "module"):
        module = module.module
    return module


def model_chunks(model: Any) -> list[torch.nn.Module]:
    """The megatron GPTModel of every (virtual pipeline) chunk of a NeMo GPT model on this rank."""
    chunks = model.model if isinstance(model.model, list) else [model.model]
    return [unwrap(chunk) for chunk in chunks]


def iter_layer_adapters(model: Any) -> Iterable[tuple[int, Any]]:
    """(global layer number, TiedLoraLayerAdapter) for every adapted layer on this rank."""
    for chunk in model_chunks(model):
        for layer in chunk.decoder.layers:
            qkv = layer.self_attention.linear_qkv
            if isinstance(qkv, TiedLoraQKV) and qkv.get_adapter_module(ADAPTER_NAME) is not None:
                yield layer.layer_number, qkv.get_adapter_module(ADAPTER_NAME)


def iter_shared_adapters(model: Any) -> Iterable[Any]:
    """The TiedLoraSharedAdapter (A, B) replica of every model chunk on this rank."""
    for chunk in model_chunks(model):
        owner = getattr(chunk, SHARED_ATTR, None)
        if owner is not None and owner.get_adapter_module(ADAPTER_NAME) is not None:
            yield owner.get_adapter_module(ADAPTER_NAME)

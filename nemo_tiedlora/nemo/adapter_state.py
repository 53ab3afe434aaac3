"""The adapter's logical state (nemo glue layer), independent of TP/PP: A and B once, u_l and v_l (and untied
A_l, B_l) by global layer.

`gather_adapter_state` assembles it on every rank from the replicas spread over pipeline stages (TP ranks hold
identical replicas, so any TP rank's copy is the logical tensor).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from nemo_tiedlora.formats.adapter_keys import layer_key
from nemo_tiedlora.core.modules import FACTOR_OF_PARAM
from nemo_tiedlora.nemo.find_adapters import iter_layer_adapters, iter_shared_adapters


def local_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors under logical keys: 'A', 'B' (tied) and 'layers.<n>.<factor>' (n global, 1-based)."""
    state: dict[str, torch.Tensor] = {}
    for shared in list(iter_shared_adapters(model))[:1]:
        for name, param in shared.named_parameters(recurse=False):
            state[FACTOR_OF_PARAM[name]] = param.detach().cpu().clone()
    for number, adapter in iter_layer_adapters(model):
        for name, param in adapter.named_parameters(recurse=False):
            state[layer_key(number, FACTOR_OF_PARAM[name])] = param.detach().cpu().clone()
    return state


def gather_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The whole model's adapter state on every rank (per-layer tensors gathered over the pipeline group)."""
    state = local_adapter_state(model)
    if not dist.is_initialized():
        return state
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return state
    pieces: list[Any] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(pieces, state, group=parallel_state.get_pipeline_model_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for piece in pieces:
        for key, tensor in piece.items():
            merged.setdefault(key, tensor)  # A/B: every stage holds the same replica
    return dict(sorted(merged.items()))

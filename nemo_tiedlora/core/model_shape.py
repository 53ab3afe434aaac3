"""The attention shape of a GPT model config, read without NeMo (core layer: pure Python + torch).

`model_shape` is what every layer above needs to size the adapter and check a base: the PEFT config
(``nemo/``), the adapter archive check, merge, export, convert and the study's parameter counts. It reads a NeMo
model config (an OmegaConf ``DictConfig``) or a plain mapping with the same keys, so merge and export can read a
shape from a ``.nemo``'s ``model_config.yaml`` without importing NeMo.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nemo_tiedlora.core.functional import qkv_out_width

SHAPE_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels", "out_features")


def _get(model_cfg: Any, key: str, default: Any = None) -> Any:
    """``model_cfg[key]`` of a mapping or a ``DictConfig`` (both have ``get``), or of an attribute-only object."""
    if isinstance(model_cfg, Mapping) or hasattr(model_cfg, "get"):
        return model_cfg.get(key, default)
    return getattr(model_cfg, key, default)


def model_shape(model_cfg: Any) -> dict[str, int]:
    """hidden size, layers, heads, query groups, head dim and fused-QKV width of a NeMo GPT model config.

    ``num_query_groups`` defaults to the head count (multi-head attention) and ``kv_channels`` to
    ``hidden_size // heads``; ``out_features`` is the fused QKV width ``heads * kv + 2 * groups * kv``.
    """
    heads = int(_get(model_cfg, "num_attention_heads"))
    groups = _get(model_cfg, "num_query_groups", None) or heads
    kv_channels = _get(model_cfg, "kv_channels", None)
    hidden = int(_get(model_cfg, "hidden_size"))
    out = qkv_out_width(hidden, heads, int(groups), kv_channels)
    return {
        "hidden_size": hidden,
        "num_layers": int(_get(model_cfg, "num_layers")),
        "num_attention_heads": heads,
        "num_query_groups": int(groups),
        "kv_channels": int(kv_channels) if kv_channels else hidden // heads,
        "out_features": out,
    }

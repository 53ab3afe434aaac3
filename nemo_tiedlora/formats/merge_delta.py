"""The adapter's per-layer factors and their merge into a base (formats layer: pure torch, no NeMo or Megatron import).

The logical adapter state (its keys: ``formats.adapter_keys``) read as per-layer factors. Every configuration is a
per-layer rank-r LoRA on the fused QKV linear,

    A_l = diag(u_l) A   [r, d]        B_l = s * diag(v_l) B   [out, r]        (s = alpha / r folded into B_l)

(:func:`per_layer_lora`), and merging adds ``B_l A_l = s diag(v_l) B diag(u_l) A`` to layer l's ``linear_qkv``
weight ``[out, d]`` (:func:`merge_into_state` for a TP1 state dict, :func:`merge_into_layers` for a model's
decoder layers, in place).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraCheckpointError
from nemo_tiedlora.core.functional import per_layer_lora_factors
from nemo_tiedlora.formats.adapter_keys import (LAYER_FACTORS, SHARED_FACTORS, factor_of, layer_key, layers_of,
                                                parse_layer_key)
from nemo_tiedlora.formats.reshard import QKV_WEIGHT, decoder_key

# Per-layer LoRA factors --------------------------------------------------------------------------------------


def _check_layer_state(state: Mapping[str, Tensor], cfg: TiedLoraConfig) -> list[int]:
    """The layers of `state`; one error listing every unknown, misplaced or missing key."""
    tied = cfg.flags.tied
    layers = layers_of(state)
    problems: list[str] = []
    unknown = sorted(key for key in state if key not in SHARED_FACTORS and not parse_layer_key(key))
    if unknown:
        problems.append(f"unknown keys {unknown}")
    own_ab = sorted(key for key in state if parse_layer_key(key) and factor_of(key) in SHARED_FACTORS)
    if tied and own_ab:
        problems.append(f"per-layer {own_ab} in a tied configuration (is this an untied adapter, e.g. preset lora?)")
    if not tied and any(key in state for key in SHARED_FACTORS):
        problems.append("shared 'A'/'B' in an untied configuration (is this a tied adapter?)")
    if not layers:
        problems.append("no 'layers.<n>.u' / 'layers.<n>.v' keys")
    required = [key for key in SHARED_FACTORS if tied] + [
        layer_key(n, factor) for n in layers for factor in (("u", "v") if tied else LAYER_FACTORS)
    ]
    missing = [key for key in required if key not in state]
    if missing:
        problems.append(f"missing keys {missing}")
    if problems:
        raise TiedLoraCheckpointError(
            "cannot read the Tied-LoRA adapter state: " + "; ".join(problems) + ". Pass the logical state of "
            "nemo_tiedlora.nemo.adapter_state.gather_adapter_state with the config the adapter was trained with"
        )
    return layers


def per_layer_lora(state: Mapping[str, Tensor], cfg: TiedLoraConfig, *,
                   check: bool = True) -> dict[int, tuple[Tensor, Tensor]]:
    """``{n: (A_l [r, d], B_l [out, r])}`` for every layer n (1-based, global) in the logical adapter state.

    ``A_l = diag(u_l) A``, ``B_l = s diag(v_l) B`` with ``s = cfg.scale``, computed in float32 and returned in the
    state's dtype. With ``check`` (for a state from anywhere) every missing, unknown or misshapen key is reported in
    one :class:`TiedLoraCheckpointError`; ``check=False`` for the tensors of a loaded archive, which
    ``formats.adapter_archive.load_archive`` validated against the config and the base shape already.
    """
    tied, r = cfg.flags.tied, cfg.rank
    layers = _check_layer_state(state, cfg) if check else layers_of(state)
    problems: list[str] = []
    result: dict[int, tuple[Tensor, Tensor]] = {}
    for n in layers:
        a = state["A" if tied else layer_key(n, "A")]  # [r, d]
        b = state["B" if tied else layer_key(n, "B")]  # [out, r]
        u, v = state[layer_key(n, "u")], state[layer_key(n, "v")]  # [r], [out]
        if check and (a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r or u.shape != (r,)
                      or v.shape != (b.shape[0],)):
            problems.append(
                f"layer {n}: A {tuple(a.shape)}, B {tuple(b.shape)}, u {tuple(u.shape)}, v {tuple(v.shape)} "
                f"(expected A [{r}, d], B [out, {r}], u [{r}], v [out])"
            )
            continue
        dtype = a.dtype
        a_l, b_l = per_layer_lora_factors(a.float(), b.float(), u.float(), v.float(), cfg.scale)
        result[n] = (a_l.to(dtype), b_l.to(dtype))
    if problems:
        raise TiedLoraCheckpointError(
            f"adapter tensors do not match rank {r}: " + "; ".join(problems) + ": load the config the adapter was "
            "saved with"
        )
    return result


# Merging into a base -----------------------------------------------------------------------------------------


def qkv_delta(factors: tuple[Tensor, Tensor], dtype: torch.dtype) -> Tensor:
    """``B_l A_l`` ``[out, d]`` of one layer's ``(A_l, B_l)``, computed in float32, returned in `dtype`."""
    a_l, b_l = factors
    return (b_l.to(torch.float32) @ a_l.to(torch.float32)).to(dtype)


def merge_into_state(state: dict[str, Any], factors: Mapping[int, tuple[Tensor, Tensor]]) -> None:
    """Add each layer's update to its ``linear_qkv`` weight in a TP1/PP1 state dict (one layer's update at a time)."""
    for number in sorted(factors):
        key = decoder_key(number - 1, QKV_WEIGHT)
        weight = state[key]  # [out, d]
        state[key] = weight + qkv_delta(factors[number], weight.dtype)


def merge_into_layers(layers: Iterable[Any], factors: Mapping[int, tuple[Tensor, Tensor]]) -> None:
    """Add each layer's update in place to ``self_attention.linear_qkv.weight`` of megatron decoder `layers`
    (modules with a 1-based global ``layer_number``)."""
    with torch.no_grad():
        for layer in layers:
            if layer.layer_number in factors:
                weight = layer.self_attention.linear_qkv.weight  # [out, d]
                weight.add_(qkv_delta(factors[layer.layer_number], weight.dtype))

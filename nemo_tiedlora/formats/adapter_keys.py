"""The logical adapter state's key format (formats layer: pure torch, no NeMo or Megatron import).

The logical adapter state is keyed ``A``, ``B`` (tied: shared by all layers) and ``layers.<n>.<factor>`` (``n`` the
1-based global layer; ``u``, ``v`` always, ``A``, ``B`` when untied). This module is the one owner of that format:
:func:`layer_key`, :func:`parse_layer_key`, :func:`factor_of`, :func:`layers_of` and :func:`expected_keys`; every
other module (the archive, the NeMo state walk, merge, export, inspect) goes through them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

from nemo_tiedlora.core.config import TiedLoraConfig

SHARED_FACTORS: tuple[str, ...] = ("A", "B")
LAYER_FACTORS: tuple[str, ...] = ("A", "B", "u", "v")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(A|B|u|v)$")


def layer_key(number: int, factor: str) -> str:
    """The key of layer `number`'s (1-based, global) `factor` (``A``, ``B``, ``u`` or ``v``)."""
    return f"layers.{number}.{factor}"


def parse_layer_key(key: str) -> Optional[tuple[int, str]]:
    """``(layer number, factor)`` of a per-layer key, None for a shared (``A``, ``B``) or unknown key."""
    match = _LAYER_KEY.match(key)
    return (int(match.group(1)), match.group(2)) if match else None


def factor_of(key: str) -> str:
    """The factor (``A``, ``B``, ``u``, ``v``) a shared or per-layer key holds."""
    parsed = parse_layer_key(key)
    return parsed[1] if parsed else key


def layers_of(state: Iterable[str]) -> list[int]:
    """The sorted layer numbers that have per-layer keys in `state` (keys or a mapping)."""
    return sorted({parsed[0] for key in state if (parsed := parse_layer_key(key))})


def expected_keys(config: TiedLoraConfig, num_layers: int) -> list[str]:
    """Every logical key an adapter of this config stores for a model of `num_layers` layers."""
    layers = config.layer_selection or tuple(range(1, num_layers + 1))
    keys = list(SHARED_FACTORS) if config.flags.tied else []
    for number in layers:
        own = ("u", "v") if config.flags.tied else LAYER_FACTORS
        keys += [layer_key(number, factor) for factor in own]
    return keys

"""Pure-torch Tied-LoRA math: the update, the merged delta, initialization and parameter counts.

Notation (docs/design.md section 1, torch ``nn.Linear`` convention, a weight maps its columns to its rows):

- ``A``: ``[r, d]``, maps d -> r (the paper's d x r down-projection), shared by Q, K and V.
- ``B``: ``[out, r]``, maps r -> out; ``out = 3d`` with multi-head attention, see :func:`qkv_out_width`.
- ``u``: ``[r]`` and ``v``: ``[out]``, one pair per layer (the paper's diagonal scalings Λu, Λv).
- ``s = alpha / r``.

Layer l computes ``z = W_l x + s * v_l ⊙ (B (u_l ⊙ (A x)))``, which merges into
``W_l' = W_l + s * diag(v_l) B diag(u_l) A``.

Under tensor parallelism a rank may pass only its own rows of ``B`` and entries of ``v`` (its output
partition); every function here then returns that partition of the result. No NeMo or Megatron import.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraConfigError

_NORMAL_STD = 0.02


def qkv_out_width(
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    kv_channels: int | None = None,
) -> int:
    """Output width of the fused QKV linear: ``heads * kv + 2 * groups * kv``.

    ``kv_channels`` (head dim) defaults to ``hidden_size // heads``; ``num_query_groups`` defaults to
    ``heads`` (multi-head attention, giving ``3 * hidden_size``). With GQA, for example d=8192, 64 heads,
    8 groups: ``8192 + 2 * 8 * 128 = 10240``.
    """
    for name, value in (("hidden_size", hidden_size), ("num_attention_heads", num_attention_heads)):
        _check_positive(name, value)
    groups = num_attention_heads if num_query_groups is None else num_query_groups
    _check_positive("num_query_groups", groups)
    if num_attention_heads % groups:
        raise TiedLoraConfigError(
            f"num_attention_heads={num_attention_heads} is not divisible by num_query_groups={groups}: "
            f"use a number of query groups that divides the number of heads"
        )
    if kv_channels is None:
        if hidden_size % num_attention_heads:
            raise TiedLoraConfigError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}: "
                f"use a head count that divides the hidden size, or give kv_channels explicitly"
            )
        kv_channels = hidden_size // num_attention_heads
    _check_positive("kv_channels", kv_channels)
    return num_attention_heads * kv_channels + 2 * groups * kv_channels


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TiedLoraConfigError(f"{name} must be a positive int, got {value!r}: check the model shape")


# The update ------------------------------------------------------------------------------------------------------


def tied_lora_update(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    u: Tensor,
    v: Tensor,
    scale: float,
    *,
    dropout: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The adapter's contribution ``s * v ⊙ (B (u ⊙ (A dropout(x))))``, without forming a d x out matrix.

    Shapes: ``x [..., d]``, ``a [r, d]``, ``b [out, r]``, ``u [r]``, ``v [out]`` -> ``[..., out]``.
    """
    if dropout is not None:
        x = dropout(x)
    h = F.linear(x, a)  # [..., r]
    h = h * u  # [..., r]
    h = F.linear(h, b)  # [..., out]
    return h * (scale * v)  # [..., out]


def per_layer_lora_factors(a: Tensor, b: Tensor, u: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One layer as a plain rank-r LoRA pair: ``A_l = diag(u) A`` ``[r, d]``, ``B_l = s * diag(v) B`` ``[out, r]``.

    ``B_l @ A_l`` equals :func:`delta_weight`, so export to plain LoRA is lossless.
    """
    a_l = u.unsqueeze(-1) * a  # [r, 1] * [r, d] -> [r, d]
    b_l = (scale * v).unsqueeze(-1) * b  # [out, 1] * [out, r] -> [out, r]
    return a_l, b_l


def delta_weight(a: Tensor, b: Tensor, u: Tensor, v: Tensor, scale: float) -> Tensor:
    """The merged update ``s * diag(v) B diag(u) A`` ``[out, d]``, so that ``W' = W + delta_weight``.

    The diagonals are applied as broadcasts, never materialized.
    """
    a_l, b_l = per_layer_lora_factors(a, b, u, v, scale)
    return b_l @ a_l  # [out, r] @ [r, d] -> [out, d]


# Initialization ----------------------------------------------------------------------------------------------------


def kaiming_uniform_(tensor: Tensor, *, fan_in: int, generator: torch.Generator, a: float = math.sqrt(5)) -> Tensor:
    """Fill ``tensor`` in place from ``U(-bound, bound)``, ``bound = sqrt(6 / ((1 + a^2) fan_in))``.

    With the default ``a = sqrt(5)`` (as ``nn.Linear`` and VeRA) the bound is ``1 / sqrt(fan_in)``. ``fan_in``
    is given explicitly: a shard must pass the full (unsharded) fan-in, never its own.
    """
    _check_positive("fan_in", fan_in)
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def xavier_normal_(tensor: Tensor, *, fan_in: int, fan_out: int, generator: torch.Generator) -> Tensor:
    """Fill ``tensor`` in place from ``N(0, std^2)``, ``std = sqrt(2 / (fan_in + fan_out))`` (full fans)."""
    _check_positive("fan_in", fan_in)
    _check_positive("fan_out", fan_out)
    std = math.sqrt(2.0 / (fan_in + fan_out))
    with torch.no_grad():
        return tensor.normal_(0.0, std, generator=generator)


def factor_seed(seed: int, *, name: str, layer_index: int | None) -> int:
    """Seed of one factor's generator, a deterministic function of ``(seed, name, layer_index)``.

    Stable across processes and Python versions (SHA-256, not ``hash()``), so frozen random A/B can be
    regenerated from the recorded ``seed``. ``layer_index`` is None for shared (tied) factors.
    """
    layer = "shared" if layer_index is None else str(layer_index)
    digest = hashlib.sha256(f"nemo_tiedlora/{seed}/{name}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: valid for torch.Generator.manual_seed


def _generator(seed: int, *, name: str, layer_index: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(factor_seed(seed, name=name, layer_index=layer_index))
    return generator


def init_factors(
    cfg: TiedLoraConfig,
    *,
    in_features: int,
    out_features: int,
    layer_index: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Initial ``{'A': [r, in], 'B': [out, r], 'u': [r], 'v': [out]}`` per docs/design.md section 3.

    - The zero factor (``cfg.flags.zero_factor``) is all zeros, so the update is zero at step 0.
    - A frozen random A or B is Kaiming-uniform (as VeRA) with its full fan-in (``in_features`` for A, ``r``
      for B). A trained B is always the zero factor. A trained, non-zero A follows ``cfg.a_init``.
    - u is ``cfg.resolved_u_init`` and v is ``cfg.resolved_v_init`` unless zero.

    Random factors come from a CPU generator seeded by :func:`factor_seed` of ``(cfg.seed, name, layer)``, where
    layer is None for tied A/B and ``layer_index`` (0-based global layer) for untied ones; the global RNG is
    untouched. ``layer_index`` is required when A/B are untied and is ignored for tied A/B. The tensors are the
    full, unsharded factors, identical on every rank; they are drawn in float32 on the CPU, then cast to
    ``dtype``, so every dtype starts from the same values.
    """
    _check_positive("in_features", in_features)
    _check_positive("out_features", out_features)
    flags = cfg.flags
    if not flags.tied and layer_index is None:
        raise ValueError("init_factors: untied A and B are per layer; pass the 0-based global layer_index")
    if layer_index is not None and (not isinstance(layer_index, int) or layer_index < 0):
        raise ValueError(f"init_factors: layer_index must be a 0-based int, got {layer_index!r}")
    ab_layer = None if flags.tied else layer_index
    zero = flags.zero_factor
    r = cfg.rank

    a = torch.zeros(r, in_features)  # [r, d]
    if zero != "A":
        generator = _generator(cfg.seed, name="A", layer_index=ab_layer)
        if not flags.train_a or cfg.a_init == "kaiming":
            kaiming_uniform_(a, fan_in=in_features, generator=generator)
        elif cfg.a_init == "xavier":
            xavier_normal_(a, fan_in=in_features, fan_out=r, generator=generator)
        else:  # "normal"
            a.normal_(0.0, _NORMAL_STD, generator=generator)

    b = torch.zeros(out_features, r)  # [out, r]
    if zero != "B":  # B is the zero factor whenever it is trained, so a non-zero B is frozen random
        kaiming_uniform_(b, fan_in=r, generator=_generator(cfg.seed, name="B", layer_index=ab_layer))

    u = torch.full((r,), 0.0 if zero == "u" else cfg.resolved_u_init)  # [r]
    v = torch.full((out_features,), 0.0 if zero == "v" else cfg.resolved_v_init)  # [out]
    return {name: tensor.to(dtype) for name, tensor in (("A", a), ("B", b), ("u", u), ("v", v))}


# Parameter counts ---------------------------------------------------------------------------------------------------


def _factor_sizes(cfg: TiedLoraConfig, *, hidden_size: int, num_layers: int, out_features: int) -> dict[str, int]:
    """Elements of every factor over the model: A, B once if tied else per adapted layer; u, v per layer."""
    cfg.validate_for_model(hidden_size=hidden_size, num_layers=num_layers, out_features=out_features)
    layers = cfg.num_adapted_layers(num_layers)
    copies = 1 if cfg.flags.tied else layers
    r = cfg.rank
    return {
        "A": copies * hidden_size * r,
        "B": copies * out_features * r,
        "u": layers * r,
        "v": layers * out_features,
    }


def parameter_counts(cfg: TiedLoraConfig, *, hidden_size: int, num_layers: int, out_features: int) -> dict[str, int]:
    """Trainable parameters per factor and in total: ``{'A', 'B', 'u', 'v', 'total'}``.

    Closed form with L adapted layers (``cfg.layer_selection`` or all): A is ``d r`` if tied else ``L d r``,
    B is ``out r`` if tied else ``L out r``, u is ``L r``, v is ``L out``; a frozen factor counts 0.
    """
    sizes = _factor_sizes(cfg, hidden_size=hidden_size, num_layers=num_layers, out_features=out_features)
    flags = cfg.flags
    counts = {name: size if flags.trains(name) else 0 for name, size in sizes.items()}
    counts["total"] = sum(counts.values())
    return counts


def stored_parameter_counts(
    cfg: TiedLoraConfig, *, hidden_size: int, num_layers: int, out_features: int
) -> dict[str, int]:
    """Like :func:`parameter_counts`, but counting every stored tensor, frozen ones included (file size)."""
    counts = _factor_sizes(cfg, hidden_size=hidden_size, num_layers=num_layers, out_features=out_features)
    counts["total"] = sum(counts.values())
    return counts


def lora_parameter_count(*, hidden_size: int, num_layers: int, out_features: int, rank: int) -> int:
    """Trainable parameters of plain LoRA on the fused QKV linear of every layer: ``L r (d + out)``."""
    return num_layers * rank * (hidden_size + out_features)

"""Megatron's fused QKV layout: the one interleave rule, both directions (no NeMo or Megatron import).

megatron-core's ``linear_qkv`` output rows ``[ng * (np/ng + 2) * hn, ...]`` are grouped by query group: for each
group g, the group's ``np/ng`` query heads, then ``k_g``, then ``v_g``, each ``hn`` rows. Hugging Face keeps
``q_proj [np * hn, ...]``, ``k_proj [ng * hn, ...]`` and ``v_proj [ng * hn, ...]`` apart. :func:`split_fused_qkv`
(export) and :func:`fuse_qkv` (import) are inverses over the same grouped view ``[ng, np/ng + 2, hn, ...]``; both
work for a weight ``[out, d]``, a LoRA B ``[out, r]`` or a bias ``[out]``.
"""

from __future__ import annotations

from torch import Tensor
import torch

from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError


def _check_heads(heads: int, groups: int, hd: int, caller: str) -> int:
    if heads <= 0 or groups <= 0 or hd <= 0 or heads % groups:
        raise TiedLoraConfigError(
            f"{caller}: num_attention_heads={heads}, num_query_groups={groups}, head_dim={hd} is not a valid "
            f"attention shape: all must be positive and the groups must divide the heads"
        )
    return heads // groups


def split_fused_qkv(
    rows: Tensor, *, num_attention_heads: int, num_query_groups: int, head_dim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """De-interleave the rows of Megatron's fused QKV output into (q, k, v).

    ``rows [ng * (np/ng + 2) * hn, ...]`` -> ``q [np * hn, ...]``, ``k [ng * hn, ...]``, ``v [ng * hn, ...]``
    (views or copies).
    """
    heads, groups, hd = num_attention_heads, num_query_groups, head_dim
    per_group = _check_heads(heads, groups, hd, "split_fused_qkv")
    width = groups * (per_group + 2) * hd
    if rows.dim() == 0 or rows.shape[0] != width:
        raise TiedLoraCheckpointError(
            f"split_fused_qkv: expected {width} fused QKV rows ({groups} groups x ({per_group} query + 1 key + 1 value "
            f"heads) x head_dim {hd}), got shape {tuple(rows.shape)}: pass the full (TP=1) tensor of this model"
        )
    rest = rows.shape[1:]
    grouped = rows.reshape(groups, per_group + 2, hd, *rest)  # [ng, np/ng + 2, hn, ...]
    q = grouped[:, :per_group].reshape(heads * hd, *rest)  # [np * hn, ...]
    k = grouped[:, per_group].reshape(groups * hd, *rest)  # [ng * hn, ...]
    v = grouped[:, per_group + 1].reshape(groups * hd, *rest)  # [ng * hn, ...]
    return q, k, v


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, *, num_attention_heads: int, num_query_groups: int,
             head_dim: int) -> Tensor:
    """Interleave HF's ``q [np * hn, ...]``, ``k [ng * hn, ...]``, ``v [ng * hn, ...]`` into Megatron's fused
    ``[ng * (np/ng + 2) * hn, ...]`` (a new contiguous tensor); the inverse of :func:`split_fused_qkv`."""
    heads, groups, hd = num_attention_heads, num_query_groups, head_dim
    per_group = _check_heads(heads, groups, hd, "fuse_qkv")
    rest = q.shape[1:]
    expected = {"q": (heads * hd, *rest), "k": (groups * hd, *rest), "v": (groups * hd, *rest)}
    actual = {"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape)}
    wrong = [f"{name} {actual[name]} != {shape}" for name, shape in expected.items() if actual[name] != tuple(shape)]
    if wrong:
        raise TiedLoraCheckpointError(
            f"fuse_qkv: {'; '.join(wrong)} for {heads} heads, {groups} query groups, head_dim {hd}: the checkpoint "
            f"does not match its config (num_attention_heads, num_key_value_heads, head_dim)"
        )
    grouped = torch.cat(
        [q.reshape(groups, per_group, hd, *rest), k.reshape(groups, 1, hd, *rest), v.reshape(groups, 1, hd, *rest)],
        dim=1,
    )  # [ng, np/ng + 2, hn, ...]
    return grouped.reshape(groups * (per_group + 2) * hd, *rest)

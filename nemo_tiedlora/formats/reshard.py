"""Megatron GPT state dicts between model-parallel layouts (formats layer: pure torch, no NeMo or Megatron import).

A :class:`Layout` is TP, PP and the decoder layers on each pipeline stage (:func:`layout_for` gives Megatron's).
:func:`unshard` joins per-rank state dicts into one TP1/PP1 state dict (``model.decoder.layers.<global layer>...``)
and :func:`shard` cuts one rank's state dict out of it. The rules are Megatron's, one per tensor kind
(:func:`rule_of`):

- ``column``: column-parallel weights (``linear_qkv``, ``linear_fc1``) split along dim 0; ``linear_fc1`` of a gated
  MLP (SwiGLU) ``[gate; up]`` per half, so each rank holds ``[gate_t; up_t]``;
- ``row``: row-parallel weights (``linear_proj``, ``linear_fc2``) split along dim 1;
- ``vocab``: the word embeddings and output layer, split along dim 0 after re-padding the vocabulary to a multiple
  of ``make_vocab_size_divisible_by x TP`` as NeMo pads it (:func:`padded_vocab`);
- ``replicated``: everything else (norms, ...), identical on every TP rank; a tensor without a rule that differs
  between ranks is an error, never a guess.

Pipeline stages hold their own layers numbered from 0, the first stage the embedding, the last the final norm and
the output layer (with tied embeddings a copy of the embedding).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError

LAYER_KEY = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")
QKV_WEIGHT = "self_attention.linear_qkv.weight"
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
VOCAB_KEYS = ("model.embedding.word_embeddings.weight", "model.output_layer.weight")
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_in_first_pipeline_stage",
               "num_layers_in_last_pipeline_stage")
_GATED = ("swiglu", "fast-swiglu", "geglu", "fast-geglu", "reglu", "fast-reglu")


@dataclass(frozen=True)
class Layout:
    """A model-parallel layout: TP size, PP size and the number of decoder layers on each pipeline stage."""

    tp: int
    pp: int
    stage_layers: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        """The global index of each stage's first layer."""
        return tuple(sum(self.stage_layers[:i]) for i in range(self.pp))


def layout_for(cfg: Any, tp: int, pp: int, *, first_stage_layers: Optional[int] = None,
               last_stage_layers: Optional[int] = None) -> Layout:
    """The layers per stage Megatron uses for `cfg`'s num_layers at (tp, pp); a clear error if they do not divide."""
    num_layers = int(cfg.num_layers)
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"TP={tp} and PP={pp} must both be >= 1")
    for name, size in (("num_attention_heads", cfg.num_attention_heads),
                       ("num_query_groups", cfg.get("num_query_groups") or cfg.num_attention_heads),
                       ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if tp >= 1 and int(size) % tp:
            problems.append(f"{name}={size} is not divisible by TP={tp}")
    stages: list[int] = []
    if pp >= 1:
        first = first_stage_layers if first_stage_layers is not None else cfg.get("num_layers_in_first_pipeline_stage")
        last = last_stage_layers if last_stage_layers is not None else cfg.get("num_layers_in_last_pipeline_stage")
        if pp == 1:
            first = last = None
        fixed = [n for n in (first, last) if n is not None]
        middle_stages = pp - len(fixed)
        rest = num_layers - sum(fixed)
        if any(n < 1 for n in fixed) or rest < 0 or (middle_stages == 0 and rest != 0) or \
                (middle_stages > 0 and (rest % middle_stages or rest == 0)):
            problems.append(f"num_layers={num_layers} cannot be split over PP={pp} stages "
                            f"(first stage {first}, last stage {last}): give a PP that divides the layers, or set "
                            "the first/last stage layer counts so the other stages get equal, non-zero shares")
        else:
            each = rest // middle_stages if middle_stages else 0
            stages = [each] * pp
            if first is not None:
                stages[0] = int(first)
            if last is not None:
                stages[-1] = int(last)
    if problems:
        raise TiedLoraConfigError("impossible layout: " + "; ".join(problems))
    return Layout(tp, pp, tuple(stages))


def source_layout(cfg: Any) -> Layout:
    """The layout a model config records (its TP, PP and first/last stage layer counts)."""
    return layout_for(cfg, int(cfg.get("tensor_model_parallel_size", 1)),
                      int(cfg.get("pipeline_model_parallel_size", 1)))


def layout_settings(layout: Layout) -> dict[str, Optional[int]]:
    """The model-config keys (:data:`LAYOUT_KEYS`) that record `layout`.

    NeMo splits the layers not on a named first/last stage evenly over the other stages (and cannot name both for
    PP=2): only the stage(s) that differ are named.
    """
    stages = layout.stage_layers
    first = last = None
    if len(set(stages)) > 1:
        if len(set(stages[1:])) == 1:
            first = stages[0]
        elif len(set(stages[:-1])) == 1:
            last = stages[-1]
        else:
            first, last = stages[0], stages[-1]
    return dict(zip(LAYOUT_KEYS, (layout.tp, layout.pp, first, last)))


def decoder_key(index: int, suffix: str) -> str:
    """The TP1 key of decoder layer `index` (0-based, global) and `suffix`, e.g. ``QKV_WEIGHT``."""
    return f"model.decoder.layers.{index}.{suffix}"


def _local_to_global(key: str, offset: int) -> str:
    match = LAYER_KEY.match(key)
    return decoder_key(int(match.group(1)) + offset, match.group(2)) if match else key


def _global_to_local(key: str, offset: int) -> str:
    match = LAYER_KEY.match(key)
    return decoder_key(int(match.group(1)) - offset, match.group(2)) if match else key


def rule_of(key: str) -> str:
    """'column' | 'row' | 'vocab' | 'replicated' for a TP1 key."""
    if key in VOCAB_KEYS:
        return "vocab"
    match = LAYER_KEY.match(key)
    suffix = match.group(2) if match else key
    if suffix in _COLUMN:
        return "column"
    if suffix in _ROW:
        return "row"
    return "replicated"


def _gated(cfg: Any) -> bool:
    return str(cfg.get("activation", "gelu")) in _GATED


def _cat_column(parts: list[torch.Tensor], gated: bool) -> torch.Tensor:
    if not gated:
        return torch.cat(parts, dim=0)
    halves = [p.chunk(2, dim=0) for p in parts]  # each rank: [gate_t; up_t]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def _split_column(tensor: torch.Tensor, tp: int, rank: int, gated: bool) -> torch.Tensor:
    if not gated:
        return tensor.chunk(tp, dim=0)[rank]
    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)


def unshard(shards: dict[tuple[int, int], dict[str, Any]], cfg: Any, layout: Layout) -> dict[str, Any]:
    """TP1/PP1 state dict from per-rank state dicts {(tp rank, pp rank): state} saved at `layout`."""
    gated = _gated(cfg)
    state: dict[str, Any] = {}
    for p in range(layout.pp):
        offset = layout.offsets[p]
        local = shards[(0, p)]
        for key in local:
            parts = [shards[(t, p)][key] for t in range(layout.tp)]
            global_key = _local_to_global(key, offset)
            if (p == layout.pp - 1 and layout.pp > 1 and key == "model.output_layer.weight"
                    and cfg.get("share_embeddings_and_output_weights", True)):
                continue  # the last stage's copy of the tied embedding
            rule = rule_of(global_key)
            if not isinstance(parts[0], torch.Tensor):
                state[global_key] = parts[0]
            elif layout.tp == 1:
                state[global_key] = parts[0]
            elif rule in ("column", "vocab"):
                state[global_key] = _cat_column(parts, gated and global_key.endswith("linear_fc1.weight"))
            elif rule == "row":
                state[global_key] = torch.cat(parts, dim=1)
            else:
                if any(not torch.equal(parts[0], other) for other in parts[1:]):
                    raise TiedLoraCheckpointError(
                        f"{key} differs between tensor-parallel ranks and nemo_tiedlora has no resharding rule for "
                        "it: this converter knows Megatron GPT's linear_qkv/linear_proj/linear_fc1/linear_fc2, "
                        "norms, embeddings and output layer")
                state[global_key] = parts[0]
    layers = sorted({int(LAYER_KEY.match(k).group(1)) for k in state if LAYER_KEY.match(k)})
    if layers != list(range(int(cfg.num_layers))):
        raise TiedLoraCheckpointError(f"the shards hold layers {layers}, expected 0..{int(cfg.num_layers) - 1}: the "
                                      "archive's pipeline split does not match its model_config.yaml "
                                      "(num_layers_in_first/last_pipeline_stage)")
    return state


def padded_vocab(vocab: int, cfg: Any, tp: int) -> int:
    """NeMo's padded vocabulary: `vocab` rounded up to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = int(cfg.get("make_vocab_size_divisible_by", 128)) * tp
    return int(math.ceil(vocab / multiple) * multiple)


def repad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with `rows` rows: padding rows cut off or zero rows added."""
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows]
    pad = torch.zeros((rows - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


def shard(state: dict[str, Any], cfg: Any, layout: Layout, tp_rank: int, pp_rank: int, *, vocab_rows: int) -> dict:
    """The state dict of one (tp rank, pp rank) of `layout` from a TP1/PP1 state dict (tensors cloned)."""
    gated = _gated(cfg)
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    offset, count = layout.offsets[pp_rank], layout.stage_layers[pp_rank]
    tied = cfg.get("share_embeddings_and_output_weights", True)
    out: dict[str, Any] = {}
    for key, value in state.items():
        match = LAYER_KEY.match(key)
        if match:
            if not offset <= int(match.group(1)) < offset + count:
                continue
        elif key.startswith("model.embedding."):
            if not first:
                continue
        elif key.startswith("model.decoder.final_layernorm") or key.startswith("model.output_layer"):
            if not last:
                continue
        local = _global_to_local(key, offset)
        if not isinstance(value, torch.Tensor):
            out[local] = value
            continue
        rule = rule_of(key)
        if rule == "vocab":
            value = repad(value, vocab_rows).chunk(layout.tp, dim=0)[tp_rank]
        elif rule == "column":
            value = _split_column(value, layout.tp, tp_rank, gated and key.endswith("linear_fc1.weight"))
        elif rule == "row":
            value = value.chunk(layout.tp, dim=1)[tp_rank]
        # torch.save writes a tensor's whole storage: a slice is copied out, a whole tensor is saved as it is
        whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        out[local] = value if whole else value.clone()
    if last and layout.pp > 1 and tied:
        embedding = repad(state["model.embedding.word_embeddings.weight"], vocab_rows)
        out["model.output_layer.weight"] = embedding.chunk(layout.tp, dim=0)[tp_rank].clone()
    return out

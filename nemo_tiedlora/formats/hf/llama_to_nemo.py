"""Hugging Face Llama-family checkpoint -> NeMo 1.x megatron-core GPT: config and state dict (pure; no NeMo import).

The inverse of ``nemo_tiedlora.formats.hf.nemo_to_hf.nemo_gpt_to_hf_llama`` (see its module docstring for why the
conventions agree: RoPE rotating halves, RMSNorm, softmax scale, SwiGLU). Per decoder layer i, with np heads, ng query
groups (``num_key_value_heads``) and head_dim hn:

    input_layernorm.weight                 <- model.layers.i.input_layernorm.weight                  [d]
    self_attention.linear_qkv.weight       <- fuse_qkv(q_proj, k_proj, v_proj)   [ng (np/ng + 2) hn, d]
    self_attention.linear_qkv.bias         <- fuse_qkv(q, k, v biases)   (Qwen2 only)  [ng (np/ng + 2) hn]
    self_attention.linear_proj.weight      <- o_proj                                            [d, np hn]
    pre_mlp_layernorm.weight               <- post_attention_layernorm                                 [d]
    mlp.linear_fc1.weight                  <- [gate_proj; up_proj]  (megatron's glu: silu(first) * second) [2 ffn, d]
    mlp.linear_fc2.weight                  <- down_proj                                              [d, ffn]

plus ``embedding.word_embeddings`` <- ``model.embed_tokens``, ``decoder.final_layernorm`` <- ``model.norm`` and,
untied only, ``output_layer`` <- ``lm_head``. Every source tensor is used exactly once (a tied checkpoint's stored
``lm_head`` must equal the embedding) and every shape is checked; all problems are reported in one error.
A config that NeMo 1.x cannot express exactly is refused, never approximated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError
from nemo_tiedlora.formats.qkv_layout import fuse_qkv

# model_type -> what it covers
FAMILIES: dict[str, str] = {
    "llama": "Llama 1/2/3/3.1 and SmolLM/SmolLM2 (LlamaForCausalLM)",
    "mistral": "Mistral without sliding window (MistralForCausalLM)",
    "qwen2": "Qwen2/Qwen2.5 (Qwen2ForCausalLM, q/k/v biases)",
}
_QKV_BIAS = {"llama": False, "mistral": False, "qwen2": True}
# HF buffers some old checkpoints store; they are recomputed from the config, never weights.
_BUFFERS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def supported_families() -> str:
    return ", ".join(f"{name} ({what})" for name, what in FAMILIES.items())


def head_dim_of(hf: Mapping[str, Any]) -> int:
    return int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))


def _rope_settings(hf: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """NeMo keys for HF's ``rope_scaling`` (only the kinds NeMo 1.x computes exactly)."""
    scaling = hf.get("rope_scaling")
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return {}
    if kind == "linear":  # HF divides positions by factor; megatron's seq_len_interpolation_factor does the same
        return {"seq_len_interpolation_factor": float(scaling["factor"])}
    if kind == "llama3":  # nemo.collections.common.parts.utils.apply_rope_scaling: HF's llama3 rule
        return {
            "scale_positional_embedding": True,
            "scale_factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "old_context_len": int(scaling["original_max_position_embeddings"]),
        }
    problems.append(f"rope_scaling type {kind!r} (NeMo 1.x's GPT computes only none, 'linear' and 'llama3')")
    return {}


def nemo_model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture keys of a NeMo 1.x ``MegatronGPTModel`` config for a HF ``config.json`` dict.

    Raises :class:`TiedLoraConfigError` for an unsupported family, naming the supported ones, and for every
    setting NeMo 1.x cannot express exactly (all in one message).
    """
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise TiedLoraConfigError(
            f"model_type {family!r} (architectures {hf.get('architectures')}) is not supported by import-hf; "
            f"supported: {supported_families()}"
        )
    problems: list[str] = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (needs 'silu': SwiGLU)")
    if family == "llama" and hf.get("attention_bias"):
        problems.append("attention_bias=True (NeMo 1.x has q/k/v biases but no o_proj bias without biases everywhere)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=True (the MLP of this family has no biases in NeMo's Llama layout)")
    if family == "mistral" and hf.get("sliding_window") is not None:
        problems.append(f"sliding_window={hf.get('sliding_window')} (NeMo 1.x's GPT attends over the whole causal "
                        "context; only Mistral checkpoints with sliding_window null are imported)")
    if family == "qwen2" and hf.get("use_sliding_window"):
        problems.append("use_sliding_window=True (NeMo 1.x's GPT attends over the whole causal context)")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor={hf.get('partial_rotary_factor')} (needs 1.0)")
    heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    groups = int(hf.get("num_key_value_heads") or heads)
    if heads % groups:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    rope = _rope_settings(hf, problems)
    if problems:
        raise TiedLoraConfigError(
            f"this {family} checkpoint cannot be expressed exactly in NeMo 1.x: " + "; ".join(problems)
            + ". Import a checkpoint without these settings (nothing is approximated)"
        )
    positions = int(hf.get("max_position_embeddings") or 4096)
    return {
        "mcore_gpt": True,
        "num_layers": int(hf["num_hidden_layers"]),
        "hidden_size": hidden,
        "ffn_hidden_size": int(hf["intermediate_size"]),
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "kv_channels": head_dim_of(hf),
        "encoder_seq_length": positions,
        "max_position_embeddings": positions,
        "normalization": "rmsnorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "layernorm_zero_centered_gamma": False,
        "activation": "fast-swiglu",
        "bias": False,
        "qkv_bias": _QKV_BIAS[family],
        "position_embedding_type": "rope",
        "rotary_percentage": 1.0,
        "rotary_interleaved": False,
        "rotary_base": float(hf.get("rope_theta", 10000.0)),
        "share_embeddings_and_output_weights": bool(hf.get("tie_word_embeddings", False)),
        "apply_query_key_layer_scaling": False,
        "normalize_attention_scores": True,
        "transformer_block_type": "pre_ln",
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "hidden_dropout": 0.0,
        "ffn_dropout": 0.0,
        **rope,
    }


def vocab_divisor(tokenizer_vocab: int, embedding_rows: int) -> int:
    """A ``make_vocab_size_divisible_by`` m for which NeMo pads the tokenizer's vocabulary to exactly the
    checkpoint's embedding rows (so the logits cover the same rows as HF's): 128 (NeMo's default) when it fits,
    else the smallest m that divides the rows and exceeds the padding (so m * TP still fits for every TP that
    divides rows / m)."""
    if tokenizer_vocab > embedding_rows:
        raise TiedLoraCheckpointError(
            f"the tokenizer has {tokenizer_vocab} tokens but the embedding only {embedding_rows} rows: the tokenizer "
            "does not belong to these weights (pass the checkpoint's own tokenizer files)"
        )
    if math.ceil(tokenizer_vocab / 128) * 128 == embedding_rows:
        return 128
    padding = embedding_rows - tokenizer_vocab
    return next(m for m in range(padding + 1, embedding_rows + 1) if embedding_rows % m == 0)


def nemo_state_dict(
    hf: Mapping[str, Any], names: list[str], get: Callable[[str], Tensor], *, dtype: Optional[torch.dtype] = None
) -> dict[str, Tensor]:
    """The TP1/PP1 NeMo state dict (``model.embedding...``, ``model.decoder.layers.<i>...``) of a HF checkpoint.

    ``names`` are all tensor names in the checkpoint and ``get(name)`` loads one (e.g. memory-mapped from
    safetensors), so only the tensors being fused are copied. ``dtype``: cast every tensor (default: keep).
    """
    cfg = nemo_model_config(hf)
    layers, hidden, ffn = cfg["num_layers"], cfg["hidden_size"], cfg["ffn_hidden_size"]
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_query_groups"], cfg["kv_channels"]
    tied, qkv_bias = cfg["share_embeddings_and_output_weights"], cfg["qkv_bias"]
    available = set(names)
    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []

    def take(name: str, shape: tuple[int, ...]) -> Optional[Tensor]:
        if name not in available:
            missing.append(name)
            return None
        used.add(name)
        tensor = get(name)
        if tuple(tensor.shape) != shape:
            wrong.append(f"{name} {tuple(tensor.shape)} != {shape}")
            return None
        return tensor if dtype is None else tensor.to(dtype)

    embed_name = "model.embed_tokens.weight"
    vocab = int(get(embed_name).shape[0]) if embed_name in available else int(hf["vocab_size"])
    out: dict[str, Optional[Tensor]] = {"model.embedding.word_embeddings.weight": take(embed_name, (vocab, hidden))}
    for i in range(layers):
        h, m = f"model.layers.{i}", f"model.decoder.layers.{i}"
        q = take(f"{h}.self_attn.q_proj.weight", (heads * hd, hidden))
        k = take(f"{h}.self_attn.k_proj.weight", (groups * hd, hidden))
        v = take(f"{h}.self_attn.v_proj.weight", (groups * hd, hidden))
        gate = take(f"{h}.mlp.gate_proj.weight", (ffn, hidden))
        up = take(f"{h}.mlp.up_proj.weight", (ffn, hidden))
        out[f"{m}.input_layernorm.weight"] = take(f"{h}.input_layernorm.weight", (hidden,))
        out[f"{m}.self_attention.linear_proj.weight"] = take(f"{h}.self_attn.o_proj.weight", (hidden, heads * hd))
        out[f"{m}.pre_mlp_layernorm.weight"] = take(f"{h}.post_attention_layernorm.weight", (hidden,))
        out[f"{m}.mlp.linear_fc2.weight"] = take(f"{h}.mlp.down_proj.weight", (hidden, ffn))
        if q is not None and k is not None and v is not None:
            out[f"{m}.self_attention.linear_qkv.weight"] = fuse_qkv(
                q, k, v, num_attention_heads=heads, num_query_groups=groups, head_dim=hd)  # [ng (np/ng + 2) hn, d]
        if gate is not None and up is not None:
            out[f"{m}.mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)  # [gate; up] = [2 ffn, d]
        if qkv_bias:
            qb = take(f"{h}.self_attn.q_proj.bias", (heads * hd,))
            kb = take(f"{h}.self_attn.k_proj.bias", (groups * hd,))
            vb = take(f"{h}.self_attn.v_proj.bias", (groups * hd,))
            if qb is not None and kb is not None and vb is not None:
                out[f"{m}.self_attention.linear_qkv.bias"] = fuse_qkv(
                    qb, kb, vb, num_attention_heads=heads, num_query_groups=groups, head_dim=hd)
    out["model.decoder.final_layernorm.weight"] = take("model.norm.weight", (hidden,))
    if not tied:
        out["model.output_layer.weight"] = take("lm_head.weight", (vocab, hidden))
    elif "lm_head.weight" in available:
        head = take("lm_head.weight", (vocab, hidden))  # a stored copy of the tied embedding
        if head is not None and out["model.embedding.word_embeddings.weight"] is not None and not torch.equal(
                head, out["model.embedding.word_embeddings.weight"]):
            wrong.append("lm_head.weight differs from model.embed_tokens.weight although tie_word_embeddings=True")
    unused = sorted(name for name in available - used if not _BUFFERS.match(name))
    if missing or wrong or unused:
        detail = "; ".join(part for part in (
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "",
            f"wrong {wrong[:8]}{' ...' if len(wrong) > 8 else ''}" if wrong else "",
            f"not used by the {hf.get('model_type')} layout {unused[:8]}{' ...' if len(unused) > 8 else ''}"
            if unused else "",
        ) if part)
        raise TiedLoraCheckpointError(
            f"the checkpoint's tensors do not match its config.json: {detail}. Pass a complete checkpoint folder "
            f"(all shards listed in model.safetensors.index.json) with its own config.json (num_hidden_layers="
            f"{layers}, hidden_size={hidden}, heads={heads}, kv heads={groups}, head_dim={hd}, intermediate_size={ffn})"
        )
    return {key: value for key, value in out.items() if value is not None}

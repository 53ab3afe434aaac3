"""Export to Hugging Face: a Tied-LoRA adapter as plain per-layer LoRA (PEFT format), the base as LlamaForCausalLM.

Formats layer: pure state-dict transforms plus atomic file writers (``fileio``); no NeMo or Megatron import (the
``export`` tool in ``nemo_tiedlora.tools.export`` reads the archives and calls these). The inverse direction, a HF
checkpoint into NeMo, is ``nemo_tiedlora.formats.hf.llama_to_nemo``.

Adapter (docs/design.md sections 1, 4, 6). Every configuration is a per-layer rank-r LoRA on the fused QKV linear
(``nemo_tiedlora.formats.merge_delta.per_layer_lora``),

    A_l = diag(u_l) A   [r, d]        B_l = s * diag(v_l) B   [out, r]        (s = alpha / r folded into B_l)

so the export is lossless. Megatron's fused output rows are interleaved by query group (for each group g: the
group's query heads, k_g, v_g, each head_dim rows); HF's ``q_proj``/``k_proj``/``v_proj`` take the de-interleaved
rows of B_l and all three share A_l. PEFT computes ``lora_B(lora_A(x)) * lora_alpha / r``, so ``lora_alpha = r``.

Base. megatron-core's GPT with RMSNorm, SwiGLU, RoPE and no biases is LlamaForCausalLM with renamed keys:
``linear_qkv`` is de-interleaved into q/k/v, ``linear_fc1`` ``[2 * ffn, d]`` is ``[gate; up]``. The conventions
agree without further permutation (read in megatron-core 0.13 and transformers 4.51):

- RoPE: megatron with ``rotary_interleaved=False`` (NeMo's default) rotates halves, ``cat(-x2, x1)``, with
  ``inv_freq = 1 / base^(arange(0, hd, 2) / hd)`` and ``emb = cat(freqs, freqs)``: exactly HF's ``rotate_half``.
  The interleaved (GPT-J) layout would need a per-head row permutation of q and k and is refused.
- RMSNorm: ``x * rsqrt(mean(x^2) + eps) * weight`` in both (torch.nn.RMSNorm / apex / TE; HF ``LlamaRMSNorm``),
  no zero-centered gamma (NeMo forces ``layernorm_zero_centered_gamma=False``).
- Attention: softmax scale ``1 / sqrt(head_dim)``, causal; SwiGLU ``silu(gate) * up`` in both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError
from nemo_tiedlora.core.fileio import atomic_directory
from nemo_tiedlora.formats.merge_delta import per_layer_lora
from nemo_tiedlora.formats.qkv_layout import split_fused_qkv  # the one interleave rule (import uses its inverse)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
HF_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
_PEFT_PREFIX = "base_model.model.model.layers"  # PeftModel(LlamaForCausalLM): .base_model.model.model.layers


# Adapter -> per-layer LoRA -> HF PEFT -------------------------------------------------------------------------


def hf_peft_adapter(
    state: Mapping[str, Tensor],
    cfg: TiedLoraConfig,
    shape: Mapping[str, int],
    *,
    base_model_name_or_path: Optional[str] = None,
    check: bool = True,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(``adapter_config.json`` contents, tensors) of the adapter as HF PEFT LoRA for ``LlamaForCausalLM``.

    ``shape`` is ``nemo_tiedlora.core.model_shape.model_shape(model_cfg)`` (hidden_size, num_layers,
    num_attention_heads, num_query_groups, kv_channels, out_features). Layer n becomes HF layer ``n - 1``; only adapted
    layers (``cfg.layer_selection``) appear, and PEFT is told so with ``layers_to_transform``. Per layer, ``lora_A`` of
    q/k/v is ``A_l`` and ``lora_B`` of q/k/v are the de-interleaved rows of ``B_l``; ``lora_alpha = r``
    because ``s`` is folded into ``B_l``. Every tensor owns its storage (safetensors refuses shared ones).
    ``check=False``: the state is a loaded archive's, validated already (see ``merge.per_layer_lora``).
    """
    d, out, num_layers = int(shape["hidden_size"]), int(shape["out_features"]), int(shape["num_layers"])
    cfg.validate_for_model(hidden_size=d, num_layers=num_layers, out_features=out)
    expected = list(cfg.layer_selection or range(1, num_layers + 1))
    factors = per_layer_lora(state, cfg, check=check)
    if sorted(factors) != sorted(expected):
        raise TiedLoraCheckpointError(
            f"the adapter state has layers {sorted(factors)} but the config adapts layers {sorted(expected)}: export "
            f"the whole model's state (gather_adapter_state collects the layers of every pipeline stage)"
        )
    heads = dict(
        num_attention_heads=int(shape["num_attention_heads"]),
        num_query_groups=int(shape["num_query_groups"]),
        head_dim=int(shape["kv_channels"]),
    )
    tensors: dict[str, Tensor] = {}
    for n in sorted(factors):
        a_l, b_l = factors[n]  # [r, d], [out, r]
        if a_l.shape[1] != d or b_l.shape[0] != out:
            raise TiedLoraCheckpointError(
                f"layer {n}: A_l {tuple(a_l.shape)} and B_l {tuple(b_l.shape)} do not fit the model (hidden size {d}, "
                f"fused QKV width {out}): export with the shape of the base the adapter was trained on"
            )
        prefix = f"{_PEFT_PREFIX}.{n - 1}.self_attn"
        for module, b_rows in zip(HF_TARGET_MODULES, split_fused_qkv(b_l, **heads)):  # q [np*hn, r], k, v [ng*hn, r]
            tensors[f"{prefix}.{module}.lora_A.weight"] = _owned(a_l)
            tensors[f"{prefix}.{module}.lora_B.weight"] = _owned(b_rows)
    layers_to_transform = None if cfg.layer_selection is None else [n - 1 for n in sorted(factors)]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.rank,  # s = alpha / r is folded into lora_B, so PEFT's own scaling must be 1
        "lora_dropout": float(cfg.dropout),
        "target_modules": list(HF_TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": None if layers_to_transform is None else "layers",
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    return config, tensors


def write_hf_peft(
    out_dir: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, Tensor], *, overwrite: bool = False
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir`` atomically; return it."""
    return _write_hf_dir(out_dir, {PEFT_CONFIG_NAME: config}, {PEFT_WEIGHTS_NAME: tensors}, overwrite=overwrite)


# Base: megatron-core GPT -> LlamaForCausalLM ------------------------------------------------------------------

# NeMo config keys (with NeMo's defaults) whose other values LlamaForCausalLM cannot express.
_REQUIRED: tuple[tuple[str, Any, Callable[[Any], bool], str], ...] = (
    ("mcore_gpt", False, lambda v: bool(v), "True (a megatron-core GPT)"),
    ("normalization", "LayerNorm", lambda v: str(v).lower() == "rmsnorm", "'rmsnorm'"),
    ("bias", True, lambda v: not v, "False (Llama has no linear biases)"),
    ("qkv_bias", False, lambda v: not v, "False (Llama has no QKV bias)"),
    ("activation", "gelu", lambda v: v in ("swiglu", "fast-swiglu"), "'swiglu' or 'fast-swiglu'"),
    ("openai_gelu", False, lambda v: not v, "False (it overrides the activation)"),
    ("position_embedding_type", "learned_absolute", lambda v: v == "rope", "'rope'"),
    ("rotary_percentage", 1.0, lambda v: float(v) == 1.0, "1.0 (Llama rotates the whole head)"),
    ("rotary_interleaved", False, lambda v: not v, "False (HF Llama rotates halves, not interleaved pairs)"),
    ("seq_len_interpolation_factor", None, lambda v: v is None, "null (no linear RoPE interpolation)"),
    ("scale_positional_embedding", False, lambda v: not v, "False (Llama-3.1 RoPE scaling is not exported)"),
    ("transformer_block_type", "pre_ln", lambda v: v == "pre_ln", "'pre_ln'"),
    ("normalize_attention_scores", True, lambda v: bool(v), "True (softmax scale 1/sqrt(head_dim))"),
    ("apply_embedding_scaling", False, lambda v: not v, "False"),
    ("qk_layernorm", False, lambda v: not v, "False"),
    ("num_moe_experts", None, lambda v: not v, "null (dense MLP)"),
    ("multi_latent_attention", False, lambda v: not v, "False"),
    ("window_size", None, lambda v: v is None, "null (full causal attention)"),
    ("layernorm_zero_centered_gamma", False, lambda v: not v, "False"),
)

_SKIPPED_SUFFIXES = ("._extra_state", "rotary_pos_emb.inv_freq")


def _check_llama_expressible(model_cfg: Any) -> None:
    bad = []
    for key, default, ok, want in _REQUIRED:
        value = model_cfg.get(key, default)
        if not ok(value):
            bad.append(f"{key}={value!r} (needs {want})")
    softcap = (model_cfg.get("mcore_customization_config", None) or {}).get("final_logit_softcapping", 0)
    if softcap:
        bad.append(f"mcore_customization_config.final_logit_softcapping={softcap!r} (needs 0)")
    if bad:
        raise TiedLoraConfigError(
            "the NeMo model cannot be expressed as a Hugging Face LlamaForCausalLM: " + "; ".join(bad) + ". Only "
            "Llama-style bases (RMSNorm, SwiGLU, RoPE, no biases) are exported"
        )


def _normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Plain megatron GPT keys: wrapper prefixes and adapters dropped, the TiedLoraQKV wrapper read through."""
    prefix = next((k[: -len("embedding.word_embeddings.weight")] for k in state_dict
                   if k.endswith("embedding.word_embeddings.weight")), None)
    if prefix is None:
        raise TiedLoraCheckpointError(
            "no 'embedding.word_embeddings.weight' in the state dict: pass model.model.state_dict() of a NeMo GPT "
            "(TP=1, PP=1)"
        )
    plain: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key.endswith(_SKIPPED_SUFFIXES) or ".adapter_layer." in f".{key}" or not isinstance(value, Tensor):
            continue  # TE/megatron extra state, and NeMo adapters (AdapterModuleMixin.adapter_layer) incl. tiedlora's
        plain[key.replace(".linear_qkv.base.", ".linear_qkv.")] = value  # TiedLoraQKV keeps the base as `.base`
    return plain


def nemo_gpt_to_hf_llama(state_dict: Mapping[str, Any], model_cfg: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(HF ``LlamaForCausalLM`` state dict, ``LlamaConfig`` kwargs) of a megatron-core GPT state dict.

    ``state_dict`` is the whole, unsharded (TP=1, PP=1) ``model.model.state_dict()``, as is: a ``model.`` /
    ``module.`` prefix, ``_extra_state`` entries and NeMo adapter tensors (``adapter_layer``, Tied-LoRA's shared
    owner included) are skipped, and a Tied-LoRA-wrapped ``linear_qkv.base.weight`` is read as the base
    ``linear_qkv.weight``, so the base exported is the frozen one without its adapter. Local-spec names
    (``input_layernorm``, ``pre_mlp_layernorm``) and TransformerEngine fused-norm names (``linear_qkv`` /
    ``linear_fc1.layer_norm_weight``) are both read. ``model_cfg`` is the NeMo model config (dict or DictConfig);
    unsupported settings raise :class:`TiedLoraConfigError` naming each key. The vocabulary is the padded one
    (the embedding's rows), so logits match NeMo's over every row.
    """
    _check_llama_expressible(model_cfg)
    src = _normalize_keys(state_dict)
    dims = _LlamaDims.of(model_cfg, vocab=int(src["embedding.word_embeddings.weight"].shape[0]))
    taker = _Taker(src)
    out = _llama_tensors(taker, dims)
    unused = sorted(set(src) - taker.used)
    if taker.missing or taker.wrong or unused:
        detail = "; ".join(
            part for part in (
                f"missing {taker.missing}" if taker.missing else "",
                f"wrong shapes {taker.wrong}" if taker.wrong else "",
                f"not expressible in LlamaForCausalLM {unused}" if unused else "",
            ) if part
        )
        raise TiedLoraCheckpointError(
            f"cannot convert the NeMo GPT state dict to LlamaForCausalLM: {detail}. Pass the whole model.model."
            f"state_dict() of a TP=1, PP=1 model whose config matches it (num_layers={dims.layers}, "
            f"hidden_size={dims.hidden}, heads={dims.heads}, query groups={dims.groups}, head_dim={dims.head_dim}, "
            f"ffn_hidden_size={dims.ffn})"
        )
    hf_state = {key: _owned(value.detach().cpu()) for key, value in out.items()}
    return hf_state, _llama_config(model_cfg, dims, dtype=src["embedding.word_embeddings.weight"].dtype)


@dataclass(frozen=True)
class _LlamaDims:
    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int  # the padded vocabulary (the embedding's rows), so logits match NeMo's over every row
    tied: bool

    @classmethod
    def of(cls, model_cfg: Any, *, vocab: int) -> "_LlamaDims":
        heads, hidden = int(model_cfg["num_attention_heads"]), int(model_cfg["hidden_size"])
        return cls(layers=int(model_cfg["num_layers"]), hidden=hidden, heads=heads,
                   groups=int(model_cfg.get("num_query_groups", None) or heads),
                   head_dim=int(model_cfg.get("kv_channels", None) or hidden // heads),
                   ffn=int(model_cfg["ffn_hidden_size"]), vocab=vocab,
                   tied=bool(model_cfg.get("share_embeddings_and_output_weights", True)))


class _Taker:
    """Takes source tensors by name (the first of several spellings present), checking shapes and recording what
    was used, missing or misshapen, so that one error can list every problem."""

    def __init__(self, src: Mapping[str, Tensor]):
        self.src, self.used, self.missing, self.wrong = src, set(), [], []

    def __call__(self, *names: str, shape: tuple[int, ...]) -> Optional[Tensor]:
        for name in names:
            if name in self.src:
                self.used.add(name)
                if tuple(self.src[name].shape) != shape:
                    self.wrong.append(f"{name} {tuple(self.src[name].shape)} != {shape}")
                    return None
                return self.src[name]
        self.missing.append(names[0])
        return None


def _llama_tensors(take: _Taker, dims: _LlamaDims) -> dict[str, Optional[Tensor]]:
    """LlamaForCausalLM's tensors from megatron-core GPT's: q/k/v de-interleaved, fc1 split into gate and up."""
    hidden = dims.hidden
    out: dict[str, Optional[Tensor]] = {
        "model.embed_tokens.weight": take("embedding.word_embeddings.weight", shape=(dims.vocab, hidden)),
    }
    qkv_rows = (dims.heads + 2 * dims.groups) * dims.head_dim
    for i in range(dims.layers):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}"
        norm1 = take(f"{m}.input_layernorm.weight", f"{m}.self_attention.linear_qkv.layer_norm_weight", shape=(hidden,))
        qkv = take(f"{m}.self_attention.linear_qkv.weight", shape=(qkv_rows, hidden))  # [ng (np/ng + 2) hn, d]
        proj = take(f"{m}.self_attention.linear_proj.weight", shape=(hidden, dims.heads * dims.head_dim))
        norm2 = take(f"{m}.pre_mlp_layernorm.weight", f"{m}.mlp.linear_fc1.layer_norm_weight", shape=(hidden,))
        fc1 = take(f"{m}.mlp.linear_fc1.weight", shape=(2 * dims.ffn, hidden))  # [gate; up] = [2 ffn, d]
        fc2 = take(f"{m}.mlp.linear_fc2.weight", shape=(hidden, dims.ffn))
        if any(t is None for t in (norm1, qkv, proj, norm2, fc1, fc2)):
            continue
        q, k, v = split_fused_qkv(qkv, num_attention_heads=dims.heads, num_query_groups=dims.groups,
                                  head_dim=dims.head_dim)
        gate, up = fc1.chunk(2, dim=0)  # megatron's glu: silu(first half) * second half
        out.update({
            f"{h}.input_layernorm.weight": norm1,
            f"{h}.self_attn.q_proj.weight": q,
            f"{h}.self_attn.k_proj.weight": k,
            f"{h}.self_attn.v_proj.weight": v,
            f"{h}.self_attn.o_proj.weight": proj,
            f"{h}.post_attention_layernorm.weight": norm2,
            f"{h}.mlp.gate_proj.weight": gate,
            f"{h}.mlp.up_proj.weight": up,
            f"{h}.mlp.down_proj.weight": fc2,
        })
    out["model.norm.weight"] = take("decoder.final_layernorm.weight", shape=(hidden,))
    if not dims.tied:
        out["lm_head.weight"] = take("output_layer.weight", shape=(dims.vocab, hidden))
    elif "output_layer.weight" in take.src:
        take.used.add("output_layer.weight")  # a pipeline-stage copy of the tied embedding: not a separate head
    return out


def _llama_config(model_cfg: Any, dims: _LlamaDims, *, dtype: torch.dtype) -> dict[str, Any]:
    """``LlamaConfig`` kwargs of the NeMo model config."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": dims.vocab,
        "hidden_size": dims.hidden,
        "intermediate_size": dims.ffn,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.groups,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(model_cfg.get("max_position_embeddings", None)
                                       or model_cfg.get("encoder_seq_length", 2048)),
        "rms_norm_eps": float(model_cfg.get("layernorm_epsilon", 1e-5)),
        "rope_theta": float(model_cfg.get("rotary_base", 10000)),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": dims.tied,
        "initializer_range": float(model_cfg.get("init_method_std", 0.02)),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def write_hf_model(
    out_dir: str | os.PathLike, state: Mapping[str, Tensor], config: Mapping[str, Any], *, overwrite: bool = False,
    files: Optional[Mapping[str, bytes]] = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (for ``LlamaForCausalLM.from_pretrained``), plus ``files``
    as they are (the tokenizer's, say), atomically."""
    return _write_hf_dir(out_dir, {HF_CONFIG_NAME: config}, {HF_WEIGHTS_NAME: state}, overwrite=overwrite,
                         files=files)


# Files ------------------------------------------------------------------------------------------------------


def _owned(tensor: Tensor) -> Tensor:
    """A contiguous copy with its own storage (safetensors refuses tensors that share memory)."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _write_hf_dir(
    out_dir: str | os.PathLike,
    json_files: Mapping[str, Mapping[str, Any]],
    safetensors_files: Mapping[str, Mapping[str, Tensor]],
    *,
    overwrite: bool,
    files: Optional[Mapping[str, bytes]] = None,
) -> Path:
    """Write the files into a temporary folder that replaces ``out_dir`` when complete (``fileio.atomic_directory``)."""
    from safetensors.torch import save_file

    with atomic_directory(out_dir, overwrite=overwrite) as directory:
        for name, data in (files or {}).items():
            (directory / name).write_bytes(data)
        for name, content in json_files.items():
            (directory / name).write_text(json.dumps(dict(content), indent=2, sort_keys=True) + "\n")
        for name, tensors in safetensors_files.items():
            seen: set[int] = set()
            plain: dict[str, Tensor] = {}
            for key, tensor in tensors.items():
                tensor = tensor.detach().cpu().contiguous()
                pointer = tensor.untyped_storage().data_ptr()
                plain[key] = _owned(tensor) if pointer in seen else tensor  # safetensors refuses shared storage
                seen.add(pointer)
            save_file(plain, str(directory / name), metadata={"format": "pt"})
    return Path(out_dir)

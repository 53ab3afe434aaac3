"""The pure HF -> NeMo mapping: config refusals, tensor bookkeeping, the QKV interleave and SwiGLU fc1 layout,
against hand-built references (no NeMo)."""

from __future__ import annotations

import pytest
import torch

from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError
from nemo_tiedlora.formats.hf.llama_to_nemo import nemo_model_config, nemo_state_dict, vocab_divisor
from nemo_tiedlora.formats.qkv_layout import fuse_qkv, split_fused_qkv

HD = 4
CFG = dict(model_type="llama", hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=32, tie_word_embeddings=False, hidden_act="silu")


def _checkpoint(cfg=CFG, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, f, v, heads, groups = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                              cfg["num_attention_heads"], cfg["num_key_value_heads"])
    hd = d // heads
    t = {"model.embed_tokens.weight": torch.randn(v, d, generator=g), "model.norm.weight": torch.randn(d, generator=g)}
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = torch.randn(v, d, generator=g)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                  "self_attn.q_proj.weight": (heads * hd, d), "self_attn.k_proj.weight": (groups * hd, d),
                  "self_attn.v_proj.weight": (groups * hd, d), "self_attn.o_proj.weight": (d, heads * hd),
                  "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
        if cfg["model_type"] == "qwen2":
            shapes.update({"self_attn.q_proj.bias": (heads * hd,), "self_attn.k_proj.bias": (groups * hd,),
                           "self_attn.v_proj.bias": (groups * hd,)})
        for name, shape in shapes.items():
            t[f"{p}.{name}"] = torch.randn(*shape, generator=g)
    return t


def _convert(cfg, tensors):
    return nemo_state_dict(cfg, list(tensors), tensors.__getitem__)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_fuse_qkv_builds_megatron_groups_by_hand_and_inverts_split(heads, groups):
    q = torch.arange(heads * HD * 3, dtype=torch.float32).reshape(heads * HD, 3)
    k = -torch.arange(groups * HD * 3, dtype=torch.float32).reshape(groups * HD, 3) - 1
    v = k - 1000
    fused = fuse_qkv(q, k, v, num_attention_heads=heads, num_query_groups=groups, head_dim=HD)
    per = heads // groups
    expected = []
    for g in range(groups):  # Megatron: for each group, its query heads, then k_g, then v_g
        expected += [q[(g * per + j) * HD:(g * per + j + 1) * HD] for j in range(per)]
        expected += [k[g * HD:(g + 1) * HD], v[g * HD:(g + 1) * HD]]
    assert torch.equal(fused, torch.cat(expected))
    back = split_fused_qkv(fused, num_attention_heads=heads, num_query_groups=groups, head_dim=HD)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_fuse_qkv_refuses_mismatched_shapes():
    with pytest.raises(TiedLoraCheckpointError, match="num_key_value_heads"):
        fuse_qkv(torch.zeros(16, 2), torch.zeros(4, 2), torch.zeros(8, 2), num_attention_heads=4,
                 num_query_groups=2, head_dim=HD)


def test_layout_of_every_tensor():
    tensors = _checkpoint()
    state = _convert(CFG, tensors)
    for i in range(2):
        h, m = f"model.layers.{i}", f"model.decoder.layers.{i}"
        assert torch.equal(state[f"{m}.mlp.linear_fc1.weight"],
                           torch.cat([tensors[f"{h}.mlp.gate_proj.weight"], tensors[f"{h}.mlp.up_proj.weight"]]))
        q, k, v = split_fused_qkv(state[f"{m}.self_attention.linear_qkv.weight"], num_attention_heads=4,
                                  num_query_groups=2, head_dim=HD)
        assert torch.equal(q, tensors[f"{h}.self_attn.q_proj.weight"])
        assert torch.equal(v, tensors[f"{h}.self_attn.v_proj.weight"])
        assert torch.equal(k, tensors[f"{h}.self_attn.k_proj.weight"])
        for ours, theirs in (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm"),
                             ("self_attention.linear_proj", "self_attn.o_proj"), ("mlp.linear_fc2", "mlp.down_proj")):
            assert state[f"{m}.{ours}.weight"] is tensors[f"{h}.{theirs}.weight"]  # not copied
    assert state["model.output_layer.weight"] is tensors["lm_head.weight"]
    assert len(state) == 3 + 2 * 6


def test_qwen2_biases_are_interleaved_like_the_weights():
    cfg = dict(CFG, model_type="qwen2", tie_word_embeddings=True)
    tensors = _checkpoint(cfg)
    state = _convert(cfg, tensors)
    bias = state["model.decoder.layers.1.self_attention.linear_qkv.bias"]
    q, k, v = split_fused_qkv(bias, num_attention_heads=4, num_query_groups=2, head_dim=HD)
    assert torch.equal(k, tensors["model.layers.1.self_attn.k_proj.bias"])
    assert "model.output_layer.weight" not in state and nemo_model_config(cfg)["qkv_bias"] is True


def test_every_tensor_used_once_missing_unused_and_wrong_shapes_in_one_error():
    tensors = _checkpoint()
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 16)
    tensors["model.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(TiedLoraCheckpointError) as error:
        _convert(CFG, tensors)
    message = str(error.value)
    assert "model.layers.1.mlp.up_proj.weight" in message and "k_proj.weight (3, 16)" in message
    assert "model.layers.0.extra.weight" in message and "config.json" in message


def test_a_tied_checkpoint_may_store_its_head_only_as_a_copy():
    cfg = dict(CFG, tie_word_embeddings=True)
    tensors = _checkpoint(cfg)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    assert "model.output_layer.weight" not in _convert(cfg, tensors)
    tensors["lm_head.weight"] += 1
    with pytest.raises(TiedLoraCheckpointError, match="differs from model.embed_tokens"):
        _convert(cfg, tensors)


@pytest.mark.parametrize("change,match", [
    (dict(model_type="gpt2"), "supported: llama"),
    (dict(model_type="gemma"), "mistral .*qwen2"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
    (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_inexpressible_configs_are_refused(change, match):
    with pytest.raises(TiedLoraConfigError, match=match):
        nemo_model_config(dict(CFG, **change))


def test_rope_scaling_that_nemo_expresses():
    linear = nemo_model_config(dict(CFG, rope_scaling={"type": "linear", "factor": 4.0}))
    assert linear["seq_len_interpolation_factor"] == 4.0
    llama3 = nemo_model_config(dict(CFG, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192}))
    assert llama3["scale_positional_embedding"] and llama3["old_context_len"] == 8192 and llama3["scale_factor"] == 8


def test_vocab_divisor_pads_the_tokenizer_to_the_embedding_rows():
    assert vocab_divisor(49152, 49152) == 128
    assert vocab_divisor(151646, 151936) == 1187  # Qwen2: 151936 = 128 * 1187 rows for 151646 tokens
    assert vocab_divisor(100, 104) == 8 and vocab_divisor(100, 150) == 75 and vocab_divisor(100, 100) == 1
    with pytest.raises(TiedLoraCheckpointError, match="does not belong"):
        vocab_divisor(300, 256)

"""HF export as pure state-dict transforms (no NeMo): the fused-QKV split, per-layer LoRA, PEFT keys, atomic writes.

References are built here by hand: fused QKV rows assembled head by head in Megatron's group order, and the
merged update written with explicit diagonal matrices (docs/design.md sections 1 and 4).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError
from nemo_tiedlora.formats.hf.nemo_to_hf import hf_peft_adapter, nemo_gpt_to_hf_llama, write_hf_model, write_hf_peft
from nemo_tiedlora.formats.merge_delta import per_layer_lora
from nemo_tiedlora.formats.qkv_layout import split_fused_qkv

HD = 8
SHAPE = dict(hidden_size=32, num_layers=3, num_attention_heads=4, num_query_groups=2, kv_channels=HD,
             out_features=32 + 2 * 2 * HD)  # GQA: 64, not 3d


def fuse_by_hand(q_heads: list, k_heads: list, v_heads: list) -> torch.Tensor:
    """Megatron's layout written out: for each group g, its query heads, then k_g, then v_g."""
    per_group = len(q_heads) // len(k_heads)
    blocks = []
    for g in range(len(k_heads)):
        blocks += q_heads[g * per_group:(g + 1) * per_group] + [k_heads[g], v_heads[g]]
    return torch.cat(blocks, dim=0)


def hand_qkv_rows(heads: int, groups: int, hd: int) -> tuple[list[int], list[int], list[int]]:
    """Fused row indices of q, k, v in HF order, by walking the fused layout."""
    per_group = heads // groups
    q, k, v = [], [], []
    row = 0
    for _ in range(groups):
        for _ in range(per_group):
            q += list(range(row, row + hd))
            row += hd
        k += list(range(row, row + hd))
        row += hd
        v += list(range(row, row + hd))
        row += hd
    return q, k, v


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1), (8, 2)], ids=["gqa", "mha", "mqa", "gqa8"])
@pytest.mark.parametrize("trailing", [(5,), (3,), ()], ids=["weight", "lora_b", "vector"])
def test_split_fused_qkv_recovers_hand_built_blocks(heads, groups, trailing):
    hd = 3
    gen = torch.Generator().manual_seed(heads * 10 + groups)
    q_heads = [torch.randn(hd, *trailing, generator=gen) for _ in range(heads)]
    k_heads = [torch.randn(hd, *trailing, generator=gen) for _ in range(groups)]
    v_heads = [torch.randn(hd, *trailing, generator=gen) for _ in range(groups)]
    fused = fuse_by_hand(q_heads, k_heads, v_heads)
    q, k, v = split_fused_qkv(fused, num_attention_heads=heads, num_query_groups=groups, head_dim=hd)
    assert torch.equal(q, torch.cat(q_heads))
    assert torch.equal(k, torch.cat(k_heads))
    assert torch.equal(v, torch.cat(v_heads))


def test_split_fused_qkv_refuses_a_shard():
    with pytest.raises(TiedLoraCheckpointError, match="expected 64 fused QKV rows"):
        split_fused_qkv(torch.zeros(32, 4), num_attention_heads=4, num_query_groups=2, head_dim=HD)
    with pytest.raises(TiedLoraConfigError, match="groups must divide"):
        split_fused_qkv(torch.zeros(64, 4), num_attention_heads=4, num_query_groups=3, head_dim=HD)


def random_state(cfg: TiedLoraConfig, *, layers=(1, 2, 3), d=32, out=64, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = cfg.rank
    state = {}
    if cfg.flags.tied:
        state["A"], state["B"] = torch.randn(r, d, generator=gen), torch.randn(out, r, generator=gen)
    for n in layers:
        if not cfg.flags.tied:
            state[f"layers.{n}.A"] = torch.randn(r, d, generator=gen)
            state[f"layers.{n}.B"] = torch.randn(out, r, generator=gen)
        state[f"layers.{n}.u"] = torch.randn(r, generator=gen)
        state[f"layers.{n}.v"] = torch.randn(out, generator=gen)
    return state


def naive_delta(state, cfg, n) -> torch.Tensor:
    a = state["A"] if cfg.flags.tied else state[f"layers.{n}.A"]
    b = state["B"] if cfg.flags.tied else state[f"layers.{n}.B"]
    u, v = state[f"layers.{n}.u"], state[f"layers.{n}.v"]
    return cfg.scale * torch.diag(v) @ b @ torch.diag(u) @ a  # [out, d]


@pytest.mark.parametrize("preset", ["tl6", "lora", "vera"])
def test_per_layer_lora_equals_the_merged_update(preset):
    cfg = TiedLoraConfig(preset=preset, rank=4, alpha=8)
    state = random_state(cfg)
    factors = per_layer_lora(state, cfg)
    assert sorted(factors) == [1, 2, 3]
    for n, (a_l, b_l) in factors.items():
        assert a_l.shape == (4, 32) and b_l.shape == (64, 4)
        torch.testing.assert_close(b_l @ a_l, naive_delta(state, cfg, n), rtol=1e-5, atol=1e-5)


def test_per_layer_lora_reports_every_bad_key_at_once():
    tied = TiedLoraConfig(preset="tl6", rank=4)
    untied_state = random_state(TiedLoraConfig(preset="lora", rank=4))
    with pytest.raises(TiedLoraCheckpointError) as info:
        per_layer_lora({**untied_state, "stray": torch.zeros(1)}, tied)
    message = str(info.value)
    assert "stray" in message and "untied adapter" in message and "missing keys ['A', 'B']" in message
    bad_rank = random_state(tied)
    with pytest.raises(TiedLoraCheckpointError, match="do not match rank 2"):
        per_layer_lora(bad_rank, TiedLoraConfig(preset="tl6", rank=2))


@pytest.mark.parametrize("preset,selection", [("tl6", None), ("lora", None), ("tl6", (1, 3))])
def test_hf_peft_adapter_keys_config_and_values(preset, selection):
    cfg = TiedLoraConfig(preset=preset, rank=4, alpha=8, layer_selection=selection)
    layers = selection or (1, 2, 3)
    state = random_state(cfg, layers=layers)
    config, tensors = hf_peft_adapter(state, cfg, SHAPE, base_model_name_or_path="base")

    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == 4 and config["lora_alpha"] == 4  # alpha / r = 2 is folded into lora_B
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "base"
    assert config["layers_to_transform"] == (None if selection is None else [n - 1 for n in selection])
    expected_keys = {
        f"base_model.model.model.layers.{n - 1}.self_attn.{m}_proj.lora_{ab}.weight"
        for n in layers for m in "qkv" for ab in "AB"
    }
    assert set(tensors) == expected_keys
    pointers = [t.untyped_storage().data_ptr() for t in tensors.values()]
    assert len(set(pointers)) == len(pointers)  # every tensor owns its storage (safetensors requirement)

    q_rows, k_rows, v_rows = hand_qkv_rows(4, 2, HD)
    for n in layers:
        prefix = f"base_model.model.model.layers.{n - 1}.self_attn"
        delta = naive_delta(state, cfg, n)  # [64, 32] in Megatron's fused order
        for m, rows in zip("qkv", (q_rows, k_rows, v_rows)):
            lora_a, lora_b = tensors[f"{prefix}.{m}_proj.lora_A.weight"], tensors[f"{prefix}.{m}_proj.lora_B.weight"]
            assert lora_a.shape == (4, 32) and lora_b.shape == (len(rows), 4)
            torch.testing.assert_close(lora_b @ lora_a, delta[rows], rtol=1e-5, atol=1e-5)


def test_hf_peft_adapter_refuses_a_partial_or_misshapen_state():
    cfg = TiedLoraConfig(preset="tl6", rank=4)
    with pytest.raises(TiedLoraCheckpointError, match="gather_adapter_state"):
        hf_peft_adapter(random_state(cfg, layers=(1, 2)), cfg, SHAPE)  # one pipeline stage's layers only
    with pytest.raises(TiedLoraCheckpointError, match="fused QKV width 64"):
        hf_peft_adapter(random_state(cfg, out=96), cfg, SHAPE)  # an MHA adapter on a GQA base


def test_write_hf_peft_round_trip_and_refuses_an_existing_dir(tmp_path):
    cfg = TiedLoraConfig(preset="tl6", rank=4)
    config, tensors = hf_peft_adapter(random_state(cfg), cfg, SHAPE)
    out = write_hf_peft(tmp_path / "adapter", config, tensors)
    assert json.loads((out / "adapter_config.json").read_text()) == config
    loaded = load_file(str(out / "adapter_model.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    before = (out / "adapter_config.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_hf_peft(out, {"r": 1}, tensors)
    assert (out / "adapter_config.json").read_text() == before  # untouched

    write_hf_peft(out, {**config, "r": 4, "note": "second"}, tensors, overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary or old directories left

    with pytest.raises(AttributeError):
        write_hf_peft(tmp_path / "broken", config, {"x": object()})  # fails while writing the weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing half-written under the final name


def test_exported_folders_are_readable_by_other_users(tmp_path):
    """A server often runs as another user: every exported file is mode 0644 and the folder 0755 (safetensors alone
    would create its file 0600), tokenizer files passed to the base writer included."""
    import stat

    cfg = TiedLoraConfig(preset="tl6", rank=4)
    config, tensors = hf_peft_adapter(random_state(cfg), cfg, SHAPE)
    adapter = write_hf_peft(tmp_path / "adapter", config, tensors)
    base = write_hf_model(tmp_path / "base", {"w": torch.ones(2)}, {"model_type": "llama"},
                          files={"tokenizer.json": b"{}"})
    for folder, names in ((adapter, {"adapter_config.json", "adapter_model.safetensors"}),
                          (base, {"config.json", "model.safetensors", "tokenizer.json"})):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == dict.fromkeys(names, 0o644)


# Base model ------------------------------------------------------------------------------------------------------

LLAMA_CFG = dict(mcore_gpt=True, num_layers=2, hidden_size=32, ffn_hidden_size=20, num_attention_heads=4,
                 num_query_groups=2, kv_channels=None, normalization="rmsnorm", bias=False, activation="fast-swiglu",
                 position_embedding_type="rope", rotary_percentage=1.0, share_embeddings_and_output_weights=False,
                 layernorm_epsilon=1e-6, rotary_base=500000, max_position_embeddings=128)
VOCAB = 256  # padded


def megatron_state(cfg: dict, *, wrapped: bool, seed: int = 0) -> dict:
    """A megatron-core local-spec GPT state dict, optionally with Tied-LoRA's wrapper and adapter tensors."""
    gen = torch.Generator().manual_seed(seed)
    d, ffn = cfg["hidden_size"], cfg["ffn_hidden_size"]
    out = d + 2 * 2 * HD
    state = {"embedding.word_embeddings.weight": torch.randn(VOCAB, d, generator=gen)}
    for i in range(cfg["num_layers"]):
        m = f"decoder.layers.{i}"
        qkv = f"{m}.self_attention.linear_qkv" + (".base" if wrapped else "")
        state.update({
            f"{m}.input_layernorm.weight": torch.randn(d, generator=gen),
            f"{qkv}.weight": torch.randn(out, d, generator=gen),
            f"{qkv}._extra_state": None,
            f"{m}.self_attention.linear_proj.weight": torch.randn(d, d, generator=gen),
            f"{m}.pre_mlp_layernorm.weight": torch.randn(d, generator=gen),
            f"{m}.mlp.linear_fc1.weight": torch.randn(2 * ffn, d, generator=gen),
            f"{m}.mlp.linear_fc2.weight": torch.randn(d, ffn, generator=gen),
        })
        if wrapped:
            state[f"{m}.self_attention.linear_qkv.adapter_layer.tiedlora.vec_u"] = torch.ones(4)
    state["decoder.final_layernorm.weight"] = torch.randn(d, generator=gen)
    if not cfg["share_embeddings_and_output_weights"]:
        state["output_layer.weight"] = torch.randn(VOCAB, d, generator=gen)
    if wrapped:
        state["tiedlora_shared.adapter_layer.tiedlora.lora_a"] = torch.zeros(4, d)
    return state


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "tiedlora_wrapped"])
@pytest.mark.parametrize("tied_embeddings", [False, True])
def test_nemo_gpt_to_hf_llama_maps_every_tensor(wrapped, tied_embeddings, tmp_path):
    cfg = {**LLAMA_CFG, "share_embeddings_and_output_weights": tied_embeddings}
    src = megatron_state(cfg, wrapped=wrapped)
    state, config = nemo_gpt_to_hf_llama({f"model.{k}": v for k, v in src.items()}, cfg)  # a `model.` prefix is fine

    assert config["vocab_size"] == VOCAB and config["num_key_value_heads"] == 2 and config["head_dim"] == HD
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 500000.0
    assert config["intermediate_size"] == 20 and config["tie_word_embeddings"] is tied_embeddings
    assert ("lm_head.weight" in state) is (not tied_embeddings)
    qkv_key = "decoder.layers.1.self_attention.linear_qkv" + (".base" if wrapped else "") + ".weight"
    q_rows, k_rows, v_rows = hand_qkv_rows(4, 2, HD)
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], src[qkv_key][q_rows])
    assert torch.equal(state["model.layers.1.self_attn.k_proj.weight"], src[qkv_key][k_rows])
    assert torch.equal(state["model.layers.1.self_attn.v_proj.weight"], src[qkv_key][v_rows])
    fc1 = src["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(state["model.layers.1.mlp.gate_proj.weight"], fc1[:20])
    assert torch.equal(state["model.layers.1.mlp.up_proj.weight"], fc1[20:])
    assert torch.equal(state["model.layers.1.post_attention_layernorm.weight"],
                       src["decoder.layers.1.pre_mlp_layernorm.weight"])
    assert len(state) == 2 + 9 * 2 + (0 if tied_embeddings else 1)

    out = write_hf_model(tmp_path / "hf", state, config)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert load_file(str(out / "model.safetensors")).keys() == state.keys()


@pytest.mark.parametrize("key,value", [
    ("normalization", "layernorm"), ("bias", True), ("activation", "gelu"), ("rotary_interleaved", True),
    ("position_embedding_type", "learned_absolute"), ("rotary_percentage", 0.5), ("qkv_bias", True),
])
def test_nemo_gpt_to_hf_llama_refuses_what_llama_cannot_express(key, value):
    cfg = {**LLAMA_CFG, key: value}
    with pytest.raises(TiedLoraConfigError, match=f"{key}="):
        nemo_gpt_to_hf_llama(megatron_state(LLAMA_CFG, wrapped=False), cfg)


def test_nemo_gpt_to_hf_llama_lists_stray_missing_and_misshapen_tensors():
    src = megatron_state(LLAMA_CFG, wrapped=False)
    src["decoder.layers.0.self_attention.linear_proj.bias"] = torch.zeros(32)
    del src["decoder.layers.1.mlp.linear_fc2.weight"]
    src["decoder.layers.0.mlp.linear_fc1.weight"] = torch.zeros(20, 32)  # a TP shard
    with pytest.raises(TiedLoraCheckpointError) as info:
        nemo_gpt_to_hf_llama(src, LLAMA_CFG)
    message = str(info.value)
    assert "linear_proj.bias" in message and "layers.1.mlp.linear_fc2.weight" in message
    assert "linear_fc1.weight (20, 32) != (40, 32)" in message

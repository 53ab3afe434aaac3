"""Base conversion without NeMo: layouts, Megatron's TP split rules written out by hand, archive errors.

(NeMo loading the converted archives at their layout, with the original logits, is
tests/distributed/test_convert_merge.py.)
"""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from nemo_tiedlora.nemo.base_archive import BaseCheckpoint, checkpoint_format, read_base, write_legacy
from nemo_tiedlora.formats.reshard import layout_for, shard, unshard
from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError

D, FFN, HEADS, GROUPS, HEAD_DIM, VOCAB = 8, 12, 4, 2, 2, 10
QKV = D + 2 * GROUPS * HEAD_DIM


def cfg(num_layers=4, **extra):
    values = dict(num_layers=num_layers, hidden_size=D, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                  num_query_groups=GROUPS, activation="fast-swiglu", make_vocab_size_divisible_by=4,
                  share_embeddings_and_output_weights=False, tensor_model_parallel_size=1,
                  pipeline_model_parallel_size=1)
    values.update(extra)
    return OmegaConf.create(values)


def global_state(num_layers=4, vocab_rows=12):
    g = torch.Generator().manual_seed(0)
    state = {"model.embedding.word_embeddings.weight": torch.randn(vocab_rows, D, generator=g),
             "model.decoder.final_layernorm.weight": torch.randn(D, generator=g),
             "model.output_layer.weight": torch.randn(vocab_rows, D, generator=g),
             "model.output_layer._extra_state": None}
    for i in range(num_layers):
        p = f"model.decoder.layers.{i}."
        state.update({p + "input_layernorm.weight": torch.randn(D, generator=g),
                      p + "self_attention.linear_qkv.weight": torch.randn(QKV, D, generator=g),
                      p + "self_attention.linear_proj.weight": torch.randn(D, D, generator=g),
                      p + "pre_mlp_layernorm.weight": torch.randn(D, generator=g),
                      p + "mlp.linear_fc1.weight": torch.randn(2 * FFN, D, generator=g),
                      p + "mlp.linear_fc2.weight": torch.randn(D, FFN, generator=g)})
    return state


def test_layouts_even_uneven_and_impossible():
    assert layout_for(cfg(), 2, 2).stage_layers == (2, 2)
    assert layout_for(cfg(), 1, 2, first_stage_layers=3).stage_layers == (3, 1)
    assert layout_for(cfg(num_layers=6), 1, 3, first_stage_layers=2, last_stage_layers=1).stage_layers == (2, 3, 1)
    assert layout_for(cfg(), 1, 2, first_stage_layers=3).offsets == (0, 3)
    with pytest.raises(TiedLoraConfigError, match="num_layers=4 cannot be split over PP=3"):
        layout_for(cfg(), 1, 3)
    with pytest.raises(TiedLoraConfigError, match="ffn_hidden_size=12 is not divisible by TP=8") as error:
        layout_for(cfg(), 8, 1)
    assert "num_query_groups=2 is not divisible by TP=8" in str(error.value)  # every problem in one message
    with pytest.raises(TiedLoraConfigError, match="TP=0"):
        layout_for(cfg(), 0, 1)


def test_shards_follow_megatrons_split_rules():
    state, c = global_state(), cfg()
    layout = layout_for(c, 2, 2, first_stage_layers=3)  # stages: layers 0-2 | 3
    rows = 16  # vocab 10 padded to a multiple of 4 * TP=2
    last = shard(state, c, layout, 1, 1, vocab_rows=rows)
    first = shard(state, c, layout, 0, 0, vocab_rows=rows)
    # local layer numbering per stage; embedding on the first stage, final norm + output layer on the last
    assert {k.split(".")[3] for k in last if k.startswith("model.decoder.layers.")} == {"0"}
    assert "model.embedding.word_embeddings.weight" in first and "model.output_layer.weight" not in first
    assert "model.output_layer.weight" in last and "model.embedding.word_embeddings.weight" not in last
    g = "model.decoder.layers.3."
    # column parallel: rows split; the gated fc1 splits gate and up halves separately (rank 1: gate[6:12], up[6:12])
    torch.testing.assert_close(last["model.decoder.layers.0.self_attention.linear_qkv.weight"],
                               state[g + "self_attention.linear_qkv.weight"][QKV // 2:])
    fc1 = state[g + "mlp.linear_fc1.weight"]
    torch.testing.assert_close(last["model.decoder.layers.0.mlp.linear_fc1.weight"],
                               torch.cat([fc1[6:12], fc1[FFN + 6:FFN + 12]]))
    # row parallel: columns split
    torch.testing.assert_close(last["model.decoder.layers.0.mlp.linear_fc2.weight"],
                               state[g + "mlp.linear_fc2.weight"][:, 6:])
    torch.testing.assert_close(last["model.decoder.layers.0.self_attention.linear_proj.weight"],
                               state[g + "self_attention.linear_proj.weight"][:, D // 2:])
    # replicated
    torch.testing.assert_close(last["model.decoder.final_layernorm.weight"],
                               state["model.decoder.final_layernorm.weight"])
    # vocabulary padded with zero rows to 16, rank 1 holds rows 8..15
    out = last["model.output_layer.weight"]
    assert out.shape == (8, D)
    torch.testing.assert_close(out[:4], state["model.output_layer.weight"][8:12])
    assert float(out[4:].abs().sum()) == 0.0
    assert last["model.output_layer._extra_state"] is None
    # clones, not views of the global tensors (a view would save its whole storage)
    assert out.untyped_storage().data_ptr() != state["model.output_layer.weight"].untyped_storage().data_ptr()


def test_unshard_inverts_shard_and_refuses_unknown_tp_differences():
    state, c = global_state(vocab_rows=16), cfg()
    layout = layout_for(c, 2, 2)
    shards = {(t, p): shard(state, c, layout, t, p, vocab_rows=16) for t in range(2) for p in range(2)}
    back = unshard(shards, c, layout)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        if value is not None:
            assert torch.equal(back[key], value), key
    key = "model.decoder.layers.0.input_layernorm.weight"
    shards[(1, 0)][key] = shards[(1, 0)][key] + 1.0  # a replicated tensor that differs between TP ranks
    with pytest.raises(TiedLoraCheckpointError, match="input_layernorm.weight differs between tensor-parallel ranks"):
        unshard(shards, c, layout)


def test_tied_embeddings_last_stage_gets_the_embedding():
    c = cfg(share_embeddings_and_output_weights=True)
    state = global_state(vocab_rows=16)
    del state["model.output_layer.weight"], state["model.output_layer._extra_state"]
    layout = layout_for(c, 1, 2)
    last = shard(state, c, layout, 0, 1, vocab_rows=16)
    torch.testing.assert_close(last["model.output_layer.weight"], state["model.embedding.word_embeddings.weight"])
    shards = {(0, p): shard(state, c, layout, 0, p, vocab_rows=16) for p in range(2)}
    assert sorted(unshard(shards, c, layout)) == sorted(state)


def test_legacy_archive_round_trip_and_bad_archives(tmp_path):
    state, c = global_state(vocab_rows=12), cfg()
    base = BaseCheckpoint(c, state, "legacy", layout_for(c, 1, 1), {"tokenizer.model": b"x"})
    out = write_legacy(base, tmp_path / "l.nemo", layout_for(c, 2, 2), vocab_size=VOCAB)
    assert checkpoint_format(out) == "legacy"
    again = read_base(out)
    assert again.source.tp == 2 and again.source.pp == 2 and again.artifacts == {"tokenizer.model": b"x"}
    for key, value in state.items():
        if value is not None:
            expected = value if "vocab" not in key and "embedding" not in key and "output_layer" not in key \
                else torch.cat([value, torch.zeros(16 - 12, D)])
            assert torch.equal(again.state[key], expected), key
    with pytest.raises(TiedLoraCheckpointError, match="exists"):
        write_legacy(base, out, layout_for(c, 1, 1), vocab_size=VOCAB)
    # truncated
    truncated = tmp_path / "truncated.nemo"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 3])
    with pytest.raises(TiedLoraCheckpointError, match="truncated or corrupt"):
        read_base(truncated)
    # garbage
    garbage = tmp_path / "garbage.nemo"
    garbage.write_bytes(b"not a tar file" * 100)
    with pytest.raises(TiedLoraCheckpointError, match="not a readable NeMo .nemo archive"):
        read_base(garbage)
    # a rank file missing
    missing = tmp_path / "missing.nemo"
    with tarfile.open(out) as src, tarfile.open(missing, "w") as dst:
        for member in src.getmembers():
            if "tp_rank_01_pp_rank_001" not in member.name:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    with pytest.raises(TiedLoraCheckpointError, match="missing tp_rank_01_pp_rank_001/model_weights.ckpt"):
        read_base(missing)
    with pytest.raises(TiedLoraCheckpointError, match="does not exist"):
        read_base(tmp_path / "nothing.nemo")


def test_no_half_written_archive_when_a_write_fails(tmp_path, monkeypatch):
    state, c = global_state(vocab_rows=12), cfg()
    base = BaseCheckpoint(c, state, "legacy", layout_for(c, 1, 1), {})
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:
            raise OSError("disk full")
        return io.BytesIO()

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_legacy(base, tmp_path / "out.nemo", layout_for(c, 2, 2), vocab_size=VOCAB)
    assert list(tmp_path.iterdir()) == []

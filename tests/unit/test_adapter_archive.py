"""The adapter archive: round trip, atomic writes, and every bad input as a clear TiedLoraCheckpointError."""

from __future__ import annotations

import tarfile

import pytest
import torch

from nemo_tiedlora.formats.adapter_archive import (
    expected_keys, is_tiedlora_archive, load_archive, save_archive, check_base_shape)
from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraCheckpointError

SHAPE = dict(hidden_size=16, num_layers=3, num_attention_heads=4, num_query_groups=2, kv_channels=4, out_features=32)


def _state(config: TiedLoraConfig, shape=SHAPE, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = {"A": (config.rank, shape["hidden_size"]), "B": (shape["out_features"], config.rank),
             "u": (config.rank,), "v": (shape["out_features"],)}
    keys = ["A", "B"] if config.flags.tied else []
    for n in range(1, shape["num_layers"] + 1):
        keys += ([] if config.flags.tied else [f"layers.{n}.A", f"layers.{n}.B"]) + [f"layers.{n}.u", f"layers.{n}.v"]
    return {k: torch.randn(sizes[k.rsplit(".", 1)[-1]], generator=g) for k in keys}


@pytest.mark.parametrize("preset", ["tl6", "lora", "vera"])
def test_round_trip_and_size(preset, tmp_path):
    config = TiedLoraConfig(preset=preset, rank=4, alpha=8)
    state = _state(config)
    assert sorted(state) == sorted(expected_keys(config, 3))
    path = save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=state, model_config_yaml="x: 1\n")
    assert is_tiedlora_archive(path)
    loaded = load_archive(path)
    assert loaded.config == config and loaded.shape == SHAPE and loaded.model_config_yaml == "x: 1\n"
    assert all(torch.equal(loaded.tensors[k], v) for k, v in state.items())
    raw = sum(t.numel() * t.element_size() for t in state.values())
    assert path.stat().st_size <= 1.05 * raw + 64 * 1024  # the stored tensors and a few KB


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    config = TiedLoraConfig(rank=4)
    path = save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=_state(config))
    with pytest.raises(TiedLoraCheckpointError, match="exists.*overwrite"):
        save_archive(path, config=config, shape=SHAPE, tensors=_state(config), overwrite=False)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    config = TiedLoraConfig(rank=4)
    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(tarfile.TarFile, "addfile", boom)
    with pytest.raises(OSError):
        save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=_state(config))
    assert list(tmp_path.iterdir()) == []  # no archive, no partial file


def test_truncated_and_corrupt_archives(tmp_path):
    config = TiedLoraConfig(rank=4)
    path = save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=_state(config))
    data = path.read_bytes()
    truncated = tmp_path / "t.nemo"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(TiedLoraCheckpointError, match="truncated or corrupt|lacks|damaged"):
        load_archive(truncated)
    garbage = tmp_path / "g.nemo"
    garbage.write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(TiedLoraCheckpointError):
        load_archive(garbage)
    with pytest.raises(TiedLoraCheckpointError, match="no such adapter file"):
        load_archive(tmp_path / "missing.nemo")


def test_missing_and_unexpected_keys_in_one_error(tmp_path):
    config = TiedLoraConfig(rank=4)
    state = _state(config)
    del state["A"], state["layers.2.v"]
    state["layers.9.u"] = torch.zeros(4)
    state["B"] = torch.zeros(5, 4)
    with pytest.raises(TiedLoraCheckpointError) as error:
        save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=state)
    message = str(error.value)
    for word in ("'A'", "'layers.2.v'", "'layers.9.u'", "B: (5, 4) != (32, 4)"):
        assert word in message, message


def test_other_base_shape_names_both_shapes():
    other = dict(SHAPE, hidden_size=32)
    with pytest.raises(TiedLoraCheckpointError) as error:
        check_base_shape(SHAPE, other)
    assert "hidden_size=16" in str(error.value) and "hidden_size=32" in str(error.value)

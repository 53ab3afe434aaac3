"""Gradient anomalies and non-finite archives: a NaN/Inf adapter gradient stops the step with a clear error naming
the parameter; NaN/Inf factors are never written to, or loaded from, an adapter archive."""

from __future__ import annotations

import pytest
import torch

from nemo_tiedlora.core.anomaly import check_finite_grads, non_finite_grads
from nemo_tiedlora.formats.adapter_archive import load_archive, save_archive
from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraGradientError
from nemo_tiedlora.core.modules import REPLICA_TAG
from tests.unit.test_adapter_archive import SHAPE, _state


def _chunk() -> torch.nn.Module:
    chunk = torch.nn.Module()
    chunk.base = torch.nn.Linear(4, 4)  # not an adapter parameter: its gradient is not the adapter's business
    chunk.lora_a = torch.nn.Parameter(torch.zeros(2, 4))
    chunk.vec_u = torch.nn.Parameter(torch.zeros(2))
    for param in (chunk.lora_a, chunk.vec_u):
        setattr(param, REPLICA_TAG, "model")
        param.grad = torch.zeros_like(param)
    chunk.base.weight.grad = torch.full_like(chunk.base.weight, float("nan"))
    return chunk


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_adapter_gradient_stops_the_step(bad):
    chunk = _chunk()
    check_finite_grads([chunk], step=0)  # finite adapter grads pass (the base's NaN is not looked at)
    chunk.vec_u.grad[1] = bad
    assert non_finite_grads([chunk]) == ["vec_u"]
    with pytest.raises(TiedLoraGradientError, match=r"optimizer step 5 in \['vec_u'\] on rank 0.*resume_if_exists"):
        check_finite_grads([chunk], step=4)


def test_main_grad_is_the_gradient_checked():
    chunk = _chunk()
    chunk.lora_a.main_grad = torch.zeros_like(chunk.lora_a)
    chunk.lora_a.main_grad[0, 0] = float("nan")  # megatron DDP's buffer, what the optimizer reads
    assert non_finite_grads([chunk]) == ["lora_a"]


def test_nan_factors_are_never_written_or_loaded(tmp_path, monkeypatch):
    config = TiedLoraConfig(rank=4)
    state = _state(config)
    state["layers.2.v"][3] = float("nan")
    state["B"][0, 0] = float("inf")
    with pytest.raises(TiedLoraCheckpointError, match=r"refusing to write .*non-finite .*\['B', 'layers\.2\.v'\]"):
        save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=state)
    assert list(tmp_path.iterdir()) == []
    # an archive that holds them anyway (written by an older version, or edited) is refused on load
    import nemo_tiedlora.formats.adapter_archive as checkpoint

    monkeypatch.setattr(checkpoint, "check_finite", lambda tensors, where: None)
    path = save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=state)
    monkeypatch.undo()
    with pytest.raises(TiedLoraCheckpointError, match=r"a\.nemo: non-finite .*\['B', 'layers\.2\.v'\].*diverged"):
        load_archive(path)
    assert torch.isnan(load_archive(path, finite=False).tensors["layers.2.v"][3])  # inspect still reads it


def test_partial_left_by_a_killed_save_is_removed_by_the_next_save(tmp_path):
    config = TiedLoraConfig(rank=4)
    stale = tmp_path / ".a.nemo.k1ll3d.partial"  # what SIGKILL during save_archive leaves
    stale.write_bytes(b"half an archive")
    other = tmp_path / ".b.nemo.x.partial"  # another file's: not ours to remove
    other.write_bytes(b"x")
    save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=_state(config))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.nemo.x.partial", "a.nemo"]

"""nemo_tiedlora.nemo.preflight without a model: archive checks and the clean-up of checkpoints a kill cut short."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nemo_tiedlora.formats.adapter_archive import save_archive
from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraCheckpointError
from nemo_tiedlora.nemo.preflight import check_archive, remove_unfinished_checkpoints
from tests.unit.test_adapter_archive import SHAPE, _state


def test_archive_missing_garbage_truncated_and_whole(tmp_path):
    config = TiedLoraConfig(rank=4)
    whole = save_archive(tmp_path / "a.nemo", config=config, shape=SHAPE, tensors=_state(config))
    members = check_archive(whole, what="x")
    assert [m.name for m in members] == ["tiedlora.json", "adapter.safetensors"]
    end = max(m.offset_data + m.size for m in members)  # then tar's end blocks and padding to a 10 KiB record
    with pytest.raises(TiedLoraCheckpointError, match=r"^x=.*nope\.nemo: no such file$"):
        check_archive(tmp_path / "nope.nemo", what="x")
    garbage = tmp_path / "g.nemo"
    garbage.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(TiedLoraCheckpointError,
                       match=r"g\.nemo is not a readable \.nemo archive \(not a tar archive\)"):
        check_archive(garbage, what="x")
    for cut in (end // 4, end - 10):
        partial = tmp_path / f"cut{cut}.nemo"
        partial.write_bytes(whole.read_bytes()[:cut])
        with pytest.raises(TiedLoraCheckpointError, match=r"truncated") as error:
            check_archive(partial, what="x")
        assert "\n" not in str(error.value)


def test_unfinished_checkpoints_removed_only_when_resuming(tmp_path):
    folder = tmp_path / "log" / "checkpoints"
    (folder / "mp_rank_01").mkdir(parents=True)
    done, cut = folder / "run--step=2-last.ckpt", folder / "run--step=4-last.ckpt"
    for path in (done, cut, folder / "mp_rank_01" / cut.name):
        path.write_bytes(b"x")
    (folder / "run--step=4-last-unfinished").write_text("")
    cfg = OmegaConf.create({"name": "run", "exp_manager": {"explicit_log_dir": str(tmp_path / "log"),
                                                           "resume_if_exists": False}})
    assert remove_unfinished_checkpoints(cfg) == [] and cut.exists()
    cfg.exp_manager.resume_if_exists = True
    assert len(remove_unfinished_checkpoints(cfg)) == 2
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [done.name]


def test_process_group_timeout_setting(monkeypatch):
    import datetime

    from nemo_tiedlora.core.errors import TiedLoraConfigError
    from nemo_tiedlora.nemo.launch import TIMEOUT_ENV, dist_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert dist_timeout() == datetime.timedelta(minutes=10)  # not torch's 30
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert dist_timeout() == datetime.timedelta(seconds=150)
    for bad in ("0", "-1", "ten"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(TiedLoraConfigError, match=f"{TIMEOUT_ENV}='{bad}': set it to a positive number of minutes"):
            dist_timeout()

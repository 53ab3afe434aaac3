"""What the sweep's unit tests share: a study config mapping on the embedded base and a context that runs nothing
(the tests pass a fake runner instead of NeMo's entry scripts)."""

from __future__ import annotations

from pathlib import Path

from nemo_tiedlora.apps.study.sweep import SweepContext

SHAPE = {"hidden_size": 64, "num_layers": 2, "out_features": 128}
TRAINING = {"max_steps": 8, "val_check_interval": 2, "global_batch_size": 4, "micro_batch_size": 2, "seed": 1234}


def study_config(tmp_path: Path, defaults: dict, changes: dict) -> dict:
    """A valid study config mapping on the extraction task's sample: ``defaults`` (presets, lrs), then ``changes``."""
    data = {"task": "extraction", "data": "sample", "base": "embedded", "output": str(tmp_path / "out"),
            "ranks": [8], "training": dict(TRAINING), **defaults}
    data.update(changes)
    return data


def fake_context(cfg, out: Path) -> SweepContext:
    """A sweep context with made-up base, splits and fingerprint, results written to ``out``."""
    sft = {split: Path(f"/d/{split}.jsonl") for split in ("train", "validation", "test")}
    return SweepContext(cfg=cfg, base=Path("/b/base.nemo"), shape=SHAPE, sft=sft, source=out, out=out,
                        fingerprint="fp")

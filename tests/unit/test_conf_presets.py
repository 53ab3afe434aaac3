"""conf/tiedlora_presets.yaml documents the presets: it must say what the code does (a stale doc is a bug)."""

from pathlib import Path

import yaml

from nemo_tiedlora.core.config import PRESETS

CONF = Path(__file__).resolve().parents[2] / "conf" / "tiedlora_presets.yaml"


def test_documented_presets_equal_the_code():
    documented = yaml.safe_load(CONF.read_text())
    assert set(documented) == set(PRESETS)
    for name, flags in documented.items():
        preset = PRESETS[name]
        assert flags == {"tied": preset.tied, "train_a": preset.train_a, "train_b": preset.train_b,
                         "train_u": preset.train_u, "train_v": preset.train_v}, name

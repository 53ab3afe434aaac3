"""Config validation, presets, NeMo YAML mapping, metadata round-trip and parameter counts
(docs/design.md section 2)."""

from __future__ import annotations

import json

import pytest
from spec_table import PAPER_FLAGS, PRESET_NAMES, table_total, table_total_mha

from nemo_tiedlora.core.config import PRESETS, FactorFlags, TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.core.functional import lora_parameter_count, parameter_counts, stored_parameter_counts

ALL_FLAGS = dict(tied=True, train_a=True, train_b=True, train_u=True, train_v=True)


def flags_tuple(flags: FactorFlags) -> tuple[bool, ...]:
    return (flags.tied, flags.train_a, flags.train_b, flags.train_u, flags.train_v)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_presets_match_the_paper_table(preset: str) -> None:
    assert flags_tuple(PRESETS[preset]) == PAPER_FLAGS[preset]
    assert flags_tuple(TiedLoraConfig(preset=preset).flags) == PAPER_FLAGS[preset]


def test_only_the_paper_presets_exist() -> None:
    assert set(PRESETS) == set(PAPER_FLAGS)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"preset": "tl7"}, ["tl7", "tl6", "lora", "vera"]),
        ({"rank": 0}, ["rank", "positive", "adapter_dim"]),
        ({"rank": -4}, ["rank", "positive"]),
        ({"rank": 2.5}, ["rank", "int"]),
        ({"rank": True}, ["rank", "int"]),
        ({"alpha": 0}, ["alpha", "positive"]),
        ({"alpha": -8.0}, ["alpha", "alpha = rank"]),
        ({"dropout": 1.0}, ["dropout", "[0, 1)"]),
        ({"dropout": -0.1}, ["dropout", "[0, 1)"]),
        ({"a_init": "zero"}, ["a_init", "kaiming", "xavier", "normal"]),
        ({"target_modules": ("attention_dense",)}, ["attention_dense", "attention_qkv"]),
        ({"target_modules": ()}, ["target_modules", "attention_qkv"]),
        ({"preset": None, **dict(ALL_FLAGS, train_a=False, train_b=False, train_u=False, train_v=False)},
         ["nothing to train", "train_a", "tl6"]),
        ({"preset": "tl5", "train_a": False, "train_b": False}, ["nothing to train", "tl6"]),
        ({"preset": "tl1", "train_a": False}, ["nothing to train"]),
        ({"preset": None, "tied": True, "train_a": True}, ["train_b", "train_u", "train_v", "preset"]),
        ({"preset": None}, ["tied", "preset such as tl6"]),
        ({"train_a": "yes"}, ["train_a", "true, false"]),
        ({"layer_selection": (0, 1)}, ["1-based", "[0]"]),
        ({"layer_selection": (1, 1)}, ["more than once", "once"]),
        ({"layer_selection": ()}, ["layer_selection", "all layers"]),
        ({"layer_selection": (1.5,)}, ["layer_selection", "1-based"]),
        ({"u_init": 0.0}, ["u_init", "second zero factor", "non-zero"]),  # tl6: B is the zero factor
        ({"preset": "tl4", "v_init": 0}, ["v_init", "non-zero"]),  # frozen v at 0 kills the update
        ({"seed": -1}, ["seed", "non-negative"]),
    ],
)
def test_bad_config_names_cause_and_fix(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(TiedLoraConfigError) as info:
        TiedLoraConfig(**kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


def test_zero_init_of_the_zero_factor_itself_is_allowed() -> None:
    cfg = TiedLoraConfig(preset="vera", v_init=0.0)  # v is vera's zero factor anyway
    assert cfg.flags.zero_factor == "v"


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        (dict(hidden_size=8, num_layers=4, out_features=24), ["rank 16", "hidden size 8", "adapter_dim <= 8"]),
        (dict(hidden_size=64, num_layers=2, out_features=192), ["[3]", "num_layers=2"]),
        (dict(hidden_size=0, num_layers=2, out_features=192), ["hidden_size", "positive"]),
    ],
)
def test_validate_for_model(shape: dict, words: list[str]) -> None:
    cfg = TiedLoraConfig(rank=16, layer_selection=(1, 3))
    with pytest.raises(TiedLoraConfigError) as info:
        cfg.validate_for_model(**shape)
    for word in words:
        assert word in str(info.value)


def test_validate_for_model_accepts_a_fitting_model() -> None:
    TiedLoraConfig(rank=16, layer_selection=(1, 3)).validate_for_model(hidden_size=16, num_layers=3, out_features=48)


@pytest.mark.parametrize(
    ("preset", "overrides", "expected"),
    [
        ("tl5", {"train_u": True}, (True, True, True, True, False)),
        ("lora", {"train_u": True, "train_v": True}, (False, True, True, True, True)),  # untied + scalings
        ("tl6", {"tied": False}, (False, True, True, True, True)),
        ("vera", {"train_a": True}, (True, True, False, True, True)),
        (None, dict(ALL_FLAGS, train_b=False), (True, True, False, True, True)),
    ],
)
def test_explicit_flags_override_the_preset(preset: str | None, overrides: dict, expected: tuple) -> None:
    assert flags_tuple(TiedLoraConfig(preset=preset, **overrides).flags) == expected


def test_from_nemo_maps_keys() -> None:
    cfg = TiedLoraConfig.from_nemo(
        {
            "adapter_dim": 16,
            "alpha": 32,
            "preset": "tl5",
            "train_u": True,
            "adapter_dropout": 0.1,
            "column_init_method": "xavier",
            "u_init": 0.5,
            "v_init": None,  # YAML null: not given
            "seed": 7,
            "target_modules": ["attention_qkv"],
            "layer_selection": [1, 2, 5],
        }
    )
    assert (cfg.rank, cfg.alpha, cfg.preset, cfg.dropout, cfg.a_init) == (16, 32, "tl5", 0.1, "xavier")
    assert (cfg.u_init, cfg.v_init, cfg.seed) == (0.5, None, 7)
    assert cfg.target_modules == ("attention_qkv",) and cfg.layer_selection == (1, 2, 5)
    assert flags_tuple(cfg.flags) == (True, True, True, True, False)
    assert cfg.scale == 2.0


def test_from_nemo_missing_and_null_keys_take_defaults() -> None:
    assert TiedLoraConfig.from_nemo({}) == TiedLoraConfig()
    assert TiedLoraConfig.from_nemo({"preset": None, "adapter_dim": None, "a_init": None}) == TiedLoraConfig()


def test_from_nemo_accepts_omegaconf() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create(
        {"adapter_dim": 4, "preset": "vera", "target_modules": ["attention_qkv"], "layer_selection": [2, 3]}
    )
    cfg = TiedLoraConfig.from_nemo(node)
    assert cfg == TiedLoraConfig(rank=4, preset="vera", layer_selection=(2, 3))
    hash(cfg)  # tuples, not ListConfig


def test_from_nemo_rejects_unknown_keys() -> None:
    with pytest.raises(TiedLoraConfigError) as info:
        TiedLoraConfig.from_nemo({"adaptor_dim": 8, "weight_tying": True, "preset": "tl6"})
    message = str(info.value)
    for word in ["adaptor_dim", "weight_tying", "adapter_dim", "adapter_dropout", "spelling"]:
        assert word in message


def test_from_nemo_rejects_conflicting_init_aliases() -> None:
    with pytest.raises(TiedLoraConfigError, match="give only one"):
        TiedLoraConfig.from_nemo({"a_init": "kaiming", "column_init_method": "normal"})


@pytest.mark.parametrize(
    "cfg",
    [
        *(TiedLoraConfig(preset=name) for name in PRESET_NAMES),
        TiedLoraConfig(rank=16, alpha=32.0, preset="tl2", u_init=0.3, v_init=2.0, seed=5, layer_selection=(2, 4)),
        TiedLoraConfig(preset=None, **dict(ALL_FLAGS, tied=False, train_a=False)),
        TiedLoraConfig(preset="vera", dropout=0.05, a_init="normal"),
    ],
)
def test_to_dict_round_trips_through_json(cfg: TiedLoraConfig) -> None:
    data = json.loads(json.dumps(cfg.to_dict()))
    assert TiedLoraConfig.from_dict(data) == cfg
    resolved = data["resolved"]
    assert resolved["alpha"] == (cfg.rank if cfg.alpha is None else cfg.alpha)
    assert resolved["scale"] == resolved["alpha"] / cfg.rank
    assert tuple(resolved["flags"][k] for k in ("tied", "train_a", "train_b", "train_u", "train_v")) == flags_tuple(
        cfg.flags
    )


def test_from_dict_rejects_unknown_keys_and_changed_resolution() -> None:
    data = TiedLoraConfig(preset="vera").to_dict()
    with pytest.raises(TiedLoraConfigError, match="bogus"):
        TiedLoraConfig.from_dict({**data, "bogus": 1})
    data["resolved"]["u_init"] = 0.7  # as if the default had changed between versions
    with pytest.raises(TiedLoraConfigError, match="u_init"):
        TiedLoraConfig.from_dict(data)


SHAPES = [(4096, 32, 8), (32, 4, 2), (5120, 40, 16), (8192, 80, 64), (768, 12, 1)]  # (d, L, r)


@pytest.mark.parametrize(("d", "layers", "r"), SHAPES)
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_parameter_counts_match_the_paper_table(preset: str, d: int, layers: int, r: int) -> None:
    cfg = TiedLoraConfig(rank=r, preset=preset)
    counts = parameter_counts(cfg, hidden_size=d, num_layers=layers, out_features=3 * d)
    assert counts["total"] == table_total_mha(preset, d=d, layers=layers, r=r)
    assert counts["total"] == sum(counts[name] for name in ("A", "B", "u", "v"))
    assert lora_parameter_count(hidden_size=d, num_layers=layers, out_features=3 * d, rank=r) == 4 * layers * d * r


GQA_SHAPES = [(8192, 64, 8, 80, 8), (4096, 32, 8, 32, 16), (32, 4, 2, 3, 4)]  # (d, heads, groups, L, r)


@pytest.mark.parametrize(("d", "heads", "groups", "layers", "r"), GQA_SHAPES)
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_parameter_counts_with_gqa(preset: str, d: int, heads: int, groups: int, layers: int, r: int) -> None:
    out = d + 2 * groups * (d // heads)
    counts = parameter_counts(TiedLoraConfig(rank=r, preset=preset), hidden_size=d, num_layers=layers, out_features=out)
    assert counts["total"] == table_total(preset, d=d, layers=layers, r=r, out=out)


def test_parameter_counts_per_factor_and_layer_selection() -> None:
    d, layers, r, out = 64, 6, 4, 192
    cfg = TiedLoraConfig(rank=r, preset="tl6", layer_selection=(1, 4))
    counts = parameter_counts(cfg, hidden_size=d, num_layers=layers, out_features=out)
    assert counts == {"A": d * r, "B": out * r, "u": 2 * r, "v": 2 * out, "total": d * r + out * r + 2 * (r + out)}
    lora = parameter_counts(TiedLoraConfig(rank=r, preset="lora", layer_selection=(2, 3, 6)), hidden_size=d,
                            num_layers=layers, out_features=out)
    assert lora == {"A": 3 * d * r, "B": 3 * out * r, "u": 0, "v": 0, "total": 3 * r * (d + out)}


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_stored_parameter_counts_include_frozen_factors(preset: str) -> None:
    d, layers, r, out = 64, 5, 4, 128
    stored = stored_parameter_counts(TiedLoraConfig(rank=r, preset=preset), hidden_size=d, num_layers=layers,
                                     out_features=out)
    copies = 1 if PAPER_FLAGS[preset][0] else layers
    assert stored == {
        "A": copies * d * r,
        "B": copies * out * r,
        "u": layers * r,
        "v": layers * out,
        "total": copies * (d + out) * r + layers * (r + out),
    }

"""Initialization (docs/design.md section 3): zero update at step 0, one zero factor, seeded and regenerable randoms."""

from __future__ import annotations

import math

import pytest
import torch
from spec_table import PRESET_NAMES, ZERO_FACTOR, trained

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.functional import init_factors, tied_lora_update

D = 32
RANK = 4
LAYERS = 3
OUT_WIDTHS = {"mha": 3 * D, "gqa": D + 2 * 2 * (D // 4)}  # GQA: 4 heads, 2 groups, head dim 8
FACTORS = ("A", "B", "u", "v")


def _init(cfg: TiedLoraConfig, *, d: int = D, out: int = 3 * D, layer: int | None = 0, **kw) -> dict[str, torch.Tensor]:
    return init_factors(cfg, in_features=d, out_features=out, layer_index=layer, **kw)


@pytest.mark.parametrize("shape", sorted(OUT_WIDTHS))
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_model_equals_base_at_step_zero(preset: str, shape: str) -> None:
    out = OUT_WIDTHS[shape]
    cfg = TiedLoraConfig(rank=RANK, preset=preset)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))
    for layer in range(LAYERS):
        f = _init(cfg, out=out, layer=layer)
        assert f["A"].shape == (RANK, D) and f["B"].shape == (out, RANK)
        assert f["u"].shape == (RANK,) and f["v"].shape == (out,)
        update = tied_lora_update(x, f["A"], f["B"], f["u"], f["v"], cfg.scale)
        assert torch.count_nonzero(update) == 0
        all_zero = [name for name in FACTORS if torch.count_nonzero(f[name]) == 0]
        assert all_zero == [ZERO_FACTOR[preset]], "exactly one factor starts at zero"
        assert trained(preset)[ZERO_FACTOR[preset]], "the zero factor must be a trained one"
        for name in FACTORS:
            if name != ZERO_FACTOR[preset]:
                assert bool((f[name] != 0).all()), f"{name} must be non-zero everywhere"
    assert cfg.flags.zero_factor == ZERO_FACTOR[preset]


@pytest.mark.parametrize(
    ("preset", "overrides", "u", "v"),
    [
        ("vera", {}, 0.1, 0.0),  # VeRA's d vector starts at 0.1, its b vector (v) is the zero factor
        ("tl6", {}, 1.0, 1.0),
        ("tl1", {}, 1.0, 1.0),  # frozen u, v stay at 1
        ("tl6", {"u_init": 0.5, "v_init": 2.0}, 0.5, 2.0),
        ("vera", {"u_init": 1.0}, 1.0, 0.0),
        ("tl4", {"v_init": 3.0}, 1.0, 3.0),  # a frozen v at another value
    ],
)
def test_scaling_vector_init(preset: str, overrides: dict, u: float, v: float) -> None:
    f = _init(TiedLoraConfig(rank=RANK, preset=preset, **overrides))
    assert torch.equal(f["u"], torch.full((RANK,), u))
    assert torch.equal(f["v"], torch.full((3 * D,), v))


RANDOM_AB = [  # (preset, overrides, random factors that are not the zero factor)
    ("vera", {}, ("A", "B")),
    ("tl2", {}, ("A", "B")),  # trained A, frozen random B
    ("tl3", {}, ("A",)),
    ("tl4", {}, ("A",)),
    ("tl6", {}, ("A",)),
    ("lora", {}, ("A",)),
    ("vera", {"tied": False}, ("A", "B")),  # per-layer frozen random A and B
]


@pytest.mark.parametrize(("preset", "overrides", "names"), RANDOM_AB)
def test_random_factors_regenerate_from_the_seed(preset: str, overrides: dict, names: tuple[str, ...]) -> None:
    cfg = TiedLoraConfig(rank=RANK, preset=preset, seed=7, **overrides)
    torch.manual_seed(0)
    first = _init(cfg, layer=1)
    global_state = torch.get_rng_state()
    torch.manual_seed(99)  # the global RNG must not matter
    again = _init(cfg, layer=1)
    other = _init(TiedLoraConfig(rank=RANK, preset=preset, seed=8, **overrides), layer=1)
    for name in names:
        assert torch.equal(first[name], again[name]), f"{name} must regenerate bit-identically"
        assert not torch.equal(first[name], other[name]), f"{name} must change with the seed"
    torch.manual_seed(0)
    _init(cfg, layer=1)
    assert torch.equal(torch.get_rng_state(), global_state), "init must not consume the global RNG"


@pytest.mark.parametrize(("preset", "overrides", "names"), RANDOM_AB)
def test_per_layer_factors_differ_across_layers_and_tied_ones_do_not(
    preset: str, overrides: dict, names: tuple[str, ...]
) -> None:
    cfg = TiedLoraConfig(rank=RANK, preset=preset, **overrides)
    untied = preset == "lora" or overrides.get("tied") is False
    layers = [_init(cfg, layer=i) for i in range(LAYERS)]
    for name in names:
        for i in range(1, LAYERS):
            same = torch.equal(layers[0][name], layers[i][name])
            assert same != untied, f"{name} of layer {i}: {'untied must differ' if untied else 'tied must match'}"
    if not untied:  # tied A/B do not depend on the layer index at all
        shared = _init(cfg, layer=None)
        for name in names:
            assert torch.equal(shared[name], layers[2][name])


def test_untied_factors_need_a_layer_index() -> None:
    with pytest.raises(ValueError, match="layer_index"):
        _init(TiedLoraConfig(rank=RANK, preset="lora"), layer=None)


def test_kaiming_bound_uses_the_full_fan_in() -> None:
    """Frozen random A and B are Kaiming-uniform(a=sqrt(5)): bound 1/sqrt(fan_in) with the FULL fan-in.

    A shard's fan-in (e.g. d / 2) would give a larger bound, which the <= check rejects.
    """
    d, r = 2048, 8
    out = 3 * d
    f = _init(TiedLoraConfig(rank=r, preset="vera"), d=d, out=out)
    a_bound = math.sqrt(6.0 / ((1 + 5) * d))  # gain sqrt(2/(1+a^2)) * sqrt(3/fan_in), a = sqrt(5)
    b_bound = math.sqrt(6.0 / ((1 + 5) * r))  # B is [out, r]: fan-in r
    a_max, b_max = f["A"].abs().max().item(), f["B"].abs().max().item()
    assert 0.98 * a_bound < a_max <= a_bound
    assert 0.98 * b_bound < b_max <= b_bound


@pytest.mark.parametrize(
    ("a_init", "expected_std"),
    [
        ("kaiming", 1.0 / math.sqrt(2048) / math.sqrt(3)),  # U(-b, b) has std b / sqrt(3)
        ("xavier", math.sqrt(2.0 / (2048 + 8))),
        ("normal", 0.02),
    ],
)
def test_trained_a_init(a_init: str, expected_std: float) -> None:
    f = _init(TiedLoraConfig(rank=8, preset="tl5", a_init=a_init), d=2048, out=3 * 2048)
    assert f["A"].std().item() == pytest.approx(expected_std, rel=0.05)
    assert f["A"].mean().item() == pytest.approx(0.0, abs=0.05 * expected_std)  # standard error is std / 128


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_is_a_cast_of_the_float32_init(dtype: torch.dtype) -> None:
    cfg = TiedLoraConfig(rank=RANK, preset="vera")
    full = _init(cfg)
    low = _init(cfg, dtype=dtype)
    for name in FACTORS:
        assert low[name].dtype == dtype
        assert torch.equal(low[name], full[name].to(dtype))

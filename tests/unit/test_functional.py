"""The update, delta weight and LoRA export against naive references written here (docs/design.md section 1)."""

from __future__ import annotations

import pytest
import torch
from spec_table import PAPER_FLAGS, PRESET_NAMES, trained

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.core.functional import (
    delta_weight,
    init_factors,
    per_layer_lora_factors,
    qkv_out_width,
    tied_lora_update,
)

D = 32
LAYERS = 3
RANK = 4
# name: (hidden, heads, groups, out width worked out by hand)
SHAPES = {
    "mha": dict(d=D, heads=4, groups=None, out=3 * D),  # 96
    "gqa": dict(d=D, heads=4, groups=2, out=D + 2 * 2 * (D // 4)),  # 32 + 2 * 2 * 8 = 64
}


def naive_update(x: torch.Tensor, a, b, u, v, scale: float) -> torch.Tensor:
    """x @ (s diag(v) B diag(u) A)^T, with the diagonals as explicit matrices."""
    w = scale * torch.diag(v) @ b @ torch.diag(u) @ a  # [out, d]
    return x @ w.T


def trained_layer_factors(cfg: TiedLoraConfig, *, d: int, out: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per-layer factors as after some training: the init, with every trained factor replaced by noise."""
    gen = torch.Generator().manual_seed(seed)
    layers = [
        init_factors(cfg, in_features=d, out_features=out, layer_index=i, dtype=torch.float64) for i in range(LAYERS)
    ]
    tied = PAPER_FLAGS[cfg.preset][0]
    for name, is_trained in trained(cfg.preset).items():
        if not is_trained:
            continue
        shared = torch.randn(layers[0][name].shape, generator=gen, dtype=torch.float64)
        for factors in layers:
            per_layer = name in ("u", "v") or not tied
            factors[name] = torch.randn(shared.shape, generator=gen, dtype=torch.float64) if per_layer else shared
    return layers


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_update_matches_naive_reference(preset: str, shape: str) -> None:
    spec = SHAPES[shape]
    out = qkv_out_width(spec["d"], spec["heads"], spec["groups"])
    assert out == spec["out"]
    cfg = TiedLoraConfig(rank=RANK, preset=preset)
    x = torch.randn(2, 5, spec["d"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for f in trained_layer_factors(cfg, d=spec["d"], out=out, seed=1):
        args = (f["A"], f["B"], f["u"], f["v"], cfg.scale)
        expected = naive_update(x, *args)  # [2, 5, out]
        got = tied_lora_update(x, *args)
        assert got.shape == (2, 5, out)
        torch.testing.assert_close(got, expected)
        # the merged delta applied as a weight gives the same output
        w = delta_weight(*args)
        assert w.shape == (out, spec["d"])
        torch.testing.assert_close(x @ w.T, got)
        # export to plain LoRA is lossless
        a_l, b_l = per_layer_lora_factors(*args)
        assert a_l.shape == (RANK, spec["d"]) and b_l.shape == (out, RANK)
        torch.testing.assert_close(b_l @ a_l, w)


def test_update_matches_explicit_loops() -> None:
    """One vector, every sum spelled out: z_i = s v_i sum_j B_ij u_j sum_k A_jk x_k."""
    f64 = dict(generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d, r, out, s = 6, 3, 9, 0.5
    a, b = torch.randn(r, d, **f64), torch.randn(out, r, **f64)
    u, v = torch.randn(r, **f64), torch.randn(out, **f64)
    x = torch.randn(d, **f64)
    expected = torch.zeros(out, dtype=torch.float64)
    for i in range(out):
        for j in range(r):
            ax_j = sum(a[j, k] * x[k] for k in range(d))
            expected[i] += s * v[i] * b[i, j] * u[j] * ax_j
    torch.testing.assert_close(tied_lora_update(x, a, b, u, v, s), expected)
    torch.testing.assert_close(delta_weight(a, b, u, v, s) @ x, expected)


@pytest.mark.parametrize(("rank", "alpha"), [(8, 16.0), (8, 4.0), (4, 32)])
def test_alpha_scales_the_update(rank: int, alpha: float) -> None:
    cfg = TiedLoraConfig(rank=rank, alpha=alpha, preset="tl6")
    assert cfg.scale == pytest.approx(alpha / rank)
    gen = torch.Generator().manual_seed(4)
    f64 = dict(generator=gen, dtype=torch.float64)
    a, b = torch.randn(rank, D, **f64), torch.randn(3 * D, rank, **f64)
    u, v = torch.randn(rank, **f64), torch.randn(3 * D, **f64)
    x = torch.randn(7, D, **f64)
    unit = tied_lora_update(x, a, b, u, v, 1.0)
    torch.testing.assert_close(tied_lora_update(x, a, b, u, v, cfg.scale), (alpha / rank) * unit)
    torch.testing.assert_close(delta_weight(a, b, u, v, cfg.scale), (alpha / rank) * delta_weight(a, b, u, v, 1.0))
    torch.testing.assert_close(tied_lora_update(x, a, b, u, v, cfg.scale), naive_update(x, a, b, u, v, alpha / rank))


def test_alpha_defaults_to_rank() -> None:
    assert TiedLoraConfig(rank=16).scale == 1.0
    assert TiedLoraConfig(rank=16).resolved_alpha == 16.0


def test_dropout_applies_to_the_input_only() -> None:
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(RANK, D, generator=gen), torch.randn(3 * D, RANK, generator=gen)
    u, v = torch.randn(RANK, generator=gen), torch.randn(3 * D, generator=gen)
    x = torch.randn(3, D, generator=gen)
    mask = (torch.arange(D) % 2).float()
    got = tied_lora_update(x, a, b, u, v, 1.0, dropout=lambda t: t * mask)
    torch.testing.assert_close(got, naive_update(x * mask, a, b, u, v, 1.0))


def test_output_partition_is_row_slice() -> None:
    """A TP rank passing its rows of B and entries of v gets its slice of the full update."""
    gen = torch.Generator().manual_seed(6)
    out = 3 * D
    a, b = torch.randn(RANK, D, generator=gen), torch.randn(out, RANK, generator=gen)
    u, v = torch.randn(RANK, generator=gen), torch.randn(out, generator=gen)
    x = torch.randn(4, D, generator=gen)
    full = tied_lora_update(x, a, b, u, v, 1.0)
    rows = slice(out // 2, out)
    torch.testing.assert_close(tied_lora_update(x, a, b[rows], u, v[rows], 1.0), full[:, rows])


@pytest.mark.parametrize(
    ("hidden", "heads", "groups", "kv", "expected"),
    [
        (4096, 32, None, None, 3 * 4096),  # MHA: 3d
        (32, 4, 4, None, 96),  # groups == heads is MHA
        (8192, 64, 8, None, 8192 + 2 * 8 * 128),  # Llama-2-70B-like GQA: 10240
        (4096, 32, 8, None, 4096 + 2 * 8 * 128),  # Llama-3-8B-like GQA: 6144
        (32, 4, 1, None, 32 + 2 * 1 * 8),  # multi-query attention
        (32, 4, 2, 16, 4 * 16 + 2 * 2 * 16),  # explicit kv_channels != d / heads
    ],
)
def test_qkv_out_width(hidden: int, heads: int, groups: int | None, kv: int | None, expected: int) -> None:
    assert qkv_out_width(hidden, heads, groups, kv) == expected


@pytest.mark.parametrize(
    ("hidden", "heads", "groups", "words"),
    [
        (4096, 6, None, "divides the hidden size"),
        (32, 4, 3, "divides the number of heads"),
        (32, 0, None, "positive"),
    ],
)
def test_qkv_out_width_rejects_bad_shapes(hidden: int, heads: int, groups: int | None, words: str) -> None:
    with pytest.raises(TiedLoraConfigError, match=words):
        qkv_out_width(hidden, heads, groups)

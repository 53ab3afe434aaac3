"""modules.py: the model owns A and B once, every layer refers to them; counts equal the spec's closed forms."""

from __future__ import annotations

import pytest
import torch

from nemo_tiedlora.core.config import PRESETS, TiedLoraConfig
from nemo_tiedlora.core.modules import LayerFactors, SharedFactors

SHAPES = {"mha": dict(d=32, out=96), "gqa": dict(d=32, out=64)}  # gqa: 4 heads of 8, 2 query groups


def _build(preset: str, d: int, out: int, layers: int = 3, rank: int = 4):
    cfg = TiedLoraConfig(preset=preset, rank=rank)
    shared = SharedFactors(cfg, in_features=d, out_features=out) if cfg.flags.tied else None
    model = torch.nn.ModuleList(
        LayerFactors(cfg, in_features=d, out_features=out, layer_number=n + 1, shared=shared) for n in range(layers)
    )
    return cfg, shared, model


def _closed_form(preset: str, *, d: int, out: int, layers: int, r: int) -> int:
    flags = PRESETS[preset]
    copies = 1 if flags.tied else layers
    return (flags.train_a * copies * d * r + flags.train_b * copies * out * r
            + flags.train_u * layers * r + flags.train_v * layers * out)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_sharing_and_counts(preset, shape):
    d, out = SHAPES[shape]["d"], SHAPES[shape]["out"]
    cfg, shared, layers = _build(preset, d, out)
    owners = [shared, layers] if shared is not None else [layers]
    params = {id(p): p for owner in owners for p in owner.parameters()}  # every tensor once
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    assert trainable == _closed_form(preset, d=d, out=out, layers=3, r=4)
    a_ptrs = {layer.factors[0].data_ptr() for layer in layers}
    u_ptrs = {layer.factors[2].data_ptr() for layer in layers}
    assert len(a_ptrs) == (1 if cfg.flags.tied else 3)
    assert len(u_ptrs) == 3
    # A and B are not registered in the layers: a layer's state dict holds only its own tensors
    assert all(("lora_a" in layer.state_dict()) == (not cfg.flags.tied) for layer in layers)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_step0_zero_and_merge_equals_forward(preset):
    _, _, layers = _build(preset, 32, 64)
    x = torch.randn(5, 2, 32)
    assert all(torch.count_nonzero(layer(x)) == 0 for layer in layers)
    with torch.no_grad():
        for layer in layers:
            for tensor in layer.factors:
                tensor.normal_()
    for layer in layers:
        a, b, u, v = (t.detach() for t in layer.factors)
        merged = torch.diag(v) @ b @ torch.diag(u) @ a  # independent: explicit diagonal matrices (alpha = r)
        torch.testing.assert_close(layer(x), x @ merged.t(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.delta_weight(), merged, rtol=1e-5, atol=1e-5)
        rows = slice(16, 48)  # a TP rank's output partition
        torch.testing.assert_close(layer(x, rows), (x @ merged.t())[..., rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tl6", "lora", "vera"])
def test_tp_sum_only_for_gradients_that_are_partial_over_tp(preset):
    """A and u are applied before the TP region: without SP their gradients are complete on every TP rank (no TP
    sum); with SP they are partial over sequence shards. B and v are always partial by rows (docs/design.md
    section 5)."""
    from nemo_tiedlora.core.modules import FACTOR_OF_PARAM
    from nemo_tiedlora.nemo.grad_sync import _needs_tp_sum

    _, shared, layers = _build(preset, 32, 96)
    owners = [shared, layers] if shared is not None else [layers]
    params = {name: p for owner in owners for name, p in owner.named_parameters()}
    assert {FACTOR_OF_PARAM[name.rsplit(".", 1)[-1]] for name in params} == {"A", "B", "u", "v"}
    for name, param in params.items():
        factor = FACTOR_OF_PARAM[name.rsplit(".", 1)[-1]]
        assert _needs_tp_sum(param, sequence_parallel=False) == (factor in ("B", "v")), name
        assert _needs_tp_sum(param, sequence_parallel=True), name

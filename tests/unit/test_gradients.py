"""Every trainable factor learns within two steps and frozen ones get no gradient (docs/design.md section 3).

A tiny pure-torch stack: each layer is a frozen ``nn.Linear(d, out)`` (the fused QKV stand-in) plus the
Tied-LoRA update, followed by a frozen projection back to d. Tied A and B are one ``nn.Parameter`` each,
used by every layer; u and v are per layer.
"""

from __future__ import annotations

import pytest
import torch
from spec_table import PAPER_FLAGS, PRESET_NAMES, trained
from torch import nn

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.functional import init_factors, tied_lora_update

D = 16
RANK = 4
LAYERS = 3
OUT_WIDTHS = {"mha": 3 * D, "gqa": D + 2 * 2 * (D // 4)}  # GQA: 4 heads, 2 groups, head dim 4


class TinyTiedLoraStack(nn.Module):
    def __init__(self, cfg: TiedLoraConfig, *, out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.ModuleList(nn.Linear(D, out) for _ in range(LAYERS))
        self.proj = nn.ModuleList(nn.Linear(out, D) for _ in range(LAYERS))
        for p in [*self.qkv.parameters(), *self.proj.parameters()]:
            p.requires_grad_(False)
        self.scale = cfg.scale
        tied, *_ = PAPER_FLAGS[cfg.preset]
        train = trained(cfg.preset)
        inits = [init_factors(cfg, in_features=D, out_features=out, layer_index=i) for i in range(LAYERS)]

        def param(t: torch.Tensor, name: str) -> nn.Parameter:
            return nn.Parameter(t.clone(), requires_grad=train[name])

        if tied:
            shared_a, shared_b = param(inits[0]["A"], "A"), param(inits[0]["B"], "B")
            self.a = nn.ParameterList([shared_a])
            self.b = nn.ParameterList([shared_b])
            self.layer_a = [shared_a] * LAYERS
            self.layer_b = [shared_b] * LAYERS
        else:
            self.a = nn.ParameterList(param(f["A"], "A") for f in inits)
            self.b = nn.ParameterList(param(f["B"], "B") for f in inits)
            self.layer_a, self.layer_b = list(self.a), list(self.b)
        self.u = nn.ParameterList(param(f["u"], "u") for f in inits)
        self.v = nn.ParameterList(param(f["v"], "v") for f in inits)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i in range(LAYERS):
            qkv = self.qkv[i](h) + tied_lora_update(
                h, self.layer_a[i], self.layer_b[i], self.u[i], self.v[i], self.scale
            )  # [batch, out]
            h = h + self.proj[i](torch.tanh(qkv))  # [batch, d]
        return h

    def factors(self) -> dict[str, list[nn.Parameter]]:
        return {"A": list(self.a), "B": list(self.b), "u": list(self.u), "v": list(self.v)}


@pytest.mark.parametrize("shape", sorted(OUT_WIDTHS))
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_trainable_factors_learn_within_two_steps(preset: str, shape: str) -> None:
    cfg = TiedLoraConfig(rank=RANK, preset=preset)
    model = TinyTiedLoraStack(cfg, out=OUT_WIDTHS[shape])
    if PAPER_FLAGS[preset][0]:  # tied: every layer uses the very same A and B tensors
        assert len({p.data_ptr() for p in model.layer_a}) == 1 and len({p.data_ptr() for p in model.layer_b}) == 1
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(8, D, generator=gen), torch.randn(8, D, generator=gen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    learned = {name: [False] * len(params) for name, params in model.factors().items()}
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), target).backward()
        for name, params in model.factors().items():
            for i, p in enumerate(params):
                if trained(preset)[name]:
                    learned[name][i] |= bool(p.grad is not None and torch.count_nonzero(p.grad) > 0)
                else:
                    assert not p.requires_grad and p.grad is None, f"frozen {name}[{i}] got a gradient"
        for p in [*model.qkv.parameters(), *model.proj.parameters()]:
            assert p.grad is None
        optimizer.step()
    for name, flags in learned.items():
        if trained(preset)[name]:
            assert all(flags), f"trained {name}: layers {[i for i, ok in enumerate(flags) if not ok]} got no gradient"


@pytest.mark.parametrize(("preset", "second"), [("tl6", "A"), ("tl6", "u"), ("vera", "u"), ("tl2", "A")])
def test_a_second_zero_factor_would_deadlock(preset: str, second: str) -> None:
    """Control for the test above: zeroing one more trained factor leaves every gradient zero."""
    model = TinyTiedLoraStack(TiedLoraConfig(rank=RANK, preset=preset), out=3 * D)
    with torch.no_grad():
        for p in model.factors()[second]:
            p.zero_()
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(1))
    nn.functional.mse_loss(model(x), torch.zeros(8, D)).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in trainable)

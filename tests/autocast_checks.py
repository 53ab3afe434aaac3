"""The autocast checks of the fused update, shared by the CPU unit tests and the CUDA variant in tests/gpu.

Reference: the plain-torch formula ``s * v * (B (u * (A drop(x))))`` and its autograd gradients in float64 from the
same values and the same keep-mask, compared at the low-precision dtype's tolerance.
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.autograd import fused_tied_lora_update

D, RANK, OUT, SCALE = 64, 8, 96, 0.5
# Presets that train different subsets of (A, B, u, v): tl6 all four, tl2 A, u, v; vera u, v over frozen random A, B;
# lora A, B.
PRESETS = ("tl6", "tl2", "vera", "lora")
# Tolerance of a value against the float64 reference, as a fraction of the reference's largest magnitude.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _inputs(device: str, param_dtype: torch.dtype, trained: tuple[bool, ...], dropout: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, D, generator=g)  # [s, b, d], float32 like the base's layernorm output under autocast
    factors = [torch.randn(*shape, generator=g) for shape in ((RANK, D), (OUT, RANK), (RANK,), (OUT,))]
    mask = torch.rand(x.shape, generator=g) > 0.2 if dropout else None
    dz = torch.randn(6, 2, OUT, generator=g)
    x = x.to(device).requires_grad_(True)
    leaves = [t.to(device=device, dtype=param_dtype).requires_grad_(train) for t, train in zip(factors, trained)]
    return x, leaves, (None if mask is None else mask.to(device)), dz.to(device)


def _reference(x, leaves, mask: Optional[torch.Tensor], dz):
    """Output and gradients (x, A, B, u, v) of the plain formula in float64 from the same values."""
    x64 = x.detach().double().requires_grad_(True)
    f64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    a, b, u, v = f64
    dropped = x64 if mask is None else x64 * mask / 0.8
    out = SCALE * v * (((dropped @ a.t()) * u) @ b.t())
    out.backward(dz.double())
    return out.detach(), [x64.grad] + [t.grad for t in f64]


def check_update_under_autocast(device: str, autocast_dtype: torch.dtype, *, param_dtype: torch.dtype, preset: str,
                                split: bool, dropout: bool, backward_in_autocast: bool) -> None:
    """Under torch.autocast(device, autocast_dtype): the output has autocast's dtype; every gradient has its tensor's
    own dtype (float32 parameters: float32; bf16 parameters: bf16; x: float32); output and gradients equal the
    float64 formula within the dtype's tolerance; frozen factors get no gradient."""
    flags = TiedLoraConfig(preset=preset, rank=RANK).flags
    trained = (flags.train_a, flags.train_b, flags.train_u, flags.train_v)
    x, leaves, mask, dz = _inputs(device, param_dtype, trained, dropout)
    region = (lambda g: g) if split else None
    with torch.autocast(device, dtype=autocast_dtype):
        out = fused_tied_lora_update(x, *leaves, SCALE, keep_mask=mask, keep_prob=0.8, region=region)
        if backward_in_autocast:
            out.backward(dz.to(out.dtype))
    if not backward_in_autocast:
        out.backward(dz.to(out.dtype))
    assert out.dtype == autocast_dtype
    want_out, want_grads = _reference(x, leaves, mask, dz)
    tol = TOLERANCE[autocast_dtype]
    torch.testing.assert_close(out.double(), want_out, rtol=0.0, atol=tol * want_out.abs().max().item())
    for name, tensor, want in zip(("x", "A", "B", "u", "v"), [x, *leaves], want_grads):
        if not tensor.requires_grad:
            assert tensor.grad is None, name
            continue
        assert tensor.grad.dtype == tensor.dtype, f"grad of {name}: {tensor.grad.dtype}, tensor {tensor.dtype}"
        torch.testing.assert_close(tensor.grad.double(), want, rtol=0.0, atol=tol * want.abs().max().item(),
                                   msg=lambda m: f"grad of {name}: {m}")

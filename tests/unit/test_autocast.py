"""The fused update under CPU autocast (bf16, the YAML's bf16-mixed, and fp16), against the float64 formula.

The dtype contract (core/autograd.py's docstring): the public functions compute in autocast's dtype and return it;
the autograd functions compute in their inputs' dtype whatever autocast says, in forward and in backward; every
gradient reaches its tensor in that tensor's own dtype. The CUDA variant of the same checks is
tests/gpu/test_autocast_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.autograd import TiedLoraDown, TiedLoraUp, TiedLoraUpdate
from nemo_tiedlora.core.modules import LayerFactors, SharedFactors
from tests.autocast_checks import PRESETS, check_update_under_autocast


@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["backward_outside", "backward_inside"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("split", [False, True], ids=["one_piece", "split"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32_params", "bf16_params"])
def test_bf16_autocast_dtypes_and_values(param_dtype, preset, split, dropout, backward_in_autocast):
    """torch.autocast('cpu', bf16): output bf16; gradients in each tensor's dtype (fp32 parameters as with NeMo's
    bf16-mixed, bf16 ones as with megatron_amp_O2); values within 3e-2 of the largest magnitude of the float64
    formula; with backward() called inside the autocast region too."""
    check_update_under_autocast("cpu", torch.bfloat16, param_dtype=param_dtype, preset=preset, split=split,
                                dropout=dropout, backward_in_autocast=backward_in_autocast)


@pytest.mark.parametrize("split", [False, True], ids=["one_piece", "split"])
def test_fp16_autocast_dtypes_and_values(split):
    """torch.autocast('cpu', fp16) (trainer.precision=16): output fp16, fp32 gradients of fp32 parameters, values
    within 4e-3 of the largest magnitude of the float64 formula."""
    check_update_under_autocast("cpu", torch.float16, param_dtype=torch.float32, preset="tl6", split=split,
                                dropout=True, backward_in_autocast=False)


def _function_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 16, generator=g, requires_grad=True)
    a, b = torch.randn(4, 16, generator=g, requires_grad=True), torch.randn(12, 4, generator=g, requires_grad=True)
    u, v = torch.randn(4, generator=g, requires_grad=True), torch.randn(12, generator=g, requires_grad=True)
    mask = torch.rand(5, 2, 16, generator=g) > 0.3
    return [x, a, b, u, v], mask, torch.randn(5, 2, 12, generator=g)


def _apply(kind: str, tensors, mask):
    x, a, b, u, v = tensors
    if kind == "one_piece":
        return TiedLoraUpdate.apply(x, a, b, u, v, 0.5, mask, 0.7)
    return TiedLoraUp.apply(TiedLoraDown.apply(x, a, u, mask, 0.7), b, v, 0.5)


@pytest.mark.parametrize("kind", ["one_piece", "split"])
def test_autograd_functions_compute_in_their_inputs_dtype_under_autocast(kind):
    """By construction: the autograd functions given float32 inputs inside a bf16 autocast region (forward, and
    backward inside the region as well) compute in float32, bitwise equal to the same calls without autocast;
    without autocast disabled inside them their matmuls would run in bf16."""
    tensors, mask, dz = _function_inputs()
    plain = _apply(kind, tensors, mask)
    plain.backward(dz)
    plain_grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _apply(kind, tensors, mask)
        out.backward(dz)
    assert out.dtype == torch.float32 and torch.equal(out, plain)
    for name, tensor, want in zip(("x", "A", "B", "u", "v"), tensors, plain_grads):
        assert tensor.grad.dtype == torch.float32 and torch.equal(tensor.grad, want), name


def test_layer_under_autocast_with_dropout_keeps_parameter_dtypes():
    """A training LayerFactors (tl6, dropout 0.1) under bf16 autocast: bf16 output, float32 gradients for its u, v
    and the shared A, B (the optimizer's dtype), nonzero where they train."""
    cfg = TiedLoraConfig(preset="tl6", rank=4, dropout=0.1)
    shared = SharedFactors(cfg, in_features=16, out_features=24)
    layer = LayerFactors(cfg, in_features=16, out_features=24, layer_number=1, shared=shared)
    with torch.no_grad():
        for param in (*shared.parameters(), *layer.parameters()):
            param.normal_()  # no zero factor: every gradient is nonzero
    layer.train()
    x = torch.randn(6, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    for param in (*shared.parameters(), *layer.parameters()):
        assert param.grad.dtype == torch.float32 and param.grad.abs().sum() > 0

"""The fused update under CUDA autocast (bf16-mixed, the YAML's default, and fp16) and sequence-shard keep-masks
drawn by the CUDA generator: the checks of tests/unit/test_autocast.py and test_dropout_masks.py on a GPU.
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.autocast_checks import PRESETS, check_update_under_autocast

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backward_in_autocast", [False, True], ids=["backward_outside", "backward_inside"])
@pytest.mark.parametrize("split", [False, True], ids=["one_piece", "split"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32_params", "bf16_params"])
def test_cuda_bf16_autocast_dtypes_and_values(param_dtype, preset, split, backward_in_autocast):
    """torch.autocast('cuda', bf16) with dropout: output bf16, each gradient in its tensor's dtype, values within
    3e-2 of the largest magnitude of the float64 formula."""
    check_update_under_autocast("cuda", torch.bfloat16, param_dtype=param_dtype, preset=preset, split=split,
                                dropout=True, backward_in_autocast=backward_in_autocast)


@pytest.mark.parametrize("split", [False, True], ids=["one_piece", "split"])
def test_cuda_fp16_autocast_dtypes_and_values(split):
    """torch.autocast('cuda', fp16) (trainer.precision=16): output fp16, fp32 gradients of fp32 parameters."""
    check_update_under_autocast("cuda", torch.float16, param_dtype=torch.float32, preset="tl6", split=split,
                                dropout=True, backward_in_autocast=False)


def test_cuda_function_computes_in_its_inputs_dtype_under_autocast():
    """TiedLoraUpdate given float32 CUDA inputs inside a bf16 autocast region computes in float32, bitwise equal
    to the call without autocast."""
    from nemo_tiedlora.core.autograd import TiedLoraUpdate

    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(8, 2, 64, generator=g), torch.randn(8, 64, generator=g), torch.randn(96, 8, generator=g)
    u, v = torch.randn(8, generator=g), torch.randn(96, generator=g)
    args = [t.cuda() for t in (x, a, b, u, v)]
    plain = TiedLoraUpdate.apply(*args, 0.5, None, 1.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = TiedLoraUpdate.apply(*args, 0.5, None, 1.0)
    assert out.dtype == torch.float32 and torch.equal(out, plain)


@pytest.mark.parametrize("count", [2, 4])
def test_cuda_shard_masks_are_the_rows_of_the_whole_sequence_mask(count):
    """Sequence shards' masks drawn by a CUDA generator (the Philox draw depends on the whole tensor's size) are the
    rows of the whole [S, B, D] mask that torch draws from the same state."""
    from nemo_tiedlora.core.autograd import sequence_keep_mask

    s, b, d, p = 64, 2, 128, 0.1
    whole = torch.empty(s, b, d, device="cuda").bernoulli_(1 - p, generator=torch.Generator("cuda").manual_seed(5))
    shards = [sequence_keep_mask(torch.empty(s // count, b, d, device="cuda"), p, shard=(k, count),
                                 generator=torch.Generator("cuda").manual_seed(5)) for k in range(count)]
    assert torch.equal(torch.cat(shards), whole.bool())

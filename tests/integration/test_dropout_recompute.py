"""Adapter dropout under megatron's activation recompute (`tensor_parallel.checkpoint`, what
activations_checkpoint_granularity=full runs), in one CPU process with the project's compat patches.

The keep-mask is drawn from megatron's data-parallel RNG tracker state (`injection._dropout_rng`, what the NeMo glue
gives every layer); the checkpoint saves the tracker states with its forward and restores them for the recompute
in backward, so the recomputed forward draws the same mask. Reference: the same layer run without checkpointing
from the same seeded state (output and every gradient equal). Control: a mask source megatron does not save (a
generator of its own) draws another mask in the recompute, and the gradients differ.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytestmark = pytest.mark.integration

D, OUT = 16, 24


def _layer(rng):
    from nemo_tiedlora.core.config import TiedLoraConfig
    from nemo_tiedlora.core.modules import LayerFactors, SharedFactors

    cfg = TiedLoraConfig(preset="tl6", rank=4, dropout=0.3)
    shared = SharedFactors(cfg, in_features=D, out_features=OUT)
    layer = LayerFactors(cfg, in_features=D, out_features=OUT, layer_number=1, shared=shared)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in (*shared.parameters(), *layer.parameters()):
            param.copy_(torch.randn(param.shape, generator=generator))
    layer.set_dropout_source(rng=rng)
    return layer.train()


def _run(rng, *, recompute: bool):
    """Output and the gradients of (x, A, B, u, v), from freshly seeded megatron RNG states."""
    from megatron.core import tensor_parallel

    torch.manual_seed(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=0, etp_rank=0)
    layer = _layer(rng)
    x = torch.randn(6, 2, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = tensor_parallel.checkpoint(layer, False, x) if recompute else layer(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    return out.detach(), [x.grad, *(t.grad for t in layer.factors)]


@pytest.fixture(scope="module")
def megatron_cpu():
    from nemo_tiedlora.nemo import compat

    compat.apply()


def test_recompute_draws_the_same_mask(megatron_cpu):
    """Checkpointed (forward without graph, recomputed in backward) equals the plain run: same output, same
    gradients of x, A, B, u, v (so the recompute applied the forward's mask)."""
    from nemo_tiedlora.nemo.injection import _dropout_rng

    want_out, want_grads = _run(_dropout_rng, recompute=False)
    got_out, got_grads = _run(_dropout_rng, recompute=True)
    torch.testing.assert_close(got_out, want_out, rtol=0.0, atol=0.0)
    for name, got, want in zip(("x", "A", "B", "u", "v"), got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")


def test_control_a_mask_source_megatron_does_not_save_breaks_recompute(megatron_cpu):
    """Control: masks from a private generator (advanced by every draw, unknown to the checkpoint) differ between the
    forward and its recompute, and the checkpointed gradients are not the plain run's."""
    def private_source():
        generator = torch.Generator().manual_seed(5)

        @contextlib.contextmanager
        def rng():
            outside = torch.get_rng_state()
            torch.set_rng_state(generator.get_state())
            try:
                yield
            finally:
                generator.set_state(torch.get_rng_state())
                torch.set_rng_state(outside)

        return rng

    _, want_grads = _run(private_source(), recompute=False)
    _, got_grads = _run(private_source(), recompute=True)
    assert not torch.allclose(got_grads[1], want_grads[1], rtol=1e-3, atol=1e-3)  # A's gradient

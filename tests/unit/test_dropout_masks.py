"""Adapter dropout keep-masks under tensor and sequence parallelism, simulated in one process against plain torch.

Reference: the mask one process draws for the whole input, ``torch.empty(x.shape).bernoulli_(1 - p, generator=g)``
from the same generator state, and the plain formula ``s * v * (B (u * (A (x * mask / (1 - p)))))`` with it.
Checked: a sequence shard's mask is exactly its rows of that mask (and owns only them); the sequence-parallel
layers' outputs are the TP1 output's rows and their A/u gradients sum to TP1's; TP ranks without SP draw TP1's whole
mask; the mask comes from the context given to `set_dropout_source`, which leaves torch's own generator as it was.
The multi-process runs against TP1 are tests/distributed/test_dropout_tp.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.autograd import sequence_keep_mask
from nemo_tiedlora.core.modules import LayerFactors, SharedFactors

P, SEED = 0.1, 1234
S, B, D, OUT, RANK = 8, 2, 16, 24, 4


def _reference_mask(shape, seed: int = SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape).bernoulli_(1.0 - P, generator=generator).bool()


@pytest.mark.parametrize("count", [1, 2, 4])
def test_shard_masks_are_the_rows_of_the_whole_sequence_mask(count):
    """Shard k of n (x [S/n, B, D]) gets rows k S/n .. (k+1) S/n of the [S, B, D] mask drawn from the same state,
    in a tensor of its own (no view keeping the whole mask alive); the whole mask keeps about 1 - p."""
    whole = _reference_mask((S, B, D))
    assert abs(whole.float().mean().item() - (1 - P)) < 0.05
    rows = S // count
    shards = []
    for k in range(count):
        mask = sequence_keep_mask(torch.empty(rows, B, D), P, shard=(k, count),
                                  generator=torch.Generator().manual_seed(SEED))
        assert mask.dtype == torch.bool and mask.untyped_storage().nbytes() == mask.numel()
        shards.append(mask)
    assert torch.equal(torch.cat(shards), whole)
    unsharded = sequence_keep_mask(torch.empty(S, B, D), P, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(unsharded, whole)


def test_bad_shard_index_is_refused():
    with pytest.raises(ValueError, match="sequence shard index"):
        sequence_keep_mask(torch.empty(4, 1, 2), P, shard=(2, 2))


def _layer() -> LayerFactors:
    cfg = TiedLoraConfig(preset="tl6", rank=RANK, dropout=P)
    shared = SharedFactors(cfg, in_features=D, out_features=OUT)
    layer = LayerFactors(cfg, in_features=D, out_features=OUT, layer_number=1, shared=shared)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in (*shared.parameters(), *layer.parameters()):
            param.copy_(torch.randn(param.shape, generator=generator))  # no zero factor
    return layer.train()


def _reference(layer: LayerFactors, x: torch.Tensor) -> torch.Tensor:
    a, b, u, v = (t.detach() for t in layer.factors)
    dropped = x * _reference_mask(x.shape) / (1 - P)
    return layer.cfg.scale * v * (((dropped @ a.t()) * u) @ b.t())


@contextlib.contextmanager
def _shared_state():
    """Stands in for megatron's data-parallel RNG state: the same state on every simulated rank."""
    outside = torch.get_rng_state()
    torch.manual_seed(SEED)
    try:
        yield
    finally:
        torch.set_rng_state(outside)


def test_sequence_parallel_layers_equal_tp1():
    """Two sequence-parallel ranks (x shards [S/2, B, D], sequence_shard (k, 2)): each output is its rows of the TP1
    reference output with TP1's mask, and the shards' A and u gradients sum to TP1's (what the TP sum does)."""
    x = torch.randn(S, B, D, generator=torch.Generator().manual_seed(5))
    tp1 = _layer()
    tp1.set_dropout_source(rng=_shared_state)
    whole = tp1(x)
    torch.testing.assert_close(whole, _reference(tp1, x), rtol=1e-5, atol=1e-5)
    whole.sum().backward()
    outputs, grads = [], []
    for k in range(2):
        rank = _layer()
        rank.set_dropout_source(sequence_shard=(k, 2), rng=_shared_state)
        out = rank(x[k * S // 2:(k + 1) * S // 2])
        out.sum().backward()
        outputs.append(out.detach())
        a, _, u, _ = rank.factors
        grads.append((a.grad, u.grad))
    torch.testing.assert_close(torch.cat(outputs), whole.detach(), rtol=1e-5, atol=1e-5)
    a, _, u, _ = tp1.factors
    torch.testing.assert_close(grads[0][0] + grads[1][0], a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1] + grads[1][1], u.grad, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_ranks_without_sp_draw_the_tp1_mask():
    """Two TP ranks without SP (whole x, their own output rows): each rank's output is its rows of the TP1 reference,
    so both applied TP1's whole mask."""
    x = torch.randn(S, B, D, generator=torch.Generator().manual_seed(6))
    layer = _layer()
    layer.set_dropout_source(rng=_shared_state)
    reference = _reference(layer, x)
    for k in range(2):
        rows = slice(k * OUT // 2, (k + 1) * OUT // 2)
        torch.testing.assert_close(layer(x, rows), reference[..., rows], rtol=1e-5, atol=1e-5)


def test_the_mask_comes_from_the_given_state_and_leaves_torch_generator_alone():
    """The draw happens in the `rng` context (outputs equal with any global seed before) and the global generator
    is where it was; with the default source the global generator is what draws (the seed changes the output)."""
    x = torch.randn(S, B, D, generator=torch.Generator().manual_seed(7))
    layer = _layer()
    layer.set_dropout_source(rng=_shared_state)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = layer(x)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    assert torch.equal(layer(x), first)
    plain = _layer()
    torch.manual_seed(1)
    one = plain(x)
    torch.manual_seed(2)
    assert not torch.equal(plain(x), one)

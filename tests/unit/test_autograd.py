"""core/autograd.py against the plain composition of torch ops (functional.tied_lora_update, the reference): outputs and
every gradient for all presets, layer_selection, TP row partitions, the split form, dropout, bf16 and autocast;
gradcheck in float64; what backward keeps, counted with saved_tensors_hooks, against the closed form."""

from __future__ import annotations

import pytest
import torch
from spec_table import PRESET_NAMES, trained

from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.functional import tied_lora_update
from nemo_tiedlora.core.autograd import TiedLoraDown, TiedLoraUp, TiedLoraUpdate, fused_tied_lora_update
from nemo_tiedlora.core.modules import LayerFactors, SharedFactors

D, RANK = 32, 4
OUTS = {"mha": 3 * D, "gqa": D + 2 * 2 * 8}  # gqa: 4 heads of 8, 2 query groups
SCALE = 0.75


def _factors(preset: str, out: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Random A, B, u, v (all non-zero) with requires_grad from the spec table."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"A": (RANK, D), "B": (out, RANK), "u": (RANK,), "v": (out,)}
    return [torch.randn(*shape, generator=g).to(dtype).requires_grad_(trained(preset)[name])
            for name, shape in shapes.items()]


def _run(fn, x, factors, dz=None):
    """Output and the gradients of (x, A, B, u, v) for upstream gradient ``dz`` (default: a fixed random one)."""
    x = x.detach().clone().requires_grad_(True)
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in factors]
    out = fn(x, *leaves)
    if dz is None:
        dz = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    out.backward(dz)
    return out.detach(), [x.grad] + [t.grad for t in leaves]


def _assert_same(got, want, *, tol=1e-5):
    out, grads = got
    ref_out, ref_grads = want
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    for name, grad, ref in zip(("x", "A", "B", "u", "v"), grads, ref_grads):
        assert (grad is None) == (ref is None), f"grad of {name}: {grad is None} vs reference {ref is None}"
        if ref is not None:
            torch.testing.assert_close(grad, ref, rtol=tol, atol=tol, msg=lambda m: f"grad of {name}: {m}")


def _identity_region(g):
    return g


@pytest.mark.parametrize("split", [False, True], ids=["one_piece", "split"])
@pytest.mark.parametrize("shape", sorted(OUTS))
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_fused_equals_reference(preset, shape, split):
    factors = _factors(preset, OUTS[shape])
    x = torch.randn(6, 3, D, generator=torch.Generator().manual_seed(1))  # [s, b, d]
    region = _identity_region if split else None
    got = _run(lambda x, a, b, u, v: fused_tied_lora_update(x, a, b, u, v, SCALE, region=region), x, factors)
    want = _run(lambda x, a, b, u, v: tied_lora_update(x, a, b, u, v, SCALE), x, factors)
    _assert_same(got, want)
    for name, grad in zip("ABuv", got[1][1:]):
        assert (grad is not None) == trained(preset)[name]  # frozen factors get no gradient


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_tp_row_partitions(preset):
    """Each TP rank's rows of B and v (whole query groups), with that rank's columns of one upstream gradient: the
    partition's output and gradients equal the reference on the same rows, the partitions' outputs side by side are
    the full reference's output, and the partitions' gradients of x, A, B, u and v add up to the full reference's."""
    out = OUTS["gqa"]
    factors = _factors(preset, out)
    x = torch.randn(5, 2, D, generator=torch.Generator().manual_seed(2))
    dz = torch.randn(5, 2, out, generator=torch.Generator().manual_seed(3))
    full = _run(lambda x, a, b, u, v: tied_lora_update(x, a, b, u, v, SCALE), x, factors, dz)
    parts = []
    for rows in (slice(0, out // 2), slice(out // 2, out)):
        got = _run(lambda x, a, b, u, v: fused_tied_lora_update(x, a, b[rows], u, v[rows], SCALE,
                                                                region=_identity_region), x, factors, dz[..., rows])
        want = _run(lambda x, a, b, u, v: tied_lora_update(x, a, b[rows], u, v[rows], SCALE), x, factors,
                    dz[..., rows])
        _assert_same(got, want)
        parts.append(got)
    torch.testing.assert_close(torch.cat([p[0] for p in parts], dim=-1), full[0])
    for i, name in enumerate(("x", "A", "B", "u", "v")):  # B, v: each partition's grad is zero off its rows
        grads = [p[1][i] for p in parts]
        if full[1][i] is None:
            assert all(g is None for g in grads), name
        else:
            torch.testing.assert_close(grads[0] + grads[1], full[1][i], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"summed grad of {name}: {m}")


def _saved_for_backward(fn, *args) -> list[torch.Tensor]:
    """Every tensor autograd keeps for backward while ``fn(*args)`` runs (each one passes the pack hook)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return saved


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _kept_beyond_inputs(saved, inputs) -> int:
    """Elements of the saved tensors that share storage with none of ``inputs`` (x, the factors, the mask)."""
    known = {_storage(t) for t in inputs}
    return sum(t.numel() for t in saved if _storage(t) not in known)


@pytest.mark.parametrize("split", [False, True], ids=["one_piece", "split"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_backward_keeps_only_rank_sized_tensors(preset, split):
    """Counted with saved_tensors_hooks, against the closed form of core/autograd.py: beyond x and the factors,
    backward keeps h = A x [T, r] (one piece: if u, B or v trains; split: if u trains) and, split, g [T, r] (if B or
    v trains); x itself (the same storage) only if A trains. The reference composition keeps a [T, out] tensor
    whenever v trains."""
    factors = _factors(preset, OUTS["mha"])
    x = torch.randn(6, 3, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    tokens, flags = 6 * 3, trained(preset)
    region = _identity_region if split else None
    saved = _saved_for_backward(lambda *t: fused_tied_lora_update(*t, SCALE, region=region), x, *factors)
    if split:
        closed_form = tokens * RANK * (int(flags["u"]) + int(flags["B"] or flags["v"]))
    else:
        closed_form = tokens * RANK * int(flags["u"] or flags["B"] or flags["v"])
    assert _kept_beyond_inputs(saved, [x, *factors]) == closed_form
    assert (_storage(x) in {_storage(t) for t in saved}) == flags["A"]
    reference = _saved_for_backward(lambda *t: tied_lora_update(*t, SCALE), x, *factors)
    if flags["v"]:
        assert _kept_beyond_inputs(reference, [x, *factors]) >= tokens * OUTS["mha"]


def _stack(cfg: TiedLoraConfig, layers: int = 4):
    shared = SharedFactors(cfg, in_features=D, out_features=OUTS["mha"]) if cfg.flags.tied else None
    selected = cfg.layer_selection or range(1, layers + 1)
    stack = torch.nn.ModuleList(LayerFactors(cfg, in_features=D, out_features=OUTS["mha"], layer_number=n,
                                             shared=shared) for n in selected)
    with torch.no_grad():
        for p in [*stack.parameters(), *(shared.parameters() if shared is not None else [])]:
            p.normal_(generator=torch.Generator().manual_seed(int(p.numel())))
    return stack, shared


@pytest.mark.parametrize("preset", ["tl6", "lora", "vera"])
def test_modules_with_layer_selection_use_the_fused_update(preset):
    """LayerFactors (tied or untied, only the selected layers) gives the reference's outputs and gradients."""
    cfg = TiedLoraConfig(preset=preset, rank=RANK, layer_selection=[1, 3])
    stack, shared = _stack(cfg)
    assert [layer.layer_number for layer in stack] == [1, 3]
    x = torch.randn(4, 2, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = sum(layer(x).square().sum() for layer in stack)
    out.backward()
    params = list({id(p): p for layer in stack for p in layer.factors if p.requires_grad}.values())
    got = [x.grad] + [p.grad for p in params]
    x_ref = x.detach().clone().requires_grad_(True)
    ref_params = {id(p): p.detach().clone().requires_grad_(True) for p in params}
    ref = sum(tied_lora_update(x_ref, *(ref_params.get(id(t), t.detach()) for t in layer.factors), cfg.scale)
              .square().sum() for layer in stack)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for grad, want in zip(got, [x_ref.grad] + [ref_params[id(p)].grad for p in params]):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("split", [False, True], ids=["one_piece", "split"])
def test_dropout_keeps_the_mask_not_a_copy(split):
    """With a keep-mask the result equals the reference with the same dropout applied before it, and backward keeps
    the caller's mask itself (the same storage) and the undropped x, and no other tensor of x's size (no dropped
    copy of x, no copy of the mask)."""
    factors = _factors("tl6", OUTS["mha"])
    x = torch.randn(6, 2, D, generator=torch.Generator().manual_seed(4))
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) > 0.3
    keep = 0.7
    region = _identity_region if split else None
    got = _run(lambda x, a, b, u, v: fused_tied_lora_update(x, a, b, u, v, SCALE, keep_mask=mask, keep_prob=keep,
                                                            region=region), x, factors)
    want = _run(lambda x, a, b, u, v: tied_lora_update(x, a, b, u, v, SCALE, dropout=lambda t: t * mask / keep),
                x, factors)
    _assert_same(got, want)
    leaves = [t.detach().requires_grad_(True) for t in factors]  # A trains: x must be kept, undropped
    x = x.requires_grad_(True)
    saved = _saved_for_backward(lambda *t: fused_tied_lora_update(*t, SCALE, keep_mask=mask, keep_prob=keep,
                                                                  region=region), x, *leaves)
    storages = {_storage(t) for t in saved}
    assert _storage(mask) in storages and _storage(x) in storages
    own = {_storage(mask), _storage(x)}
    assert [t.shape for t in saved if t.shape[-1] == D and t.numel() == x.numel() and _storage(t) not in own] == []


def test_layer_dropout_only_in_training():
    cfg = TiedLoraConfig(preset="tl6", rank=RANK, dropout=0.5)
    stack, _ = _stack(cfg, layers=1)
    layer = stack[0]
    x = torch.ones(64, 8, D)
    layer.eval()
    a, b, u, v = (t.detach() for t in layer.factors)
    torch.testing.assert_close(layer(x), tied_lora_update(x, a, b, u, v, cfg.scale))
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), tied_lora_update(x, a, b, u, v, cfg.scale))


def test_bf16_matches_reference():
    factors = _factors("tl6", OUTS["mha"], dtype=torch.bfloat16)
    x = torch.randn(8, 2, D, generator=torch.Generator().manual_seed(6)).bfloat16()
    for region in (None, _identity_region):
        got = _run(lambda x, a, b, u, v: fused_tied_lora_update(x, a, b, u, v, SCALE, region=region), x, factors)
        want = _run(lambda x, a, b, u, v: tied_lora_update(x, a, b, u, v, SCALE), x, factors)
        assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got[1])
        # both round differently in bf16: compare each against the fp32 computation at bf16's tolerance
        exact = _run(lambda x, a, b, u, v: tied_lora_update(x, a, b, u, v, SCALE), x.float(),
                     [t.detach().float().requires_grad_(t.requires_grad) for t in factors])
        for result in (got, want):
            for value, ref in zip([result[0], *result[1]], [exact[0], *exact[1]]):
                scale = ref.abs().max().item()
                torch.testing.assert_close(value.float(), ref, rtol=0.0, atol=2e-2 * scale)


def test_autocast_bf16_matches_reference():
    factors = _factors("tl6", OUTS["gqa"])
    x = torch.randn(8, 2, D, generator=torch.Generator().manual_seed(8))

    def autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args).float()
        return run

    got = _run(autocast(lambda x, a, b, u, v: fused_tied_lora_update(x, a, b, u, v, SCALE)), x, factors)
    want = _run(autocast(lambda x, a, b, u, v: tied_lora_update(x, a, b, u, v, SCALE)), x, factors)
    assert all(g.dtype == torch.float32 for g in got[1])  # gradients of fp32 leaves stay fp32
    for value, ref in zip([got[0], *got[1]], [want[0], *want[1]]):
        torch.testing.assert_close(value, ref, rtol=0.0, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("preset", ["tl6", "lora", "vera", "tl1", "tl4"])
def test_gradcheck_float64(preset):
    a, b, u, v = (t.detach().double().requires_grad_(t.requires_grad) for t in _factors(preset, 20))
    a = a[:, :8].detach().clone().requires_grad_(a.requires_grad)  # d = 8 keeps gradcheck fast
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 2, 8, generator=torch.Generator().manual_seed(9)) > 0.25
    assert torch.autograd.gradcheck(lambda *t: TiedLoraUpdate.apply(*t, 0.5, None, 1.0), (x, a, b, u, v))
    assert torch.autograd.gradcheck(lambda *t: TiedLoraUpdate.apply(*t, 0.5, mask, 0.75), (x, a, b, u, v))
    assert torch.autograd.gradcheck(
        lambda x, a, b, u, v: TiedLoraUp.apply(TiedLoraDown.apply(x, a, u, mask, 0.75), b, v, 0.5), (x, a, b, u, v))

"""The CUDA path (run where a GPU is lent, and in the Jenkinsfile's GPU stage): the update on CUDA against the
plain-torch formula in fp32 and bf16, and TiedLoraQKV around megatron's TransformerEngine layernorm-linear, whose
normalized output the adapter must read (docs/design.md section 4). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_update_on_cuda_matches_reference(dtype, tol):
    from nemo_tiedlora.core.functional import tied_lora_update

    g = torch.Generator(device="cpu").manual_seed(0)
    d, r, out = 256, 8, 768
    x, a, b = torch.randn(4, 16, d, generator=g), torch.randn(r, d, generator=g), torch.randn(out, r, generator=g)
    u, v = torch.randn(r, generator=g), torch.randn(out, generator=g)
    reference = 2.0 * (x @ a.t() @ torch.diag(u) @ b.t() @ torch.diag(v))
    got = tied_lora_update(*(t.cuda().to(dtype) for t in (x, a, b, u, v)), 2.0).float().cpu()
    torch.testing.assert_close(got, reference, rtol=tol, atol=tol * reference.abs().max().item())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_update_on_cuda_matches_reference(dtype, tol):
    """The fused autograd functions (one piece and split) on CUDA: output and every gradient vs the reference."""
    from nemo_tiedlora.core.functional import tied_lora_update
    from nemo_tiedlora.core.autograd import fused_tied_lora_update

    g = torch.Generator(device="cpu").manual_seed(0)
    d, r, out = 256, 8, 768
    tensors = [torch.randn(4, 16, d, generator=g), torch.randn(r, d, generator=g), torch.randn(out, r, generator=g),
               torch.randn(r, generator=g), torch.randn(out, generator=g)]
    dz = torch.randn(4, 16, out, generator=g).cuda().to(dtype)

    def grads(fn):
        leaves = [t.cuda().to(dtype).requires_grad_(True) for t in tensors]
        fn(*leaves, 2.0).backward(dz)
        return [leaf.grad.float().cpu() for leaf in leaves]

    want = grads(tied_lora_update)
    for region in (None, lambda t: t):
        got = grads(lambda *t: fused_tied_lora_update(*t, region=region))
        for value, ref in zip(got, want):
            torch.testing.assert_close(value, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_te_fused_layernorm_input():
    pytest.importorskip("transformer_engine")
    pytest.importorskip("nemo")
    from megatron.core import parallel_state
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_tiedlora.core.config import TiedLoraConfig
    from nemo_tiedlora.nemo.launch import ensure_process_groups
    from nemo_tiedlora.nemo.adapters import TiedLoraLayerAdapter, TiedLoraQKV, TiedLoraSharedAdapter

    ensure_process_groups(world_size=1, global_rank=0)
    assert parallel_state.model_parallel_is_initialized()
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
                               params_dtype=torch.float32)
    base = TELayerNormColumnParallelLinear(64, 192, config=config, init_method=torch.nn.init.xavier_uniform_,
                                           gather_output=False, bias=False, skip_bias_add=False, is_expert=False)
    base = base.cuda()
    cfg = TiedLoraConfig(preset="tl6", rank=4)
    shared = TiedLoraSharedAdapter(in_features=64, out_features=192, tiedlora=cfg).cuda()
    layer = TiedLoraLayerAdapter(in_features=64, out_features=192, tiedlora=cfg, layer_number=1).cuda()
    layer.bind_shared(shared)  # an adapter type TiedLoraQKV accepts (a plain LayerFactors would be skipped)
    with torch.no_grad():
        for t in layer.factors:
            t.normal_()
    wrapper = TiedLoraQKV(base, layer_number=1, shared_owner=None, out_rows=None, tensor_parallel_size=1,
                          sequence_parallel=False)
    wrapper.adapter_layer = torch.nn.ModuleDict({"tiedlora": layer})
    wrapper.adapter_cfg = {"tiedlora": {"enabled": True}}
    x = torch.randn(8, 2, 64, device="cuda")
    out, _ = wrapper(x)
    normalized = torch.nn.functional.rms_norm(x, (64,), base.layer_norm_weight, config.layernorm_epsilon)
    a, b, u, v = (t.detach() for t in layer.factors)
    expected = normalized @ base.weight.t() + normalized @ a.t() @ torch.diag(u) @ b.t() @ torch.diag(v)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)

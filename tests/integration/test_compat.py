"""The table of runtime replacements (`nemo_tiedlora.nemo.compat`): every entry declared with its target, kind,
scope, reason and a real `needed()`; the CPU-only Tensor.type rebinding limited to megatron's optimizer calls; and
the fixes judged by behaviour: NeMo's own LoRA (QKV and attention-dense adapters) runs on megatron-core 0.13 with the
`nemo-lora-attention-forward` fix and computes what its merged weights compute."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from tests.integration.conftest import finetune_cfg

pytestmark = pytest.mark.integration


def test_every_patch_is_declared_with_target_scope_reason_and_a_real_condition():
    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.compat.patch import AREAS, resolve

    compat.apply()
    names = [patch.name for patch in compat.PATCHES]
    assert len(names) == len(set(names))
    for patch in compat.PATCHES:
        assert patch.kind in (compat.FIX, compat.HOOK) and patch.area in AREAS, patch.name
        assert ".py" in patch.reason, f"{patch.name}: the reason names the upstream file it concerns"
        assert patch.scope and patch.target, patch.name
        # a real test of the upstream condition, not `lambda: True`
        assert getattr(patch.needed, "__name__", "") != "<lambda>", patch.name
    table = compat.describe()
    assert all(name in table for name in names)
    # every runtime replacement (also those once made outside the table) is in it, and every hook's target exists here
    for target in ("NLPAdapterModelMixin.add_adapter", "MegatronBaseModel.allreduce_gradients",
                   "megatron_gpt_model:finalize_model_grads", "megatron_gpt_sft_model:finalize_model_grads",
                   "NLPAdapterModelMixin.load_adapters", "NLPAdapterModelMixin.save_to",
                   "MegatronBaseModel.build_transformer_config"):
        assert any(target in t for patch in compat.PATCHES for t in patch.target), target
    for patch in compat.PATCHES:
        if patch.kind == compat.HOOK:
            assert compat.needed(patch), patch.name
            assert patch.name in {p.name for p in compat.applied()}, patch.name
    mixins = resolve("nemo.collections.nlp.parts.mixins.nlp_adapter_mixins:NLPAdapterModelMixin")
    assert getattr(mixins.add_adapter, "_nemo_tiedlora", False)


def test_cli_compat_lists_every_patch(capsys):
    from nemo_tiedlora.apps.cli import main
    from nemo_tiedlora.nemo import compat

    assert main(["compat"]) == 0
    out = capsys.readouterr().out
    for patch in compat.PATCHES:
        assert f"{patch.name}  [{patch.kind}, {patch.area}]" in out
    assert out.count("    scope:  ") == len(compat.PATCHES) and "needed here: " in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only fix")
def test_cpu_tensor_type_is_rebound_only_inside_megatrons_optimizer_calls():
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.compat.cpu import cuda_tensor_type_names

    upstream = torch.Tensor.type
    compat.apply(on_demand=("cpu-distributed-optimizer-type-checks",))
    assert torch.Tensor.type is upstream and torch.zeros(1).type() == "torch.FloatTensor"
    with cuda_tensor_type_names():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.Tensor.type is upstream
    for function in (DistributedOptimizer.__init__, clip_grads.clip_grad_by_total_norm_fp32,
                     optimizer.clip_grad_by_total_norm_fp32):
        assert getattr(function, "_nemo_tiedlora_fix", False), function

    # clip_grad_by_total_norm_fp32 accepts CPU fp32 gradients now (upstream: AssertionError on type())
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    optimizer.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=float(param.grad.norm()))
    assert torch.Tensor.type is upstream
    torch.testing.assert_close(float(param.grad.norm()), 1.0, rtol=1e-4, atol=1e-4)


def test_nemo_lora_on_qkv_and_dense_equals_its_merged_weights(tiny, tmp_path):
    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.finetune import build
    from nemo_tiedlora.nemo.cpu_restore import restore_base as _restore_base

    base, data, spec = tiny
    cfg = finetune_cfg(base, data, tmp_path)
    with open_dict(cfg):
        cfg.exp_manager = None
        cfg.model.peft.peft_scheme = "lora"
        cfg.model.peft.lora_tuning.update(adapter_dim=4, alpha=8, target_modules=["attention_qkv", "attention_dense"])
    _, model, _, _ = build(cfg)
    assert "nemo-lora-attention-forward" in {fix.name for fix in compat.applied()}
    generator = torch.Generator().manual_seed(3)
    updates = {}
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            for adapter_name, target in (("lora_kqv_adapter", "linear_qkv"), ("lora_dense_attention_adapter",
                                                                             "linear_proj")):
                adapter = layer.self_attention.get_adapter_module(adapter_name)
                assert adapter is not None, adapter_name
                for linear in (adapter.linear_in, adapter.linear_out):
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.3)
                # NeMo's LoRA: x -> (alpha / dim) * linear_out(linear_in(x)) added to the target's output
                updates[(layer.layer_number, target)] = (8 / 4) * adapter.linear_out.weight @ adapter.linear_in.weight
    tokens = torch.randint(4, 200, (2, spec.seq_length), generator=generator)
    positions = torch.arange(spec.seq_length).unsqueeze(0).expand(2, -1)
    model.model.eval()
    with torch.no_grad():
        lora_logits = model.model(input_ids=tokens, position_ids=positions, attention_mask=None)

    merged = _restore_base(base)
    merged.model.eval()
    with torch.no_grad():
        base_logits = merged.model(input_ids=tokens, position_ids=positions, attention_mask=None)
        for layer in merged.model.decoder.layers:
            for target in ("linear_qkv", "linear_proj"):
                getattr(layer.self_attention, target).weight.add_(updates[(layer.layer_number, target)])
        merged_logits = merged.model(input_ids=tokens, position_ids=positions, attention_mask=None)
    torch.testing.assert_close(lora_logits, merged_logits, rtol=1e-4, atol=1e-4)
    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapters act: the comparison is not vacuous

"""The compatibility fixes, judged by behaviour: NeMo's own LoRA (QKV and attention-dense adapters) runs on
megatron-core 0.13 with the `nemo-lora-attention-forward` fix and computes what its merged weights compute."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from tests.integration.conftest import finetune_cfg

pytestmark = pytest.mark.integration


def test_every_fix_names_its_scope_and_defect():
    from nemo_tiedlora.nemo import compat

    names = [fix.name for fix in compat.FIXES]
    assert len(names) == len(set(names))
    for fix in compat.FIXES:
        assert fix.scope in ("environment", "mcore", "lightning", "nemo", "cpu"), fix.name
        assert ".py" in fix.defect, f"{fix.name}: the defect names the upstream file it lives in"
    table = compat.describe()
    assert all(name in table for name in names)


def test_nemo_lora_on_qkv_and_dense_equals_its_merged_weights(tiny, tmp_path):
    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.finetune import build
    from nemo_tiedlora.nemo.base_io import restore_base as _restore_base

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

"""End to end: a Tied-LoRA model in real NeMo vs its export loaded by transformers + peft (docs/design.md section 6).

The tiny Llama-style base (RMSNorm, SwiGLU, RoPE, GQA 4 heads / 2 query groups, untied embeddings, padded
vocabulary) with random adapter factors; the references are NeMo's own logits, with and without the adapters.
The base is exported from ``model.model.state_dict()`` as is (the export reads the Tied-LoRA wrapper's
``linear_qkv.base.weight`` as the frozen base weight and skips the adapter tensors).
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.conftest import finetune_cfg

pytestmark = pytest.mark.integration

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _build(tiny, tmp_path, **tuning):
    from nemo_tiedlora.nemo.finetune import build

    base, data, _ = tiny
    cfg = finetune_cfg(base, data, tmp_path, **tuning)
    return build(cfg)


def _logits(model, tokens, positions):
    gpt = model.model
    gpt.eval()
    with torch.no_grad():
        return gpt(input_ids=tokens, position_ids=positions, attention_mask=None)  # [b, s, padded vocab]


def _set_adapters_enabled(model, enabled: bool) -> None:
    from nemo_tiedlora.nemo.adapters import TiedLoraQKV

    for layer in model.model.decoder.layers:
        if isinstance(layer.self_attention.linear_qkv, TiedLoraQKV):
            layer.self_attention.linear_qkv.set_enabled_adapters(enabled=enabled)


@pytest.mark.parametrize(
    "tuning",
    [
        dict(preset="tl6", adapter_dim=4, alpha=8),
        dict(preset="lora", adapter_dim=4, alpha=8),
        dict(preset="tl6", adapter_dim=4, layer_selection=[2]),
    ],
    ids=["tl6-alpha8", "lora-alpha8", "tl6-layer2"],
)
def test_hf_llama_plus_peft_reproduces_nemo_logits(tuning, tiny, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from nemo_tiedlora.formats.hf.nemo_to_hf import hf_peft_adapter, nemo_gpt_to_hf_llama, write_hf_model, write_hf_peft
    from nemo_tiedlora.formats.merge_delta import per_layer_lora
    from nemo_tiedlora.nemo.find_adapters import iter_layer_adapters, iter_shared_adapters
    from nemo_tiedlora.nemo.adapter_state import local_adapter_state

    _, _, spec = tiny
    trainer, model, peft_cfg, _ = _build(tiny, tmp_path, **tuning)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every factor random: A, B ~ N(0, 0.1^2), u, v ~ N(1, 0.3^2) (no update vanishes)
        owners = [adapter for _, adapter in iter_layer_adapters(model)] + list(iter_shared_adapters(model))
        for owner in owners:
            for param in owner.parameters(recurse=False):
                vector = param.dim() == 1
                param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if vector else 0.1) + float(vector))

    tokens = torch.randint(4, model.tokenizer.vocab_size, (2, spec.seq_length), generator=generator)
    positions = torch.arange(spec.seq_length).unsqueeze(0).expand(2, -1)
    adapted = _logits(model, tokens, positions)
    _set_adapters_enabled(model, False)
    base = _logits(model, tokens, positions)
    _set_adapters_enabled(model, True)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the output: the comparison below means something

    hf_state, hf_config = nemo_gpt_to_hf_llama(model.model.state_dict(), model.cfg)
    assert hf_config["vocab_size"] == model.padded_vocab_size == adapted.shape[-1]  # the padded vocabulary
    base_dir = write_hf_model(tmp_path / "hf_base", hf_state, hf_config)
    adapter_config, adapter_tensors = hf_peft_adapter(
        local_adapter_state(model), peft_cfg.tiedlora, peft_cfg.shape, base_model_name_or_path=str(base_dir)
    )
    adapter_dir = write_hf_peft(tmp_path / "hf_adapter", adapter_config, adapter_tensors)

    hf = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_base = hf(input_ids=tokens, position_ids=positions).logits
    torch.testing.assert_close(hf_base, base, **TOLERANCE)

    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    adapted_layers = {name.split(".layers.")[1].split(".")[0] for name, _ in peft_model.named_modules()
                      if name.endswith("q_proj.lora_A")}
    expected_layers = tuning.get("layer_selection") or range(1, spec.num_layers + 1)
    assert adapted_layers == {str(n - 1) for n in expected_layers}
    with torch.no_grad():
        hf_adapted = peft_model(input_ids=tokens, position_ids=positions).logits
        with peft_model.disable_adapter():
            hf_disabled = peft_model(input_ids=tokens, position_ids=positions).logits
    torch.testing.assert_close(hf_adapted, adapted, **TOLERANCE)
    torch.testing.assert_close(hf_disabled, base, **TOLERANCE)

    # Negative control: B_l's rows cut in fused order (q, k, v as contiguous blocks, not per query group) is wrong.
    naive = dict(adapter_tensors)
    heads, groups, hd = (peft_cfg.shape[k] for k in ("num_attention_heads", "num_query_groups", "kv_channels"))
    for n, (_, b_l) in per_layer_lora(local_adapter_state(model), peft_cfg.tiedlora).items():
        blocks = b_l.split([heads * hd, groups * hd, groups * hd])
        for module, block in zip(("q_proj", "k_proj", "v_proj"), blocks):
            naive[f"base_model.model.model.layers.{n - 1}.self_attn.{module}.lora_B.weight"] = block.clone()
    naive_dir = write_hf_peft(tmp_path / "hf_adapter_naive", adapter_config, naive)
    fresh = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        wrong = PeftModel.from_pretrained(fresh, naive_dir).eval()(input_ids=tokens, position_ids=positions).logits
    assert (wrong - adapted).abs().max() > 1e-2


def test_export_refuses_an_existing_output_dir(tiny, tmp_path):
    from nemo_tiedlora.formats.hf.nemo_to_hf import hf_peft_adapter, nemo_gpt_to_hf_llama, write_hf_model, write_hf_peft
    from nemo_tiedlora.nemo.adapter_state import local_adapter_state

    trainer, model, peft_cfg, _ = _build(tiny, tmp_path, preset="tl5", adapter_dim=4)
    hf_state, hf_config = nemo_gpt_to_hf_llama(model.model.state_dict(), model.cfg)
    adapter = hf_peft_adapter(local_adapter_state(model), peft_cfg.tiedlora, peft_cfg.shape)
    for target, write, payload in ((tmp_path / "base", write_hf_model, (hf_state, hf_config)),
                                   (tmp_path / "adapter", write_hf_peft, adapter)):
        target.mkdir()
        (target / "keep.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="already exists.*overwrite=True"):
            write(target, *payload)
        assert [p.name for p in target.iterdir()] == ["keep.txt"]
        write(target, *payload, overwrite=True)
        assert not (target / "keep.txt").exists()

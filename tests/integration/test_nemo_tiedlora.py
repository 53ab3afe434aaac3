"""Tied-LoRA inside real NeMo (MegatronGPTSFTModel restored from a real .nemo) on CPU.

References are independent of the code under test: the spec's closed-form counts written out here, the update
written with explicit diagonal matrices, and the base model itself (step 0, frozen weights).
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.conftest import finetune_cfg
from tests.unit.spec_table import PAPER_FLAGS

pytestmark = pytest.mark.integration

PRESET_FLAGS = PAPER_FLAGS  # docs/design.md section 2: tied, A, B, u, v trained


def closed_form(preset: str, *, d: int, layers: int, r: int, out: int) -> int:
    tied, a, b, u, v = PRESET_FLAGS[preset]
    copies = 1 if tied else layers
    return a * copies * d * r + b * copies * out * r + u * layers * r + v * layers * out


def _build(tiny, tmp_path, **tuning):
    from nemo_tiedlora.nemo.finetune import build

    base, data, _ = tiny
    cfg = finetune_cfg(base, data, tmp_path, **tuning)
    return build(cfg)


def _batch(model, spec, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocab = model.tokenizer.vocab_size
    tokens = torch.randint(4, vocab, (2, spec.seq_length), generator=generator)
    positions = torch.arange(spec.seq_length).unsqueeze(0).expand(2, -1)
    return tokens, positions


def _logits(model, tokens, positions):
    gpt = model.model
    gpt.eval()
    with torch.no_grad():
        return gpt(input_ids=tokens, position_ids=positions, attention_mask=None)


@pytest.fixture(scope="module")
def base_logits(tiny, tmp_path_factory):
    """Logits of the restored base without adapters (the step-0 reference)."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel

    from nemo_tiedlora.nemo.finetune import _build_trainer, _prepare

    base, data, spec = tiny
    cfg = finetune_cfg(base, data, tmp_path_factory.mktemp("ref"))
    _prepare(cfg)
    trainer = _build_trainer(cfg)
    model_cfg = MegatronGPTSFTModel.merge_cfg_with(cfg.model.restore_from_path, cfg)
    model = MegatronGPTSFTModel.restore_from(str(base), model_cfg, trainer=trainer)
    tokens, positions = _batch(model, spec)
    qkv_weights = {layer.layer_number: layer.self_attention.linear_qkv.weight.detach().clone()
                   for layer in model.model.decoder.layers}
    return tokens, positions, _logits(model, tokens, positions), qkv_weights


@pytest.mark.parametrize("preset", list(PRESET_FLAGS))
def test_structure_counts_and_step0(preset, tiny, tmp_path, base_logits):
    from nemo_tiedlora.nemo.adapters import TiedLoraQKV
    from nemo_tiedlora.nemo.find_adapters import iter_layer_adapters, iter_shared_adapters
    from nemo_tiedlora.nemo.summary import instantiated_counts

    _, _, spec = tiny
    trainer, model, peft_cfg, _ = _build(tiny, tmp_path, preset=preset, adapter_dim=4)
    tied = PRESET_FLAGS[preset][0]
    layers = model.model.decoder.layers
    assert all(isinstance(layer.self_attention.linear_qkv, TiedLoraQKV) for layer in layers)

    adapters = dict(iter_layer_adapters(model))
    assert sorted(adapters) == [1, 2]
    a_ptrs = {adapter.factors[0].data_ptr() for adapter in adapters.values()}
    b_ptrs = {adapter.factors[1].data_ptr() for adapter in adapters.values()}
    u_ptrs = {adapter.factors[2].data_ptr() for adapter in adapters.values()}
    v_ptrs = {adapter.factors[3].data_ptr() for adapter in adapters.values()}
    assert len(u_ptrs) == len(v_ptrs) == 2  # u, v belong to their layer
    if tied:
        shared = list(iter_shared_adapters(model))
        assert len(shared) == 1
        assert a_ptrs == {shared[0].factors[0].data_ptr()} and b_ptrs == {shared[0].factors[1].data_ptr()}
    else:
        assert len(a_ptrs) == len(b_ptrs) == 2

    # A and B appear once in the PEFT state dict NeMo saves (per layer for lora)
    keys = list(model.get_peft_state_dict())
    assert sum(k.endswith(".lora_a") for k in keys) == (1 if tied else 2)
    assert sum(k.endswith(".lora_b") for k in keys) == (1 if tied else 2)

    # NeMo's optimizer setup trains exactly the preset's factors
    model.setup_optimizer_param_groups()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected_suffixes = [s for s, on in zip(("lora_a", "lora_b", "vec_u", "vec_v"), PRESET_FLAGS[preset][1:]) if on]
    assert trainable and all(any(n.endswith(s) for s in expected_suffixes) for n in trainable)
    assert {s for s in expected_suffixes if any(n.endswith(s) for n in trainable)} == set(expected_suffixes)

    d = spec.hidden_size
    out = d + 2 * spec.num_query_groups * (d // spec.num_attention_heads)
    assert out == 128  # GQA: not 3d
    assert instantiated_counts(model)["total"] == closed_form(preset, d=d, layers=2, r=4, out=out)

    tokens, positions, reference, _ = base_logits
    assert torch.equal(_logits(model, tokens, positions), reference)  # model equals the base at step 0


def test_update_and_merge_match_plain_torch(tiny, tmp_path, base_logits):
    """With all factors random, each linear_qkv adds s*v*(B(u*(A x))); merging W' = W + s diag(v) B diag(u) A into
    the base weights reproduces the adapter model's logits."""
    from nemo_tiedlora.nemo.find_adapters import iter_layer_adapters

    _, _, spec = tiny
    trainer, model, peft_cfg, _ = _build(tiny, tmp_path, preset="tl6", adapter_dim=4, alpha=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, adapter in iter_layer_adapters(model):
            for tensor in adapter.factors:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    scale = 8 / 4

    captured = {}
    qkv = model.model.decoder.layers[0].self_attention.linear_qkv
    handle = qkv.register_forward_hook(lambda m, args, output: captured.update(x=args[0], out=output[0]))
    tokens, positions, _, base_weights = base_logits
    adapted = _logits(model, tokens, positions)
    handle.remove()
    a, b, u, v = (t.detach() for t in dict(iter_layer_adapters(model))[1].factors)
    x = captured["x"]
    expected = x @ base_weights[1].t() + scale * (x @ a.t() @ torch.diag(u) @ b.t() @ torch.diag(v))
    torch.testing.assert_close(captured["out"], expected, rtol=1e-4, atol=1e-5)

    merged = model  # merged in place: the adapted logits are already taken
    with torch.no_grad():
        for layer in merged.model.decoder.layers:
            wrapper = layer.self_attention.linear_qkv
            a, b, u, v = (t.detach() for t in wrapper.get_adapter_module("tiedlora").factors)
            wrapper.base.weight.add_(scale * torch.diag(v) @ b @ torch.diag(u) @ a)
            wrapper.set_enabled_adapters(enabled=False)
    torch.testing.assert_close(_logits(merged, tokens, positions), adapted, rtol=1e-4, atol=1e-4)


class _Recorder:
    """Lightning callback: parameter snapshot at train start, losses per step."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class Recorder(Callback):
            def __init__(self):
                self.losses, self.before, self.after = [], {}, {}

            def on_train_start(self, trainer, module):
                self.before = {n: p.detach().clone() for n, p in module.named_parameters()}

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss))

            def on_train_end(self, trainer, module):
                self.after = {n: p.detach().clone() for n, p in module.named_parameters()}
                self.module = module

        return Recorder()


@pytest.mark.slow
def test_finetune_saves_restores_and_only_trains_adapters(tiny, tmp_path):
    from nemo_tiedlora.nemo.finetune import build, finetune

    base, data, spec = tiny
    cfg = finetune_cfg(base, data, tmp_path, preset="tl6", adapter_dim=8)
    recorder = _Recorder()
    adapter_path = finetune(cfg, callbacks=[recorder])

    assert len(recorder.losses) == 8
    assert sum(recorder.losses[-3:]) / 3 < recorder.losses[0]  # loss decreases
    changed = {n for n in recorder.before if not torch.equal(recorder.before[n], recorder.after[n])}
    frozen_changed = {n for n in changed if "adapter_layer" not in n}
    assert not frozen_changed  # the frozen base is bitwise unchanged
    expected = {n for n in recorder.before if n.endswith((".lora_a", ".lora_b", ".vec_u", ".vec_v"))}
    assert changed == expected  # tl6: exactly A, B and every u, v change

    assert adapter_path is not None and adapter_path.suffix == ".nemo"
    restore_cfg = finetune_cfg(base, data, tmp_path / "restore")
    restore_cfg.model.peft.restore_from_path = str(adapter_path)
    _, restored, _, _ = build(restore_cfg)
    tokens, positions = _batch(restored, spec, seed=3)
    torch.testing.assert_close(_logits(restored, tokens, positions), _logits(recorder.module, tokens, positions),
                               rtol=0, atol=0)


@pytest.mark.parametrize(
    "tuning, words",
    [
        (dict(preset="tl7"), ["unknown preset", "tl6"]),
        (dict(adapter_dim=0), ["rank", "adapter_dim"]),
        (dict(adapter_dim=65), ["exceeds hidden size 64", "adapter_dim <= 64"]),
        (dict(target_modules=["mlp_fc1"]), ["mlp_fc1", "attention_qkv"]),
        (dict(preset="tl6", train_a=False, train_b=False, train_u=False, train_v=False), ["nothing to train"]),
    ],
)
def test_bad_config_fails_before_training(tuning, words, tiny, tmp_path):
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel

    from nemo_tiedlora.core.errors import TiedLoraConfigError
    from nemo_tiedlora.nemo.peft import TiedLoraPEFTConfig

    base, data, _ = tiny
    cfg = finetune_cfg(base, data, tmp_path, **tuning)
    model_cfg = MegatronGPTSFTModel.merge_cfg_with(str(base), cfg)
    with pytest.raises(TiedLoraConfigError) as error:
        TiedLoraPEFTConfig(model_cfg)
    message = str(error.value).lower()
    assert all(word.lower() in message for word in words), message


@pytest.mark.parametrize(
    "model_overrides, words",
    [
        (dict(tensor_model_parallel_size=4), ["tensor_model_parallel_size=4", "num_query_groups=2", "[1, 2]"]),
        (dict(pipeline_model_parallel_size=3), ["pipeline_model_parallel_size=3", "num_layers=2"]),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
         ["virtual_pipeline", "no longer supported", "remove it"]),
        (dict(tensor_model_parallel_size=2, megatron_amp_O2=True), ["megatron_amp_o2", "mcore_distributed_optim"]),
    ],
)
def test_impossible_parallel_layout_is_refused_up_front(model_overrides, words, tiny, tmp_path):
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel

    from nemo_tiedlora.core.errors import TiedLoraConfigError
    from nemo_tiedlora.nemo.peft import TiedLoraPEFTConfig

    base, data, _ = tiny
    cfg = finetune_cfg(base, data, tmp_path)
    model_cfg = MegatronGPTSFTModel.merge_cfg_with(str(base), cfg)
    model_cfg.update(model_overrides)
    with pytest.raises(TiedLoraConfigError) as error:
        TiedLoraPEFTConfig(model_cfg)
    message = str(error.value).lower()
    assert all(word.lower() in message for word in words), message

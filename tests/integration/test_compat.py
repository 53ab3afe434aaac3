"""The table of runtime replacements (`nemo_tiedlora.nemo.compat`): every entry declared with its target, kind,
scope and reason; every fix's `needed()` true on this NeMo 2.4.1 / megatron-core 0.13.1 and false where the defect is
gone (a fixed copy of the upstream function, the state the fix sets, a CUDA machine); an unreadable upstream raises
`CompatUnknownUpstream`; `patch.replace` installs once, records the original and chains to it (NeMo's own
on_save_checkpoint / save_to run once per call); the CPU-only Tensor.type rebinding limited to megatron's optimizer
calls; and the fixes judged by behaviour: NeMo's own LoRA (QKV and attention-dense adapters) runs on megatron-core 0.13
with the `nemo-lora-attention-forward` fix and computes what its merged weights compute."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import textwrap

import pytest
import torch
from omegaconf import open_dict

from tests.integration.conftest import finetune_cfg

pytestmark = pytest.mark.integration

_NLP = "nemo.collections.nlp"
_MIXINS = f"{_NLP}.parts.mixins.nlp_adapter_mixins:NLPAdapterModelMixin"
_BASE = f"{_NLP}.models.language_modeling.megatron_base_model:MegatronBaseModel"
_GPT = f"{_NLP}.models.language_modeling.megatron_gpt_model"


def _patch(name: str):
    from nemo_tiedlora.nemo import compat

    compat.apply()
    return next(patch for patch in compat.PATCHES if patch.name == name)


def test_every_patch_is_declared_with_target_scope_and_reason():
    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.compat.patch import AREAS, replaced, resolve

    compat.apply()
    names = [patch.name for patch in compat.PATCHES]
    assert len(names) == len(set(names))
    for patch in compat.PATCHES:
        assert patch.kind in (compat.FIX, compat.HOOK) and patch.area in AREAS, patch.name
        assert ".py" in patch.reason, f"{patch.name}: the reason names the upstream file it concerns"
        assert patch.scope and patch.target, patch.name
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
    assert replaced(resolve(_MIXINS), "add_adapter")


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
    import megatron.core.optimizer.optimizer as optimizer

    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.compat.cpu import TYPE_CHECKING_CALLS, cuda_tensor_type_names
    from nemo_tiedlora.nemo.compat.patch import owner_and_name, replaced

    upstream = torch.Tensor.type
    compat.apply(on_demand=("cpu-distributed-optimizer-type-checks",))
    assert torch.Tensor.type is upstream and torch.zeros(1).type() == "torch.FloatTensor"
    with cuda_tensor_type_names():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.Tensor.type is upstream
    for target in TYPE_CHECKING_CALLS:
        assert replaced(*owner_and_name(target)), target

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


# ---------------------------------------------------------------------------------------------------------------
# needed(): true on this upstream, false where the defect is gone; CompatUnknownUpstream where it cannot be read
# ---------------------------------------------------------------------------------------------------------------
# fix -> (the upstream function its needed() reads, the defect as written there, the same text fixed)
SOURCE_FIXES = {
    "torch-norm-sequence-parallel": ("megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__",
                                     "assert not config.sequence_parallel", "assert True or config.sequence_parallel"),
    "te-free-specs": (f"{_GPT}:get_specs", "get_gpt_layer_with_transformer_engine_spec(",
                      "functools.partial(get_gpt_layer_with_transformer_engine_spec, "),
    "real-process-groups": (f"{_NLP}.modules.common.megatron.megatron_init:initialize_model_parallel_for_nemo",
                            "fake_initialize_model_parallel(", "parallel_state.initialize_model_parallel("),
    "nemo-lora-attention-forward": (f"{_NLP}.modules.common.megatron.adapters.mcore_mixins:"
                                    "MCoreSelfAttentionMixin.forward",
                                    "inference_params=None,", "inference_context=None, inference_params=None,"),
    "resume-epoch-length": (f"{_NLP}.data.language_modeling.megatron.megatron_batch_samplers:"
                            "BaseMegatronBatchSampler.__len__",
                            "self.total_samples - self.consumed_samples % self.total_samples", "self.total_samples"),
    "peft-checkpoint-chunk-keys": (f"{_MIXINS}.on_load_checkpoint",
                                   "self.cfg.get('virtual_pipeline_model_parallel_size', None) is not None", "True"),
    "peft-distributed-optimizer-state": (
        "nemo.core.optim.mcore_optim:McoreDistributedOptimizer.state_dict", "return self.mcore_optimizer.state_dict()",
        "return {**self.mcore_optimizer.state_dict(),\n"
        "        'param_state': self.mcore_optimizer.get_parameter_state_dp_zero()}"),
    "cpu-distributed-optimizer-type-checks": (
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups",
        "model_param.type() == 'torch.cuda.FloatTensor'", "model_param.dtype == torch.float32"),
    "cpu-cp-stream": (f"{_BASE}.setup_transformer_engine_cp_groups", "torch.cuda.Stream()", "None"),
}
# fixes whose own install removes the defect: (module, names) the fix defines or sets, taken away to see the upstream
STATE_FIXES = {
    "apex-gate": None,  # replace()d flag: undone
    "apex-only-names": (f"{_NLP}.modules.common.megatron.utils", ("listify_model",)),
    "apex-free-grad-norm": (f"{_NLP}.modules.common.megatron.clip_grads", ("multi_tensor_applier", "amp_C")),
    "generation-dispatcher-imports": None,  # stubs in sys.modules: removed
    "nvidia-pytorch-version": None,  # os.environ: unset
}
CUDA_ONLY_CONDITION = ("cpu-device", "cpu-rng", "cpu-device-literals")  # needed() is "no CUDA device here"


def _fixed_copy(target: str, defect: str, fix: str, tmp_path):
    """(owner, name, function): the upstream function `target` names, as its file writes it with `defect` replaced
    by `fix`, loaded from a file (so its source is readable)."""
    from nemo_tiedlora.nemo.compat.patch import original, owner_and_name

    owner, name = owner_and_name(target)
    upstream = original(getattr(owner, name))
    text = textwrap.dedent(inspect.getsource(upstream))
    assert defect in text, f"{target}: the defect is not written as {defect!r} upstream"
    path = tmp_path / "fixed_upstream.py"
    path.write_text("from __future__ import annotations\nimport functools\n\n" + text.replace(defect, fix))
    spec = importlib.util.spec_from_file_location("fixed_upstream", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return owner, name, vars(module)[upstream.__name__]


def _upstream_state(name: str, monkeypatch) -> None:
    """Take away what the state-setting fix `name` put in place (monkeypatch restores it after the test)."""
    import importlib

    from nemo_tiedlora.nemo.compat import environment
    from nemo_tiedlora.nemo.compat.patch import undo

    if name == "nvidia-pytorch-version":
        monkeypatch.delenv("NVIDIA_PYTORCH_VERSION", raising=False)
    elif name == "apex-gate":
        nlo = importlib.import_module(f"{_NLP}.parts.nlp_overrides")
        monkeypatch.setattr(nlo, "HAVE_APEX", nlo.HAVE_APEX)  # restored after the test whatever happens
        undo(nlo, "HAVE_APEX")
    elif name == "generation-dispatcher-imports":
        for module in environment.DISPATCHER_IMPORTS:
            if getattr(sys.modules.get(module), "__file__", None) is None:  # our stub, not the real module
                monkeypatch.delitem(sys.modules, module, raising=False)
    else:
        module, names = STATE_FIXES[name]
        for attr in names:
            monkeypatch.delattr(importlib.import_module(module), attr)


def _fix_names():
    from nemo_tiedlora.nemo.compat.table import PATCHES

    return [patch.name for patch in PATCHES if patch.kind == "fix"]


@pytest.mark.parametrize("name", _fix_names())
def test_fix_is_needed_on_this_upstream_and_not_where_the_defect_is_gone(name, monkeypatch, tmp_path):
    """needed() is true on NeMo 2.4.1 / megatron-core 0.13.1 and false for the same upstream with the defect
    removed: a fixed copy of the function it reads, the state its install sets, or (CUDA-only calls) a CUDA
    device. `def needed(): return True` fails here, and so does a fix without a case in these tables."""
    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.compat.patch import evaluate

    patch = _patch(name)
    if patch.area == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU-only fix: needed() is false with a CUDA device")
    assert name in SOURCE_FIXES or name in STATE_FIXES or name in CUDA_ONLY_CONDITION, f"{name}: no case here"
    installed = name in {p.name for p in compat.applied()}
    try:
        if name in STATE_FIXES:
            _upstream_state(name, monkeypatch)
        assert evaluate(patch) is True
        if name in SOURCE_FIXES:
            owner, attr, fixed = _fixed_copy(*SOURCE_FIXES[name], tmp_path)
            monkeypatch.setattr(owner, attr, fixed)
        elif name in STATE_FIXES:
            patch.install()
        else:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert evaluate(patch) is False
    finally:
        if installed:
            patch.install()  # a no-op unless the upstream state was put back above


@pytest.mark.parametrize("name", sorted(set(SOURCE_FIXES) - {"resume-epoch-length", "nemo-lora-attention-forward"}))
def test_unreadable_upstream_source_raises_naming_patch_source_and_versions(name, monkeypatch):
    """A bytecode-only upstream (no source to read): needed() raises CompatUnknownUpstream, one line naming the
    patch, the function it could not read and the installed NeMo / megatron-core versions (no blind install)."""
    from nemo_tiedlora.nemo.compat.patch import CompatUnknownUpstream, evaluate, owner_and_name

    patch = _patch(name)
    if patch.area == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU-only fix: needed() is false with a CUDA device")
    owner, attr = owner_and_name(SOURCE_FIXES[name][0])
    namespace: dict = {}
    exec(compile(f"def {attr}(*args, **kwargs):\n    pass\n", "<bytecode-only install>", "exec"), namespace)
    monkeypatch.setattr(owner, attr, namespace[attr])
    with pytest.raises(CompatUnknownUpstream) as raised:
        evaluate(patch)
    message = str(raised.value)
    assert "\n" not in message and f"compat patch {name}:" in message
    assert f"cannot read the source of {namespace[attr].__module__}.{attr}" in message
    assert "nemo_toolkit 2.4.1" in message and "megatron-core 0.13.1" in message


def test_missing_upstream_function_raises_naming_patch_and_what_is_missing(monkeypatch):
    """The function a needed() inspects is gone (an unknown NeMo): CompatUnknownUpstream naming the patch and the
    missing attribute, not an install."""
    from nemo_tiedlora.nemo.compat.patch import CompatUnknownUpstream, evaluate, owner_and_name

    patch = _patch("real-process-groups")
    owner, attr = owner_and_name(SOURCE_FIXES["real-process-groups"][0])
    monkeypatch.delattr(owner, attr)
    with pytest.raises(CompatUnknownUpstream, match=r"compat patch real-process-groups: .*AttributeError.*"
                                                    r"initialize_model_parallel_for_nemo"):
        evaluate(patch)


HOOK_CHECKS = {  # hook -> the upstream function whose existence its needed() checks
    "hf-tokenizer-in-archive": f"{_BASE}._build_tokenizer",
    "log-unused-config-keys": f"{_BASE}.build_transformer_config",
    "tiedlora-add-adapter": f"{_MIXINS}.add_adapter",
    "tiedlora-allreduce-gradients": f"{_BASE}.allreduce_gradients",
    "tiedlora-finalize-model-grads": f"{_GPT}:finalize_model_grads",
    "tiedlora-load-adapters": f"{_MIXINS}.load_adapters",
    "tiedlora-save-to": "nemo.core.classes.modelPT:ModelPT.save_to",
}


@pytest.mark.parametrize("name", sorted(HOOK_CHECKS))
def test_hook_is_needed_while_its_upstream_function_exists(name, monkeypatch):
    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.compat.patch import evaluate, owner_and_name

    assert {patch.name for patch in compat.PATCHES if patch.kind == compat.HOOK} == set(HOOK_CHECKS)
    patch = _patch(name)
    assert evaluate(patch) is True
    monkeypatch.setattr(*owner_and_name(HOOK_CHECKS[name]), None)
    assert evaluate(patch) is False


# ---------------------------------------------------------------------------------------------------------------
# patch.replace
# ---------------------------------------------------------------------------------------------------------------
def _recording(calls: list):
    def make(upstream):
        calls.append(("make", upstream))

        def save(self, path):
            calls.append(("ours", path))
            return upstream(self, path)

        return save

    return make


def test_replace_installs_once_records_the_original_and_chains_to_it_once_per_call():
    from nemo_tiedlora.nemo.compat.patch import is_replacement, original, replace, replaced, undo

    class Upstream:
        def save(self, path):
            calls.append(("upstream", path))
            return f"saved {path}"

    calls: list = []
    upstream = Upstream.save
    first = replace(Upstream, "save", _recording(calls))
    assert replace(Upstream, "save", _recording(calls)) is first and Upstream.save is first
    assert calls == [("make", upstream)]  # the second install made nothing
    assert replaced(Upstream, "save") and is_replacement(first) and original(first) is upstream
    calls.clear()
    assert Upstream().save("a") == "saved a" and Upstream().save("b") == "saved b"
    assert calls == [("ours", "a"), ("upstream", "a"), ("ours", "b"), ("upstream", "b")]
    undo(Upstream, "save")
    assert Upstream.save is upstream and not replaced(Upstream, "save")


def test_replace_on_a_mixin_without_the_method_chains_to_the_next_class_in_the_mro():
    from nemo_tiedlora.nemo.compat.patch import replace, undo

    class Mixin:
        pass

    class Base:
        def save(self, path):
            calls.append(("base", path))

    class Model(Mixin, Base):
        pass

    calls: list = []
    replace(Mixin, "save", _recording(calls))
    calls.clear()
    Model().save("x")
    assert calls == [("ours", "x"), ("base", "x")]
    undo(Mixin, "save")
    assert "save" not in vars(Mixin) and Model.save is Base.save


def test_nemo_on_save_checkpoint_and_save_to_run_once_behind_ours(monkeypatch):
    """On a real MegatronGPTSFTModel (NLPAdapterModelMixin first in its MRO), the replaced on_save_checkpoint and
    save_to of a model without Tied-LoRA call NeMo's own (MegatronGPTModel's, ModelPT's) exactly once each."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel
    from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin
    from nemo.core.classes.modelPT import ModelPT

    from nemo_tiedlora.nemo.compat.patch import replaced

    _patch("peft-distributed-optimizer-state")
    assert replaced(NLPAdapterModelMixin, "on_save_checkpoint") and replaced(NLPAdapterModelMixin, "save_to")
    calls: list = []
    monkeypatch.setattr(MegatronGPTModel, "on_save_checkpoint", lambda self, checkpoint: calls.append(checkpoint))
    monkeypatch.setattr(ModelPT, "save_to", lambda self, path: calls.append(path))
    model = object.__new__(MegatronGPTSFTModel)  # not built: only which methods run is observed
    checkpoint = {"state_dict": {}}
    model.on_save_checkpoint(checkpoint)
    model.save_to("adapter.nemo")
    assert calls == [checkpoint, "adapter.nemo"]

"""merge / export / inspect on a real tiny .nemo: merged logits equal the adapter model's (alpha != r)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.integration.conftest import finetune_cfg
from tests.script_env import script_env

pytestmark = pytest.mark.integration


def _logits(model, tokens, positions):
    """The NeMo model's logits for `tokens` (eval mode, no autograd)."""
    model.model.eval()
    with torch.no_grad():
        return model.model(input_ids=tokens, position_ids=positions, attention_mask=None)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """(base, adapter archive, adapter-model logits, tokens, positions, factors) with random factors, alpha=8, r=4."""
    from nemo_tiedlora.nemo.adapter_io import save_adapter
    from nemo_tiedlora.nemo.finetune import build
    from nemo_tiedlora.nemo.find_adapters import iter_layer_adapters

    base, data, spec = tiny
    work = tmp_path_factory.mktemp("tools")
    _, model, _, _ = build(finetune_cfg(base, data, work, preset="tl6", adapter_dim=4, alpha=8))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, adapter in iter_layer_adapters(model):
            for tensor in adapter.factors:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    tokens = torch.randint(4, 200, (2, spec.seq_length), generator=generator)
    positions = torch.arange(spec.seq_length).unsqueeze(0).expand(2, -1)
    logits = _logits(model, tokens, positions)
    norms = {n: (float(a.factors[2].detach().norm()), float(a.factors[3].detach().norm()))
             for n, a in iter_layer_adapters(model)}
    path = save_adapter(model, work / "adapter.nemo")
    return base, path, logits, tokens, positions, norms, work


def test_merged_nemo_reproduces_adapter_logits(trained):
    from nemo_tiedlora.nemo.cpu_restore import restore_base
    from nemo_tiedlora.tools.merge import merge

    base, adapter, logits, tokens, positions, _, work = trained
    out = merge(base=base, adapter=adapter, out=work / "merged.nemo")
    merged = restore_base(out)
    merged_logits = _logits(merged, tokens, positions)
    torch.testing.assert_close(merged_logits, logits, rtol=1e-4, atol=1e-4)
    base_model = restore_base(base)
    base_logits = _logits(base_model, tokens, positions)
    assert (base_logits - logits).abs().max() > 1e-2  # the adapter changes the model: the check is not vacuous


def test_inspect_reports_the_archive(trained):
    from nemo_tiedlora.tools.inspect import inspect_adapter

    _, adapter, _, _, _, norms, _ = trained
    report = inspect_adapter(adapter)
    assert report["rank"] == 4 and report["alpha"] == 8 and report["preset"] == "tl6"
    d, out, layers = 64, 128, 2
    assert report["trainable_parameters"]["total"] == 4 * d + 4 * out + layers * (4 + out)
    for n, (u, v) in norms.items():
        assert report["layer_norms"][n]["u"] == pytest.approx(u) and report["layer_norms"][n]["v"] == pytest.approx(v)
    assert report["file_bytes"] <= 1.05 * report["raw_tensor_bytes"] + 64 * 1024


def test_cli_refuses_existing_output_and_foreign_base(trained, tmp_path):
    base, adapter, _, _, _, _, work = trained
    existing = tmp_path / "exists.nemo"
    existing.write_bytes(b"x")
    result = subprocess.run([sys.executable, "-m", "nemo_tiedlora", "merge", "--base", str(base), "--adapter",
                             str(adapter), "--out", str(existing)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "exists" in result.stderr and "--overwrite" in result.stderr
    truncated = tmp_path / "truncated.nemo"
    truncated.write_bytes(adapter.read_bytes()[:2000])
    result = subprocess.run([sys.executable, "-m", "nemo_tiedlora", "inspect", str(truncated)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "truncated or corrupt" in result.stderr


def test_adapter_for_another_base_shape_is_refused(trained, tmp_path):
    from nemo_tiedlora.formats.adapter_archive import load_archive, save_archive
    from nemo_tiedlora.core.errors import TiedLoraCheckpointError
    from nemo_tiedlora.tools.merge import merge

    base, adapter, _, _, _, _, _ = trained
    archive = load_archive(adapter)
    other_shape = dict(archive.shape, num_layers=3)
    tensors = dict(archive.tensors, **{"layers.3.u": archive.tensors["layers.1.u"].clone(),
                                      "layers.3.v": archive.tensors["layers.1.v"].clone()})
    foreign = save_archive(tmp_path / "foreign.nemo", config=archive.config, shape=other_shape, tensors=tensors)
    with pytest.raises(TiedLoraCheckpointError) as error:
        merge(base=base, adapter=foreign, out=tmp_path / "m.nemo")
    assert "num_layers=3" in str(error.value) and "num_layers=2" in str(error.value)


def test_nemo_lora_export_loads_in_nemo_lora_with_the_same_logits(trained, tiny):
    """The export is NeMo's own lora format: NeMo's LoRA (peft_scheme=lora) restores it through load_adapters
    (which insists on exactly its adapter keys) and computes the Tied-LoRA model's logits."""
    from omegaconf import open_dict

    from nemo_tiedlora.nemo.finetune import build
    from nemo_tiedlora.tools.export import export_nemo_lora

    base, adapter, logits, tokens, positions, _, work = trained
    out = export_nemo_lora(adapter=adapter, base=base, out=work / "exported_lora.nemo")
    _, data, _ = tiny
    cfg = finetune_cfg(base, data, work / "lora_load")
    with open_dict(cfg):
        cfg.exp_manager = None
        cfg.model.peft.peft_scheme = "lora"
        cfg.model.peft.lora_tuning.adapter_dim = 4  # what the Tied-LoRA adapter was: rank 4, alpha 8
        cfg.model.peft.lora_tuning.alpha = 8
        cfg.model.peft.restore_from_path = str(out)
    _, model, _, _ = build(cfg)
    assert any("lora_kqv_adapter" in name for name, _ in model.named_parameters())
    lora_logits = _logits(model, tokens, positions)
    torch.testing.assert_close(lora_logits, logits, rtol=1e-4, atol=1e-4)


def test_hydra_merge_script_writes_a_legacy_archive_with_the_adapter_logits(trained):
    """The NeMo-style script beside the CLI: a legacy (per-rank format) TP1 output that NeMo restores strictly."""
    import tarfile
    from pathlib import Path

    from nemo_tiedlora.nemo.cpu_restore import restore_base

    base, adapter, logits, tokens, positions, _, work = trained
    out = work / "merged_legacy.nemo"
    script = (Path(__file__).resolve().parents[2]
              / "examples/nlp/language_modeling/tuning/megatron_gpt_tiedlora_merge.py")
    env = script_env()
    result = subprocess.run([sys.executable, str(script), f"base={base}", f"adapter={adapter}", f"out={out}",
                             "format=legacy"], capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with tarfile.open(out) as tar:
        names = {m.name.lstrip("./") for m in tar.getmembers()}
    assert "model_weights.ckpt" in names and not any(n.startswith("model_weights/") for n in names)
    merged = restore_base(out)
    merged_logits = _logits(merged, tokens, positions)
    torch.testing.assert_close(merged_logits, logits, rtol=1e-4, atol=1e-4)


def test_convert_distributed_to_distributed_records_the_layout_and_keeps_the_weights(trained):
    """dist -> dist: NeMo restores once and saves with the new TP/PP in its config; the weights are untouched."""
    import tarfile

    from nemo_tiedlora.nemo.base_archive import base_config, read_base
    from nemo_tiedlora.tools.convert import convert

    base, _, _, _, _, _, work = trained
    out = convert(base, work / "base_tp2pp2_dist.nemo", tp=2, pp=2)
    cfg = base_config(out)
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 2)
    with tarfile.open(out) as tar:
        assert any(m.name.lstrip("./").startswith("model_weights/") for m in tar.getmembers())
    original, converted = read_base(base), read_base(out)
    assert sorted(converted.state) == sorted(original.state)
    for key, tensor in original.state.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(converted.state[key], tensor), key

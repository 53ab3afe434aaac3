"""import-hf on tiny random-weight checkpoints of every family, built by ``transformers`` from a config.

References are independent of the importer: the logits ``transformers`` computes from the same folder, the source
safetensors themselves (round trip through ``export``), and the source tokenizer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from tests.integration.hf_tiny import FAMILIES, build_tiny
from tests.script_env import script_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# dist (NeMo writes the distributed checkpoint) for two families, legacy per-rank for the rest
FORMATS = {"llama": "dist", "smollm": "dist"}


def _import(family: str, work: Path):
    from nemo_tiedlora.tools.import_hf import import_hf

    model, tokenizer = build_tiny(family, work / "hf")
    out = import_hf(work / "hf", work / "base.nemo", fmt=FORMATS.get(family, "legacy"))
    return model, tokenizer, out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = _import(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def nemo_logits(base: Path, tokens: torch.Tensor) -> torch.Tensor:
    from nemo_tiedlora.nemo.cpu_restore import restore_base

    gpt = restore_base(base).model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return gpt(input_ids=tokens, position_ids=positions, attention_mask=None)  # [b, s, vocab]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nemo_logits_equal_transformers(family, imported):
    model, tokenizer, base = imported(family)
    tokens = torch.randint(0, len(tokenizer), (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    actual = nemo_logits(base, tokens)
    assert actual.shape == expected.shape
    difference = float((actual - expected).abs().max())
    print(f"{family}: max |NeMo - transformers| = {difference:.3g} (logits up to {float(expected.abs().max()):.3g})")
    assert difference <= 1e-4


@pytest.mark.parametrize("family", ["llama", "smollm", "mistral"])
def test_round_trip_through_export_is_bitwise(family, imported):
    from safetensors.torch import load_file

    from nemo_tiedlora.nemo.base_archive import read_base
    from nemo_tiedlora.formats.hf.nemo_to_hf import nemo_gpt_to_hf_llama

    _, _, base = imported(family)
    source = load_file(str(base.parent / "hf" / "model.safetensors"))
    checkpoint = read_base(base)
    exported, config = nemo_gpt_to_hf_llama(checkpoint.state, checkpoint.cfg)
    assert sorted(exported) == sorted(source)
    different = [key for key in source if not torch.equal(exported[key], source[key])]
    assert not different
    assert config["tie_word_embeddings"] == (family == "smollm")


def test_sharded_checkpoint_in_bf16_legacy_tp2(tmp_path):
    """Several safetensors shards + index -> bf16 legacy per-rank shards at TP2 -> joined and exported: the source
    tensors in bf16; an index naming a missing shard is refused."""
    import json

    from safetensors.torch import load_file

    from nemo_tiedlora.nemo.base_archive import read_base
    from nemo_tiedlora.core.errors import TiedLoraCheckpointError
    from nemo_tiedlora.formats.hf.nemo_to_hf import nemo_gpt_to_hf_llama
    from nemo_tiedlora.tools.import_hf import import_hf

    build_tiny("llama", tmp_path / "hf", max_shard_size="60KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    out = import_hf(tmp_path / "hf", tmp_path / "base.nemo", tp=2, fmt="legacy", dtype="bf16")
    with tarfile.open(out) as tar:
        assert {m.name.lstrip("./").split("/")[0] for m in tar.getmembers() if m.name.endswith(".ckpt")} == {
            "mp_rank_00", "mp_rank_01"}
    checkpoint = read_base(out)  # the two TP shards joined again
    exported, _ = nemo_gpt_to_hf_llama(checkpoint.state, checkpoint.cfg)
    source = {k: v for f in set(index["weight_map"].values()) for k, v in load_file(str(tmp_path / "hf" / f)).items()}
    assert sorted(exported) == sorted(source)
    for key, value in source.items():
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], value.to(torch.bfloat16)), key
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "hf" / shard).unlink()
    with pytest.raises(TiedLoraCheckpointError, match="not there"):
        import_hf(tmp_path / "hf", tmp_path / "again.nemo")


def test_bf16_distributed_checkpoint_holds_the_source_in_bf16(tmp_path):
    """--dtype bf16 --format dist: NeMo writes the distributed checkpoint in bf16 (the checkpoint's own metadata says
    so); restored and exported it holds exactly the source tensors rounded to bf16, and the config says bf16."""
    from safetensors.torch import load_file

    from nemo_tiedlora.formats.hf.nemo_to_hf import nemo_gpt_to_hf_llama
    from nemo_tiedlora.nemo.base_archive import base_config, read_base
    from nemo_tiedlora.tools.import_hf import import_hf

    build_tiny("llama", tmp_path / "hf")
    out = import_hf(tmp_path / "hf", tmp_path / "base.nemo", fmt="dist", dtype="bf16")
    from torch.distributed.checkpoint import FileSystemReader

    with tarfile.open(out) as tar:
        names = [m.name.lstrip("./") for m in tar.getmembers()]
        assert any(name.startswith("model_weights/") for name in names)  # distributed, not per-rank shards
        assert not any(name.endswith("model_weights.ckpt") for name in names)
        tar.extractall(tmp_path / "unpacked", filter="data")
    stored = FileSystemReader(str(tmp_path / "unpacked" / "model_weights")).read_metadata().state_dict_metadata
    weights = {key: meta.properties.dtype for key, meta in stored.items() if hasattr(meta, "properties")
               and key.startswith("model.") and "_extra_state" not in key}
    assert weights and set(weights.values()) == {torch.bfloat16}, weights  # what the files hold
    assert str(base_config(out).precision) == "bf16"
    checkpoint = read_base(out)  # restored by NeMo (fp32 on CPU): the bf16 values, exactly
    exported, _ = nemo_gpt_to_hf_llama(checkpoint.state, checkpoint.cfg)
    source = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(exported) == sorted(source)
    for key, value in source.items():
        assert torch.equal(exported[key].float(), value.to(torch.bfloat16).float()), key


def test_tokenizer_travels_inside_the_archive(imported, tmp_path):
    from nemo_tiedlora.nemo.cpu_restore import restore_base

    _, tokenizer, base = imported("llama")
    with tarfile.open(base) as tar:
        names = {m.name.lstrip("./") for m in tar.getmembers()}
        cfg = yaml.safe_load(tar.extractfile(next(m for m in tar.getmembers()
                                                  if m.name.endswith("model_config.yaml"))).read())
    tok_cfg = cfg["tokenizer"]
    assert tok_cfg["library"] == "huggingface" and not any("/" in str(v) for v in tok_cfg["hf_files"].values())
    for value in tok_cfg["hf_files"].values():  # registered artifacts, all in the archive
        assert value.startswith("nemo:") and value[5:] in names
    assert not any(name.endswith("tokenizer.model") for name in names)
    moved = shutil.move(str(base.parent / "hf"), str(tmp_path / "gone"))  # no path outside the archive is read
    try:
        nemo_tokenizer = restore_base(base).tokenizer
    finally:
        shutil.move(moved, str(base.parent / "hf"))
    text = "hello world w7 w100 unknown-word"
    assert nemo_tokenizer.text_to_ids(text) == tokenizer(text, add_special_tokens=False).input_ids
    assert (nemo_tokenizer.bos_id, nemo_tokenizer.eos_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_import_from_a_script_without_main_guard(tmp_path):
    """megatron's checkpoint writer starts a spawn Manager(), which re-ran an unguarded main script (EOFError)."""
    build_tiny("llama", tmp_path / "hf")
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from nemo_tiedlora.tools.import_hf import import_hf\n"
        f"import_hf({str(tmp_path / 'hf')!r}, {str(tmp_path / 'base.nemo')!r}, fmt='dist')\n"
        "print('IMPORTED')\n"
    )
    result = subprocess.run([sys.executable, str(script)], env=script_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("IMPORTED") == 1 and (tmp_path / "base.nemo").exists()


def test_cli_refuses_an_unsupported_family_listing_the_supported(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], '
                                        '"n_embd": 8}')
    result = subprocess.run([sys.executable, "-m", "nemo_tiedlora", "import-hf", "--in", str(folder), "--out",
                             str(tmp_path / "x.nemo")], env=script_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "model_type 'gpt2'" in result.stderr and "llama" in result.stderr and "qwen2" in result.stderr
    assert not (tmp_path / "x.nemo").exists()

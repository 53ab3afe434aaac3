"""Base conversion between TP/PP layouts and checkpoint formats, adapter round trips and merged checkpoints, judged
by the logits NeMo itself computes when it loads the result at the target layout (torchrun + gloo, real NeMo).

Reference: the full-vocabulary logits of one validation batch from the original 4-layer base (distributed
checkpoint) at TP1/PP1. NeMo loads a legacy per-rank archive only at exactly the layout it was written for, so a
wrong split, a wrong layer offset or a wrong gated-MLP interleave shows up as different logits (or a load error).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.distributed.conftest import REPO, run_driver
from tests.script_env import script_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def cli(*args: str, log: Path) -> subprocess.CompletedProcess:
    env = script_env()
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "nemo_tiedlora", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO, timeout=900)


def logits(dist_base, name: str, nproc: int, *args: str, base: Path | None = None) -> torch.Tensor:
    """Logits of the first validation batch, from a driver run with no training."""
    _, _, work = dist_base
    out = work / f"{name}.logits.pt"
    if not out.exists():
        extra = ["--base", str(base)] if base is not None else []
        run_driver(dist_base, name, nproc, "--steps", "0", "--logits-out", str(out), *args, *extra)
    return torch.load(out)


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    scale = float(expected.abs().max())
    difference = float((actual - expected).abs().max())
    assert difference <= 1e-5 * max(scale, 1.0), f"{what}: max |difference| {difference:.3g} (logits up to {scale:.3g})"


@pytest.fixture(scope="module")
def reference(dist_base):
    return logits(dist_base, "base_tp1", 1)


@pytest.fixture(scope="module")
def legacy_tp2pp2(dist_base):
    base, _, work = dist_base
    out = work / "base_legacy_tp2pp2.nemo"
    if not out.exists():
        result = cli("convert", "--in", str(base), "--out", str(out), "--tp", "2", "--pp", "2", "--format", "legacy",
                     log=work / "convert_legacy_tp2pp2.log")
        assert result.returncode == 0, (work / "convert_legacy_tp2pp2.log").read_text()[-3000:]
    return out


@pytest.fixture(scope="module")
def adapter(dist_base):
    """A tl6 adapter trained 5 steps at TP1 (shared with the equivalence tests' run of the same name)."""
    _, _, work = dist_base
    saved = work / "tp1_adapter.nemo"
    run_driver(dist_base, "tp1_save", 1, "--save-adapter", str(saved))
    return saved


def test_legacy_tp2pp2_archive_has_nemo_layout_and_gives_the_tp1_logits(dist_base, legacy_tp2pp2, reference):
    with tarfile.open(legacy_tp2pp2) as tar:
        names = {m.name.lstrip("./") for m in tar.getmembers() if m.isfile()}
    expected = {f"tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt" for t in range(2) for p in range(2)}
    assert expected <= names and not any(n.startswith("model_weights/") for n in names)
    # NeMo loads a legacy archive only at the layout it was written for: the load itself checks every shape.
    at_tp2pp2 = logits(dist_base, "legacy_tp2pp2", 4, "--tp", "2", "--pp", "2", base=legacy_tp2pp2)
    assert_same_logits(at_tp2pp2, reference, "legacy TP2xPP2 base at TP2xPP2")


def test_legacy_back_to_distributed_gives_the_same_logits(dist_base, legacy_tp2pp2, reference):
    _, _, work = dist_base
    out = work / "base_from_legacy.nemo"
    result = cli("convert", "--in", str(legacy_tp2pp2), "--out", str(out), "--tp", "1", "--pp", "1",
                 log=work / "convert_back.log")
    assert result.returncode == 0, (work / "convert_back.log").read_text()[-3000:]
    with tarfile.open(out) as tar:
        assert any(m.name.lstrip("./").startswith("model_weights/") for m in tar.getmembers())
    assert_same_logits(logits(dist_base, "from_legacy_tp1", 1, base=out), reference, "legacy -> dist at TP1")


def test_adapter_logits_at_tp2pp2_equal_tp1(dist_base, adapter, reference):
    at_tp1 = logits(dist_base, "adapter_tp1", 1, "--load-adapter", str(adapter))
    at_tp2pp2 = logits(dist_base, "adapter_tp2pp2", 4, "--tp", "2", "--pp", "2", "--load-adapter", str(adapter))
    assert float((at_tp1 - reference).abs().max()) > 1e-3, "the adapter must change the logits for this test to bite"
    assert_same_logits(at_tp2pp2, at_tp1, "adapter saved at TP1, loaded at TP2xPP2")


def test_merged_distributed_checkpoint_loads_at_uneven_pp(dist_base, adapter):
    base, _, work = dist_base
    merged = work / "merged_dist.nemo"
    result = cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(merged), log=work / "merge.log")
    assert result.returncode == 0, (work / "merge.log").read_text()[-3000:]
    expected = logits(dist_base, "adapter_tp1", 1, "--load-adapter", str(adapter))
    uneven = logits(dist_base, "merged_pp2_uneven", 2, "--pp", "2", "--first-stage-layers", "3", base=merged)
    assert_same_logits(uneven, expected, "merged .nemo at PP2 (3+1 layers) vs the adapter model at TP1")


def test_merge_of_a_legacy_base_into_a_legacy_uneven_pp_archive(dist_base, adapter, legacy_tp2pp2):
    _, _, work = dist_base
    merged = work / "merged_legacy_pp2_uneven.nemo"
    result = cli("merge", "--base", str(legacy_tp2pp2), "--adapter", str(adapter), "--out", str(merged),
                 "--format", "legacy", "--tp", "1", "--pp", "2", "--first-stage-layers", "3",
                 log=work / "merge_legacy.log")
    assert result.returncode == 0, (work / "merge_legacy.log").read_text()[-3000:]
    expected = logits(dist_base, "adapter_tp1", 1, "--load-adapter", str(adapter))
    loaded = logits(dist_base, "merged_legacy_pp2_uneven", 2, "--pp", "2", "--first-stage-layers", "3", base=merged)
    assert_same_logits(loaded, expected, "legacy TP2xPP2 base merged into a legacy PP2 (3+1) archive")


def test_exports_read_a_legacy_tp2pp2_base_like_the_original(dist_base, adapter, legacy_tp2pp2):
    """export --base-out (HF) and --format nemo-lora need the whole base: from the legacy TP2xPP2 archive they write
    the same tensors as from the original distributed checkpoint (whose exports are checked against transformers +
    peft and NeMo's LoRA logits in tests/integration)."""
    from safetensors.torch import load_file

    base, _, work = dist_base
    results = {}
    for label, source in (("dist", base), ("legacy", legacy_tp2pp2)):
        hf, hf_base, lora = work / f"hf_{label}", work / f"hf_base_{label}", work / f"lora_{label}.nemo"
        for args in (("--format", "hf-peft", "--out", str(hf), "--base-out", str(hf_base)),
                     ("--format", "nemo-lora", "--out", str(lora))):
            log = work / f"export_{label}_{args[1]}.log"
            result = cli("export", "--adapter", str(adapter), "--base", str(source), *args, "--overwrite", log=log)
            assert result.returncode == 0, log.read_text()[-3000:]
        # a SentencePiece-tokenizer base: the HF folder gets no tokenizer files, and the log says what to copy there
        assert not list(hf_base.glob("tokenizer*"))
        export_log = (work / f"export_{label}_hf-peft.log").read_text()
        assert "copy the model's Hugging Face tokenizer files there" in export_log
        with tarfile.open(lora) as tar:
            member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "model_weights.ckpt")
            lora_state = torch.load(tar.extractfile(member), weights_only=True)
        base_state = {}
        for file in sorted(hf_base.glob("*.safetensors")):
            base_state.update(load_file(file))
        results[label] = (base_state, lora_state)
    for index, what in ((0, "HF base"), (1, "NeMo lora adapter")):
        original, from_legacy = results["dist"][index], results["legacy"][index]
        assert original and sorted(from_legacy) == sorted(original), what
        for key, tensor in original.items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(from_legacy[key], tensor), f"{what}: {key}"
    assert any("lora_kqv_adapter.linear_in" in key for key in results["dist"][1])

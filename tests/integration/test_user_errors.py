"""Bad input through the commands as a user types them (entry scripts, CLI): the output ends with one line naming
the file and the cause, exit status 2, no traceback (unless HYDRA_FULL_ERROR=1), nothing launched or written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import REPO
from tests.script_env import script_env

pytestmark = pytest.mark.integration

TUNING = REPO / "examples/nlp/language_modeling/tuning"


def _run(command: list, env_extra: dict | None = None) -> tuple[int, str]:
    env = {**script_env(), **(env_extra or {})}
    result = subprocess.run([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, timeout=900)
    return result.returncode, result.stdout


def _last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def _finetune(base, data, work: Path, *overrides: str) -> list:
    return [sys.executable, TUNING / "megatron_gpt_finetuning.py", f"model.restore_from_path={base}",
            "trainer.accelerator=cpu", "trainer.max_steps=2", f"model.data.train_ds.file_names=[{data.train}]",
            f"model.data.validation_ds.file_names=[{data.validation}]", "model.data.validation_ds.names=[val]",
            "model.data.train_ds.max_seq_length=64", "model.data.validation_ds.max_seq_length=64",
            f"exp_manager.exp_dir={work}", *overrides]


def _generate(base, data, adapter) -> list:
    return [sys.executable, TUNING / "megatron_gpt_generate.py", f"model.restore_from_path={base}",
            f"model.peft.restore_from_path={adapter}", "trainer.accelerator=cpu",
            f"model.data.test_ds.file_names=[{data.test}]", "model.data.test_ds.names=[test]",
            "model.data.test_ds.tokens_to_generate=4"]


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A Tied-LoRA archive for the tiny base (random factors; only its bytes matter here)."""
    from nemo_tiedlora.formats.adapter_archive import expected_shapes, save_archive
    from nemo_tiedlora.core.config import TiedLoraConfig
    from nemo_tiedlora.core.model_shape import model_shape
    from nemo_tiedlora.nemo.preflight import read_model_config

    base, _, _ = tiny
    shape = model_shape(read_model_config(base, what="base"))
    config = TiedLoraConfig(preset="tl6", rank=4)
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=generator) for k, s in expected_shapes(config, shape).items()}
    return save_archive(tmp_path_factory.mktemp("adapter") / "adapter.nemo", config=config, shape=shape,
                        tensors=tensors)


def test_tp_layout_refused_before_torchrun_relaunch(tiny, tmp_path):
    base, data, _ = tiny
    code, output = _run(_finetune(base, data, tmp_path, "trainer.devices=4", "model.tensor_model_parallel_size=4"))
    assert code == 2, output[-3000:]
    assert _last_line(output) == (
        "error: tensor_model_parallel_size=4 does not divide num_query_groups=2: tensor parallelism splits "
        "linear_qkv by whole query groups; choose a TP size among [1, 2]")
    # refused in the first process: no relaunch, no process group, no traceback, nothing written
    assert "relaunching under torchrun" not in output and "torch.distributed" not in output
    assert "Traceback" not in output and not (tmp_path / "megatron_gpt_peft_tuning").exists()


def test_hydra_full_error_keeps_the_traceback(tiny, tmp_path):
    base, data, _ = tiny
    code, output = _run(_finetune(base, data, tmp_path, "model.tensor_model_parallel_size=4"),
                        {"HYDRA_FULL_ERROR": "1"})
    assert code != 0 and "Traceback" in output and "TiedLoraConfigError" in output


@pytest.mark.parametrize("damage", ["garbage", "quarter"])
def test_unreadable_adapter_refused_naming_file_and_cause(tiny, adapter, tmp_path, damage):
    base, data, _ = tiny
    bad = tmp_path / f"{damage}.nemo"
    if damage == "garbage":
        bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                      dtype=torch.uint8).numpy().tobytes())
        cause = "(not a tar archive): the file is truncated or corrupt"
    else:
        bad.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 4])
        cause = "truncated"
    code, output = _run(_generate(base, data, bad))
    last = _last_line(output)
    assert code == 2, output[-3000:]
    assert last.startswith(f"error: model.peft.restore_from_path={bad} ") and cause in last, last
    assert "Traceback" not in output and "tarfile" not in output


def test_bad_training_data_refused_before_the_model_is_built(tiny, tmp_path):
    base, data, _ = tiny
    train = tmp_path / "train.jsonl"
    train.write_text(Path(data.train).read_text().splitlines()[0] + '\n{"input": "the fox is", "answer": "x"}\n')
    code, output = _run(_finetune(base, data, tmp_path / "runs", f"model.data.train_ds.file_names=[{train}]"))
    assert code == 2, output[-3000:]
    assert _last_line(output).startswith(f"error: {train} line 2: field 'output' missing")
    assert "Restoring" not in output and "Traceback" not in output


@pytest.mark.slow
def test_val_loss_nan_trap_refused(tiny, tmp_path):
    base, data, _ = tiny
    code, output = _run(_finetune(base, data, tmp_path, "model.data.validation_ds.max_seq_length=32",
                                  "model.data.validation_ds.tokens_to_generate=32"))
    assert code == 2 and "val_loss=nan" in _last_line(output), output[-3000:]
    assert "model.data.validation_ds.max_seq_length=32" in _last_line(output)


def _cli(*args) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "nemo_tiedlora", *map(str, args)], capture_output=True, text=True,
                            env=script_env(), cwd=REPO, timeout=600)
    return result.returncode, result.stdout, result.stderr


def test_cli_wordings_export_overwrite_and_inspect_non_archive(tiny, adapter, tmp_path):
    base, _, _ = tiny
    existing = tmp_path / "hf"
    existing.mkdir()
    code, _, err = _cli("export", "--adapter", adapter, "--base", base, "--format", "hf-peft", "--out", existing)
    assert code == 2 and "--overwrite" in err and "pass overwrite=True" not in err, err
    text = tmp_path / "notes.nemo"
    text.write_text("not an archive\n")
    code, _, err = _cli("inspect", text)
    assert code == 2 and err.strip() == (
        f"error: {text} is not a readable adapter archive (not a tar archive): the file is truncated or corrupt, or "
        "not an adapter file; copy it again or re-export it from the training run")


def test_merge_and_export_refuse_non_finite_archive(tiny, adapter, tmp_path, monkeypatch):
    import nemo_tiedlora.formats.adapter_archive as checkpoint
    from nemo_tiedlora.formats.adapter_archive import load_archive, save_archive

    base, _, _ = tiny
    archive = load_archive(adapter)
    tensors = dict(archive.tensors)
    tensors["layers.1.v"] = tensors["layers.1.v"].clone()
    tensors["layers.1.v"][0] = float("nan")
    monkeypatch.setattr(checkpoint, "check_finite", lambda tensors, where: None)  # as a diverged old run left it
    poisoned = save_archive(tmp_path / "nan.nemo", config=archive.config, shape=archive.shape, tensors=tensors)
    monkeypatch.undo()
    for command in (["merge", "--base", base, "--adapter", poisoned, "--out", tmp_path / "merged.nemo"],
                    ["export", "--adapter", poisoned, "--base", base, "--format", "nemo-lora", "--out",
                     tmp_path / "lora.nemo"]):
        code, _, err = _cli(*command)
        assert code == 2 and err.strip().splitlines()[-1] == (
            f"error: {poisoned}: non-finite values (NaN/Inf) in ['layers.1.v']: the training run diverged; use an "
            "adapter saved before the divergence, or train again with a lower learning rate or gradient clipping "
            "(trainer.gradient_clip_val)"), err
    assert not (tmp_path / "merged.nemo").exists() and not (tmp_path / "lora.nemo").exists()
    code, out, _ = _cli("inspect", poisoned)
    assert code == 0 and "NON-FINITE (NaN/Inf) tensors: ['layers.1.v']" in out


@pytest.mark.slow
def test_error_after_the_torchrun_relaunch_is_the_last_line(tiny, tmp_path):
    """trainer.devices=2 relaunches the script under torchrun; a run that diverges there (a learning rate of 1e30:
    the first step's update overflows, the next gradients are NaN) stops on every rank with our error, and the
    output ends with that cause after torchrun's failure summary, exit status non-zero, no adapter written."""
    base, data, _ = tiny
    code, output = _run(_finetune(base, data, tmp_path, "trainer.devices=2", "model.tensor_model_parallel_size=2",
                                  "model.optim.lr=1e30", "trainer.max_steps=4", "trainer.val_check_interval=4",
                                  "trainer.gradient_clip_val=0.0", "model.global_batch_size=4",
                                  "model.micro_batch_size=2"))
    assert code != 0, output[-3000:]
    assert "relaunching under torchrun" in output and "ChildFailedError" in output  # torchrun's summary came first
    last = _last_line(output)
    assert last.startswith("error: "), last
    assert "non-finite (NaN/Inf) adapter gradient" in last and "model.optim.lr" in last, last
    assert not list(tmp_path.rglob("*.nemo"))

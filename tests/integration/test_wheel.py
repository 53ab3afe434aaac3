"""The package works from a wheel: ``pip wheel .`` installed into a fresh virtual environment, every command run from
a folder outside the checkout.

The fresh environment gets the pinned stack (torch, NeMo, megatron-core, ...) from the project's environment through
a ``.pth`` line (installing 2 GB again would only test pip), but not the checkout: the project's own editable install
is a ``.pth`` import hook that a ``.pth``-added folder does not run, and nothing puts the checkout on ``sys.path``.
Each command must then find its entry scripts, their YAML and the shipped study configs inside the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.integration.conftest import REPO
from tests.script_env import script_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PACKAGE_DATA = ("nemo_tiedlora/apps/entry_scripts/megatron_gpt_finetuning.py",
                "nemo_tiedlora/apps/entry_scripts/megatron_gpt_generate.py",
                "nemo_tiedlora/apps/entry_scripts/megatron_gpt_tiedlora_merge.py",
                "nemo_tiedlora/apps/entry_scripts/conf/megatron_gpt_finetuning_config.yaml",
                "nemo_tiedlora/apps/entry_scripts/conf/megatron_gpt_generate_config.yaml",
                "nemo_tiedlora/apps/entry_scripts/conf/megatron_gpt_tiedlora_merge_config.yaml",
                "nemo_tiedlora/apps/conf/study.yaml", "nemo_tiedlora/apps/conf/study_smollm2.yaml",
                "nemo_tiedlora/apps/conf/study_smollm2_extraction.yaml",
                "nemo_tiedlora/apps/conf/study_smollm2_arithmetic.yaml")


def _run(command: list, *, cwd: Path, env: dict, timeout: int = 1800) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command[:4]))} ... failed:\n{result.stdout[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(python of a fresh venv with the wheel installed, its environment, a work folder outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in script_env().items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-w", root / "dist"],
         cwd=root, env=env)
    (wheel,) = (root / "dist").glob("nemo_tiedlora-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert not [name for name in PACKAGE_DATA if name not in names]
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root, env=env)
    python = venv / "bin" / "python"
    venv_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root,
                          env=env).strip())
    (venv_site / "pinned_stack.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=root, env=env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    work = root / "elsewhere"
    work.mkdir()
    where = _run([python, "-c", "import nemo_tiedlora; print(nemo_tiedlora.__file__)"], cwd=work, env=env).strip()
    assert Path(where).is_relative_to(venv_site) and not Path(where).is_relative_to(REPO), where
    return python, env, work


def test_demo_sweep_bench_tools_and_entry_scripts_from_the_wheel(installed, default_demo):
    python, env, work = installed
    venv = python.parent.parent

    # demo: fine-tuning and generation through the packaged entry scripts. The data and the pre-trained base are the
    # session's default demo's (its cache: the same files and manifests), so the base is not pre-trained again.
    demo_work, _ = default_demo
    shutil.copytree(demo_work / "data", work / "demo" / "data")
    for name in ("base.nemo", "base.json"):
        shutil.copy2(demo_work / name, work / "demo" / name)
    output = _run([python, "-m", "nemo_tiedlora", "demo", "--steps", "20", "--no-compare", "--work", "demo"],
                  cwd=work, env=env)
    assert "pre-training the tiny base" not in output  # the copied cache was taken
    assert "nemo_tiedlora/apps/entry_scripts/megatron_gpt_finetuning.py" in output and str(venv) in output
    summary = json.loads((work / "demo" / "summary.json").read_text())
    adapter, base = Path(summary["adapter"]), work / "demo" / "base.nemo"
    assert adapter.is_file() and base.is_file()

    # sweep: a shipped config by name (dry run), and a one-run study on the demo's base
    output = _run([python, "-m", "nemo_tiedlora", "sweep", "--config", "study", "--dry-run"], cwd=work, env=env)
    assert "run(s) of homes" in output
    (work / "study.yaml").write_text(
        f"task: homes\nbase: {base}\noutput: sweep\npresets: [tl6]\nranks: [2]\nlrs: [1.0e-2]\n"
        "training: {max_steps: 2, val_check_interval: 2, global_batch_size: 4, micro_batch_size: 4,"
        " max_seq_length: 64, limit_val_batches: 1}\ngeneration: {tokens_to_generate: 3, batch_size: 32}\n")
    _run([python, "-m", "nemo_tiedlora", "sweep", "--config", "study.yaml"], cwd=work, env=env)
    rows = json.loads((work / "sweep" / "results.json").read_text())
    assert [row["status"] for row in rows] == ["ok"]

    # bench: on the demo's work folder (its base is reused), one short round
    _run([python, "-m", "nemo_tiedlora", "bench", "--work", "demo", "--steps", "2", "--rounds", "1", "--out", "bench"],
         cwd=work, env=env)
    assert (work / "bench" / "bench_cpu.md").is_file()

    # the checkpoint tools
    tools = [
        ["merge", "--base", base, "--adapter", adapter, "--out", "merged.nemo"],
        ["convert", "--in", base, "--out", "base_tp2.nemo", "--tp", "2", "--format", "legacy"],
        ["export", "--adapter", adapter, "--base", base, "--format", "hf-peft", "--out", "hf", "--base-out", "hf_base"],
        ["export", "--adapter", adapter, "--base", base, "--format", "nemo-lora", "--out", "lora.nemo"],
        ["inspect", adapter],
    ]
    for command in tools:
        _run([python, "-m", "nemo_tiedlora", *command], cwd=work, env=env)
    for written in ("merged.nemo", "base_tp2.nemo", "hf/adapter_config.json", "hf_base/config.json", "lora.nemo"):
        assert (work / written).exists(), written

    # the entry scripts as modules of the installed package
    _run([python, "-m", "nemo_tiedlora.apps.entry_scripts.megatron_gpt_tiedlora_merge", f"base={base}",
          f"adapter={adapter}", "out=merged_by_script.nemo"], cwd=work, env=env)
    assert (work / "merged_by_script.nemo").is_file()
    data = work / "demo" / "data"
    output = _run([python, "-m", "nemo_tiedlora.apps.entry_scripts.megatron_gpt_generate",
                   f"model.restore_from_path={base}", f"model.peft.restore_from_path={adapter}",
                   "trainer.accelerator=cpu", "trainer.devices=1",
                   f"model.data.test_ds.file_names=[{data / 'test.jsonl'}]", "model.data.test_ds.names=[test]",
                   "model.data.test_ds.tokens_to_generate=3", "model.data.test_ds.write_predictions_to_file=True",
                   f"model.data.test_ds.output_file_path_prefix={work / 'predictions'}"], cwd=work, env=env)
    assert list(work.glob("predictions*.jsonl"))

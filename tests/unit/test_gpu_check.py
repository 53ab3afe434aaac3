"""The prepared GPU check's parts that run without a GPU: the dry run of scripts/gpu_check.sh, the wheel list
against the pinned stack, finding wheels by their PyPI file names, and the loss comparison of the demo runs."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from benchmarks.gpu_check import REPO, WHEELS, match_wheels, wheel_list
from benchmarks.gpu_demo_runs import DEMO_RUNS, compare_losses


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-").replace(".", "-")] = version.strip()
    return pins


def test_carried_versions_are_the_pinned_stack():
    """Every carried package the pinned stack also has is carried at the pinned version (what the CPU tests run)."""
    pins = _pins()
    wheels = wheel_list()
    assert {"nemo_toolkit", "megatron-core", "lightning", "hydra-core", "omegaconf"} <= {w.name for w in wheels}
    for wheel in wheels:
        key = wheel.name.lower().replace("_", "-").replace(".", "-")
        if key in pins:
            assert wheel.version == pins[key], wheel


def test_wheels_are_found_by_their_pypi_file_names(tmp_path):
    files = ["nemo_toolkit-2.4.1-py3-none-any.whl", "hydra_core-1.3.2-py3-none-any.whl",
             "opencc-1.4.2-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
             "megatron_core-0.13.1-cp312-cp312-linux_x86_64.whl", "transformers-4.51.2-py3-none-any.whl"]
    for name in files:
        (tmp_path / name).write_bytes(b"")
    wheels = [w for w in wheel_list() if w.name in ("nemo_toolkit", "hydra-core", "OpenCC", "megatron-core",
                                                    "transformers", "jieba")]
    found, missing, extra = match_wheels(wheels, tmp_path)
    assert sorted(f.name for f in found.values()) == sorted(files[:4])
    assert sorted(w.name for w in missing) == ["jieba", "transformers"]
    assert [f.name for f in extra] == ["transformers-4.51.2-py3-none-any.whl"]  # another version: not the pin


def test_dry_run():
    """With .whl/ made by scripts/gpu_wheels.sh: the dry run passes and prints every wheel, the sizes, the plan
    and the estimated minutes. Without it: it fails, naming every missing wheel in one line."""
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    wheels = wheel_list()
    _, missing, _ = match_wheels(wheels)
    if not missing:
        assert all(f"{w.name}=={w.version}" in result.stdout for w in wheels)
        assert "carried in all (limit 64 MiB)" in result.stdout
        assert "estimated" in result.stdout and all(name in result.stdout for name in DEMO_RUNS)
        problems = result.stderr.splitlines()  # a stale demo base, say: each one line with its fix
        assert (result.returncode == 0) == (not problems), result.stderr
        assert all(line.startswith("gpu_check: ") and "missing wheels" not in line and "(" in line
                   for line in problems), problems
    else:
        assert result.returncode == 1
        lines = [line for line in result.stderr.splitlines() if "missing wheels" in line]
        assert len(lines) == 1
        assert all(f"{w.name}=={w.version}" in lines[0] for w in missing), lines[0]
        assert lines[0].endswith("(run bash scripts/gpu_wheels.sh)")


def _scalars(losses: dict[str, list[float]]) -> dict:
    return {name: {"loss": dict(enumerate(values)), "loss_scale": {}} for name, values in losses.items()}


def test_loss_comparison_against_the_fp32_run_of_the_same_optimizer():
    base = [5.0, 4.0, 2.0]
    losses = {"fp32": base, "bf16_mixed": [5.1, 4.0, 2.0], "fp16_mixed": [5.0, 4.0, 2.08],
              "fp32_distopt": base, "bf16_O2": [5.0, 3.9, 2.0]}
    result = compare_losses(_scalars(losses), steps=3, tolerance=0.05)
    runs = result["runs"]
    assert math.isclose(runs["bf16_mixed"]["max_rel_diff"], 0.1 / 5.0)
    assert math.isclose(runs["fp16_mixed"]["max_rel_diff"], 0.08 / 2.0)
    assert math.isclose(runs["bf16_O2"]["max_rel_diff"], 0.1 / 4.0)
    assert runs["bf16_O2"]["reference"] == "fp32_distopt" and runs["fp32"]["reference"] is None
    assert result["all_within"]
    losses["fp16_mixed"] = [5.0, 4.0, 2.2]  # 10% off at the last step
    assert not compare_losses(_scalars(losses), steps=3, tolerance=0.05)["runs"]["fp16_mixed"]["ok"]


@pytest.mark.parametrize("bad", ["missing step", "nan"])
def test_loss_comparison_fails_a_run_with_a_missing_step_or_a_non_finite_loss(bad):
    losses = {name: [5.0, 4.0, 2.0] for name in DEMO_RUNS}
    losses["bf16_mixed"] = [5.0, 4.0] if bad == "missing step" else [5.0, float("nan"), 2.0]
    result = compare_losses(_scalars(losses), steps=3)
    assert not result["runs"]["bf16_mixed"]["ok"] and not result["all_within"]
    assert all(row["ok"] for name, row in result["runs"].items() if name != "bf16_mixed")


def test_wheel_folder_is_ignored_by_git():
    """.whl/ never reaches a commit (it travels to the GPU machine as a carried path)."""
    result = subprocess.run(["git", "check-ignore", "-q", str(WHEELS / "x.whl")], cwd=REPO)
    assert result.returncode == 0

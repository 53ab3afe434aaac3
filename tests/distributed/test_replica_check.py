"""``check_replicas`` (``model.peft.tiedlora_tuning.check_replicas_every``) on real process groups: identical replicas
pass; a replica changed on one rank is reported with the tensor, that rank, the step and the possible causes
(not always "the gradient sums were skipped or ran twice")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.conftest import torchrun

pytestmark = [pytest.mark.slow]

DRIVER = Path(__file__).with_name("replica_drift_driver.py")


def test_drift_names_tensor_rank_step_and_causes(tmp_path):
    out = tmp_path / "drift.json"
    result = torchrun(DRIVER, 4, [str(out)], tmp_path / "drift.log")
    assert result.returncode == 0, (tmp_path / "drift.log").read_text()[-3000:]
    report = json.loads(out.read_text())
    assert report["checked"] == 4  # A, B, u, v: each identical on every rank holding it
    error = report["error"]
    assert error is not None, "the perturbed replica was not caught"
    assert "drift at step 7" in error and "A (model chunk 0)" in error
    assert "rank(s) [3]" in error and "ranks compared: [0, 1, 2, 3]" in error  # A is held by the whole world
    assert "5.000e-01" in error  # the perturbation
    for cause in ("gradient sum was skipped or ran twice", "non-deterministic kernel", "outside the optimizer"):
        assert cause in error
    assert "check_replicas_every=1" in error  # the fix: find the first bad step

"""``check_replicas`` (``model.peft.tiedlora_tuning.check_replicas_every``) on real process groups: identical replicas
pass; a replica changed on one rank is reported with the tensor, that rank, the step and the possible causes
(not always "the gradient sums were skipped or ran twice").

And what the per-step adapter checks cost at world size 2 (TP=2, a tl6 adapter of 32 layers: 66 tensors; driver
tests/distributed/sync_count_driver.py, counter tests/host_syncs.py; the same counts at world size 1:
tests/unit/test_sync_counts.py): the TP gradient sums are one all-reduce (B and every v_l in one flat buffer) and
no host read; the replica check two all-reduces (A/B over the world, u/v over TP x DP) and one host read for all 66
tensors; the finite check one flag all-reduce and one host read. A NaN gradient on rank 1 only stops both ranks
(rank 1 names the tensor, rank 0 says "on another rank"); a -0.0 on rank 1 where rank 0 holds +0.0 is reported as
drift of that tensor on rank 1 (replicas are compared bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.conftest import torchrun

pytestmark = [pytest.mark.slow]

DRIVER = Path(__file__).with_name("replica_drift_driver.py")
COUNT_DRIVER = Path(__file__).with_name("sync_count_driver.py")


def _reports(driver: Path, nproc: int, tmp_path: Path) -> list[dict]:
    """Run `driver` under torchrun; the JSON report each rank wrote to OUT.<rank>.json (those that wrote one)."""
    out = tmp_path / driver.stem
    result = torchrun(driver, nproc, [str(out)], tmp_path / f"{driver.stem}.log")
    assert result.returncode == 0, (tmp_path / f"{driver.stem}.log").read_text()[-3000:]
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob(f"{driver.stem}.*.json"))]


def test_drift_names_tensor_rank_step_and_causes(tmp_path):
    (report,) = _reports(DRIVER, 4, tmp_path)
    assert report["checked"] == 4  # A, B, u, v: each identical on every rank holding it
    error = report["error"]
    assert error is not None, "the perturbed replica was not caught"
    assert "drift at step 7" in error and "A (model chunk 0)" in error
    assert "rank(s) [3]" in error and "ranks compared: [0, 1, 2, 3]" in error  # A is held by the whole world
    assert "5.000e-01" in error  # the perturbation
    for cause in ("gradient sum was skipped or ran twice", "non-deterministic kernel", "outside the optimizer"):
        assert cause in error
    assert "check_replicas_every=1" in error  # the fix: find the first bad step


def test_step_costs_and_failures_across_two_ranks(tmp_path):
    reports = _reports(COUNT_DRIVER, 2, tmp_path)
    assert len(reports) == 2
    for report in reports:
        assert report["sums"]["collectives"] == ["allreduce_"] and report["sums"]["host_reads"] == []
        assert report["replicas"]["collectives"] == ["allreduce_", "allreduce_"]
        assert report["replicas"]["host_reads"] == ["tolist"] and report["replicas"]["result"] == 66
        assert report["finite"]["collectives"] == ["allreduce_"] and report["finite"]["host_reads"] == ["item"]
        assert "non-finite (NaN/Inf) adapter gradient at optimizer step 42" in report["nan_error"]
        drift = report["drift_error"]
        assert "drift at step 9: layers.4.vec_u (model chunk 0) on rank(s) [1] differs from rank 0's copy" in drift
        assert "ranks compared: [0, 1]; largest difference 0.000e+00" in drift
    assert "in ['layers.16.vec_v'] on rank 1" in reports[1]["nan_error"]
    assert "on another rank" in reports[0]["nan_error"]

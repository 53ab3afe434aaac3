"""The optimizer paths a CPU run can take pass through the adapter's sums and guards and give the TP1 model:
``fused_adam`` (what the YAML names; on CPU NeMo's plain-optimizer branch runs it as torch Adam, the same
``training_step`` branch: ``allreduce_gradients``, hooked) at DP2 with ``async_grad_allreduce`` true and false (NeMo
reads the flag only on the O2 path, refused before launch: tests/integration/test_optimizer_paths.py).

Each run: torchrun + gloo, 2 ranks, the tiny GQA base, 5 steps, against the TP1 run (tests/distributed/compare.py,
1e-5), and the replica check logged from the hook at step 0 (check_replicas_every=2), which proves the hooked
reduction runs on this path. The mcore distributed optimizer, fp32 and bf16 O2, is covered the same way by
test_equivalence.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.compare import assert_equivalent
from tests.distributed.conftest import run_driver, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SGD_LIKE = ["--lr", "3e3", "--eps", "1e4"]  # Adam as momentum SGD (see test_equivalence.py)
WRAPPER = Path(__file__).with_name("optimizer_paths_driver.py")


def _run(dist_base, name: str, nproc: int, sets: list[str], *args: str) -> tuple[dict, str]:
    base, data, work = dist_base
    out, log = work / f"{name}.pt", work / f"{name}.log"
    if not out.exists():
        options = [part for item in sets for part in ("--set", item)]
        result = torchrun(WRAPPER, nproc, [*options, "--", "--base", str(base), "--data", str(data), "--out", str(out),
                                           *args], log)
        assert result.returncode == 0, f"{name} failed, see {log}:\n" + "".join(log.read_text().splitlines(True)[-30:])
    return torch.load(out), log.read_text()


@pytest.mark.parametrize("async_grad_allreduce", [True, False])
def test_fused_adam_dp2_passes_through_the_hooks_and_matches_tp1(async_grad_allreduce, dist_base):
    reference = run_driver(dist_base, "tp1", 1, *SGD_LIKE)
    run, log = _run(dist_base, f"dp2_fused_adam_async_{async_grad_allreduce}", 2,
                    [f"model.async_grad_allreduce={str(async_grad_allreduce).lower()}"],
                    "--optim", "fused_adam", *SGD_LIKE)
    assert_equivalent(run, reference)
    # the hook ran in the training step (its first replica check is logged at INFO; later ones at DEBUG)
    assert "Tied-LoRA: checked 10 replicas at step 0: bitwise identical on all 2 rank(s)" in log, log[-3000:]

"""Training at TP/PP/DP > 1 gives the same model as TP=PP=1 (docs/design.md section 5), with real process groups:
torchrun + gloo on CPU, real NeMo + megatron-core, the tiny 4-layer GQA base, 5 optimizer steps, fp32.

Reference: the TP1/PP1 run from the same base weights, data and seed (for the bf16 megatron_amp_O2 runs: the bf16 O2
TP1/PP1 run, compared at bf16's tolerance). Compared: every step's loss (1e-5 relative),
NeMo's gradient norm where NeMo logs it (the plain optimizer), the final adapter tensors gathered by logical key
(A, B once; u, v by global layer), and bitwise-identical replicas on all ranks (checked inside each run).

Clipping counts replicated tensors once: the runs of RUNS and their reference clip the gradient norm at CLIP, below
every step's norm (the reference asserts it), so each update is the gradient scaled by CLIP / norm. A norm that
counted a replica of A or B twice, or missed one, would scale the update differently and the adapter tensors would
differ from TP1's; this covers the distributed optimizer (which logs no norm) at DP2, TP2 and PP2 as well.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.compare import assert_equivalent
from tests.distributed.conftest import run_driver

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Adam turns a rounding-level difference of a near-zero gradient element (the TP-split run sums in another order)
# into a whole lr-sized step: |m_hat / sqrt(v_hat)| is about 1 whatever |g|, and its sign follows g's. Every run
# here therefore uses Adam with eps far above every |g| (1e4): the update lr * m_hat / (sqrt(v_hat) + eps) is then
# lr / eps * m_hat, momentum SGD with step 0.3, linear in the gradients, so rounding-level gradient differences stay
# rounding-level in the weights. (Adam's own states, the distributed optimizer's sharding and its fp32 main copies
# are exercised all the same.)
SGD_LIKE = ["--lr", "3e3", "--eps", "1e4"]

# Below every step's gradient norm of the reference (0.16 to 0.55 on the tiny base), so clipping scales every step.
CLIP = 0.1
CLIPPED = ["--clip", str(CLIP)]

RUNS = {
    "tp2": (2, ["--tp", "2"]),
    "pp2_even": (2, ["--pp", "2"]),
    "pp2_uneven": (2, ["--pp", "2", "--first-stage-layers", "3"]),
    "dp2": (2, []),
    "dp2_distributed_optimizer": (2, ["--optim", "mcore_distributed_optim"]),
    "tp2_sequence_parallel": (2, ["--tp", "2", "--sp"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    "tp2_distributed_optimizer": (2, ["--tp", "2", "--optim", "mcore_distributed_optim"]),
    "pp2_distributed_optimizer": (2, ["--pp", "2", "--optim", "mcore_distributed_optim"]),
}

# Other presets at TP2 + SP (A/u applied before the parallel region, B/v after it; lora: untied per-layer A_l, B_l),
# each against its own TP1 run.
PRESET_RUNS = {
    "tp2_sequence_parallel_tl2": ("tl2", 2, ["--tp", "2", "--sp"]),
    "tp2_sequence_parallel_lora": ("lora", 2, ["--tp", "2", "--sp"]),
}

# megatron_amp_O2: a bf16 model with float32 main parameters in megatron's distributed optimizer (the usual GPU
# setting), against the same at TP1/PP1. bf16 forward passes round differently when the work is split.
# Tolerances: per-step losses 1e-3 relative (bf16 forward; observed 1e-4); adapter tensors, which are stored in
# bf16 (8 significant bits), within 2 bf16 ulps: rtol 2^-6 plus an atol of 2^-6 of the tensor's largest magnitude
# (observed: at most 1 ulp). A missing or doubled gradient sum is not a rounding difference: it halves or doubles a
# whole update, and the replica check fails the run.
O2 = ["--o2", "--optim", "mcore_distributed_optim"]
O2_RUNS = {
    "o2_bf16_tp2": (2, ["--tp", "2", *O2]),
    "o2_bf16_pp2": (2, ["--pp", "2", *O2]),
}
BF16_ULPS = 2 * 2.0**-7


@pytest.fixture(scope="module")
def reference(dist_base):
    """The TP1/PP1 run with the gradient norm clipped at CLIP, which is below the norm of every step."""
    run = run_driver(dist_base, "tp1", 1, *SGD_LIKE, *CLIPPED)
    assert min(run["grad_norms"]) > CLIP, f"clipping at {CLIP} changes no step: norms {run['grad_norms']}"
    return run


@pytest.mark.parametrize("name", list(RUNS))
def test_matches_tp1(name, dist_base, reference):
    nproc, args = RUNS[name]
    run = run_driver(dist_base, name, nproc, *args, *SGD_LIKE, *CLIPPED)
    # NeMo logs grad_norm only on the plain-optimizer path; the clipped adapter tensors check the norm on both
    assert_equivalent(run, reference, check_grad_norm="distributed_optimizer" not in name)
    assert {"A", "B", "layers.4.u", "layers.4.v"} <= set(run["state"])


@pytest.mark.parametrize("name", list(PRESET_RUNS))
def test_other_presets_match_tp1(name, dist_base):
    preset, nproc, args = PRESET_RUNS[name]
    reference = run_driver(dist_base, f"tp1_{preset}", 1, "--preset", preset, *SGD_LIKE)
    run = run_driver(dist_base, name, nproc, "--preset", preset, *args, *SGD_LIKE)
    assert_equivalent(run, reference)
    if preset == "lora":  # untied: A_l and B_l per layer, no shared tensors
        assert {"layers.1.A", "layers.4.B"} <= set(run["state"]) and "A" not in run["state"]


@pytest.mark.parametrize("name", list(O2_RUNS))
def test_bf16_o2_matches_tp1(name, dist_base):
    reference = run_driver(dist_base, "o2_bf16_tp1", 1, *O2, *SGD_LIKE)
    nproc, args = O2_RUNS[name]
    run = run_driver(dist_base, name, nproc, *args, *SGD_LIKE)
    assert all(tensor.dtype == torch.bfloat16 for tensor in run["state"].values())  # the model's dtype, as NeMo's
    assert_equivalent(run, reference, check_grad_norm=False, loss_rtol=1e-3, rtol=BF16_ULPS, atol_of_max=BF16_ULPS)


def test_without_the_gradient_sums_replicas_drift_and_the_check_fails(dist_base):
    """Negative control: with the TP sums disabled the replicas diverge and the drift check stops the run."""
    from tests.distributed.conftest import DRIVER, torchrun

    base, data, work = dist_base
    log = work / "tp2_no_sum.log"
    result = torchrun(DRIVER, 2, ["--base", str(base), "--data", str(data), "--out", str(work / "no_sum.pt"),
                                  "--tp", "2", "--skip-grad-sum"], log)
    assert result.returncode != 0
    assert "Tied-LoRA replica drift" in log.read_text()


def test_adapter_archive_loads_at_any_tp_pp(dist_base, reference):
    """Saved at TP1/PP1, loaded at TP2 x PP2 (4 processes, uneven nothing): every rank's replicas hold the archive's
    tensors, and saving again from TP2 x PP2 gives the same archive content."""
    from nemo_tiedlora.formats.adapter_archive import load_archive

    _, _, work = dist_base
    saved = work / "tp1_adapter.nemo"
    run_driver(dist_base, "tp1_save", 1, "--save-adapter", str(saved))
    resaved = work / "tp2pp2_adapter.nemo"
    run = run_driver(dist_base, "tp2pp2_load", 4, "--tp", "2", "--pp", "2", "--steps", "0",
                     "--load-adapter", str(saved), "--save-adapter", str(resaved))
    original, again = load_archive(saved), load_archive(resaved)
    assert sorted(again.tensors) == sorted(original.tensors)
    for key, tensor in original.tensors.items():
        assert torch.equal(again.tensors[key], tensor), key
        assert torch.equal(run["state"][key], tensor), key
    assert float(original.tensors["B"].abs().sum()) > 0

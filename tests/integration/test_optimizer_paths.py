"""Optimizer paths that would bypass the adapter's TP/PP sums, NaN guard and replica check are refused through the
entry script as a user types it, before the torchrun relaunch, any process group or model: the output ends with one
line naming cause and fix, exit status 2. The decision is taken on the user's config (fused_adam stays fused_adam,
fp16 stays fp16), not on the CPU rewrites that follow it. The paths that pass through are accepted by the same check
(the last test) and trained against TP1 in tests/distributed/test_optimizer_paths.py and test_equivalence.py."""

from __future__ import annotations

import pytest

from tests.integration.test_user_errors import _finetune, _last_line, _run

pytestmark = pytest.mark.integration

O2 = ("model.megatron_amp_O2=True", "trainer.precision=bf16-mixed")
MCORE = "model.optim.name=mcore_distributed_optim"
FIX_O2 = "use model.optim.name=mcore_distributed_optim (fp32 main parameters as well) or model.megatron_amp_O2=False"
OVERLAP = ("megatron starts each gradient bucket's reduce-scatter from backward hooks (overlap_param_sync needs "
           "overlap_grad_sync in NeMo), before finalize_model_grads, where tiedlora sums its replicated factors' "
           "gradients over TP/PP and checks them: the sums and the NaN guard would work on buffers already in flight; "
           "set model.optim.overlap_grad_sync=False and model.optim.overlap_param_sync=False")

CASES = {
    "o2_fused_adam_dp2_async": (
        ("trainer.devices=2", *O2, "model.optim.name=fused_adam"),
        "model.megatron_amp_O2=True with model.optim.name=fused_adam: NeMo keeps the gradients in apex's "
        "MainParamsOptimizerWrapper and reduces them from backward hooks (async_grad_allreduce=True), and its "
        "training_step calls neither allreduce_gradients nor finalize_model_grads, so tiedlora's NaN guard and "
        f"replica check would be off: {FIX_O2}"),
    "o2_fused_adam_dp2_sync": (
        ("trainer.devices=2", *O2, "+model.async_grad_allreduce=False"),
        "model.megatron_amp_O2=True with model.optim.name=fused_adam: NeMo keeps the gradients in apex's "
        "MainParamsOptimizerWrapper and reduces them in allreduce_main_grads (async_grad_allreduce=False), and its "
        "training_step calls neither allreduce_gradients nor finalize_model_grads, so tiedlora's NaN guard and "
        f"replica check would be off: {FIX_O2}"),
    "overlap_grad_sync": (
        ("trainer.devices=2", MCORE, "+model.optim.overlap_grad_sync=True"),
        f"model.optim.overlap_grad_sync=True with mcore_distributed_optim: {OVERLAP}"),
    "overlap_param_sync": (
        ("trainer.devices=2", MCORE, "+model.optim.overlap_grad_sync=True", "+model.optim.overlap_param_sync=True"),
        f"model.optim.overlap_grad_sync/overlap_param_sync=True with mcore_distributed_optim: {OVERLAP}"),
    "apex_distributed_adam": (
        ("trainer.devices=2", "model.optim.name=distributed_fused_adam"),
        "model.optim.name=distributed_fused_adam (apex's DistributedFusedAdam) reduce-scatters the gradients from its "
        "own backward hooks and NeMo's training_step then calls neither allreduce_gradients nor "
        "finalize_model_grads, so tiedlora's TP/PP gradient sums, NaN guard and replica check would never run: use "
        "model.optim.name=mcore_distributed_optim (or adam / fused_adam with megatron_amp_O2=False)"),
    "fp16_o2": (
        ("trainer.precision=16", "model.megatron_amp_O2=True", MCORE),
        "trainer.precision=16 with model.megatron_amp_O2=True: NeMo 2.4.1 does not train fp16 with O2 (a plain "
        "optimizer stops in configure_optimizers: 'fp16 training is not yet supported with O2'; with the "
        "distributed optimizer its loss scaler finds no gradients to unscale or check, as without O2): set "
        "model.megatron_amp_O2=False (fp16 autocast with NeMo's loss scaler) or "
        "trainer.precision=bf16-mixed"),
    "fp16_distributed_optimizer": (
        ("trainer.precision=16", MCORE),
        "trainer.precision=16 with model.optim.name=mcore_distributed_optim: NeMo's fp16 loss scaler looks for the "
        "gradients in the optimizer's param.grad, but megatron's distributed optimizer keeps them in its own "
        "buffers, so the scaler has nothing to unscale or check (NeMo fails at the first step: 'No inf checks were "
        "recorded for this optimizer'): use model.optim.name=fused_adam (or adam) for fp16, or "
        "trainer.precision=bf16-mixed"),
}


@pytest.mark.slow  # one entry-script process per case (about 20 s each here)
@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_path_refused_before_launch(case, tiny, tmp_path):
    base, data, _ = tiny
    overrides, message = CASES[case]
    code, output = _run(_finetune(base, data, tmp_path, *overrides))
    assert code == 2, output[-3000:]
    assert _last_line(output) == f"error: {message}"
    # refused in the first process: no relaunch, no process group, no model, no traceback, nothing written
    assert "relaunching under torchrun" not in output and "Restoring" not in output, output[-3000:]
    assert "Traceback" not in output and not (tmp_path / "megatron_gpt_peft_tuning").exists()


@pytest.mark.parametrize("trainer, model", [
    ({"precision": 16}, {"optim": {"name": "fused_adam"}}),  # fp16 + plain optimizer: NeMo's loss scaler path
    ({"precision": "bf16-mixed"}, {"optim": {"name": "fused_adam"}, "async_grad_allreduce": False}),
    ({"precision": "bf16-mixed"}, {"optim": {"name": "mcore_distributed_optim"}, "megatron_amp_O2": True}),
    ({"precision": 32}, {"optim": {"name": "mcore_distributed_optim", "overlap_grad_sync": False}}),
    ({"precision": 32}, {"optim": {"name": "adam", "overlap_grad_sync": True}}),  # NeMo ignores it without dist. opt.
])
def test_paths_through_the_hooks_are_accepted(trainer, model):
    from omegaconf import OmegaConf

    from nemo_tiedlora.nemo.optimizer_paths import check_optimizer_path

    cfg = OmegaConf.create({"trainer": trainer, "model": {**model, "peft": {"peft_scheme": "tiedlora"}}})
    check_optimizer_path(cfg, training=True)
    # and a refused path is not checked for other schemes or for generation
    refused = OmegaConf.create({"model": {"megatron_amp_O2": True, "optim": {"name": "fused_adam"},
                                          "peft": {"peft_scheme": "lora"}}})
    check_optimizer_path(refused, training=True)
    refused.model.peft.peft_scheme = "tiedlora"
    check_optimizer_path(refused, training=False)

"""fp16 loss scaling through NeMo's real training step on CPU: an overflow of the scaled adapter gradients is skipped
by the loss scaler (the factors are left as they were, the scale halves) and the run goes on; an overflow the scaler
cannot fix stops the run with one line.

Real: the tiny base restored by NeMo with Tied-LoRA added (finetune.build), NeMo's training_step and its hooked
allreduce_gradients (our guard runs there, on the scaled gradients), megatron's schedule scaling the loss through
``config.grad_scale_func``, Lightning's mixed-precision optimizer step (unscale, skip on inf, update) with NeMo's
PipelineMixedPrecisionPlugin. Stand-ins, because NeMo's fp16 path cannot run on CPU: the scaler is torch's CPU
GradScaler (NeMo's GradScaler subclasses torch.cuda.amp.GradScaler, which disables itself without CUDA, and its
hysteresis would delay the first halving), installed after the build (the entry script runs fp32 on CPU, so the
trainer is built without it); the compute stays fp32 and the overflow is injected (+inf added to one adapter
gradient in backward at chosen steps). tests/gpu/test_loss_scaling_cuda.py runs NeMo's own fp16 path on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.conftest import finetune_cfg

pytestmark = pytest.mark.integration


def _flat(*tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors]).clone()


def factors_of(model) -> tuple:
    """The tied A and B of the model's first chunk (both trained in tl6)."""
    from nemo_tiedlora.nemo.find_adapters import iter_shared_adapters

    return next(iter(iter_shared_adapters(model))).factors


def step_recorder(records: list):
    """A callback appending, per step: the loss scale and A, B (flat) before and after, and the steps done."""
    from lightning.pytorch import Callback

    def scale(trainer) -> float:
        return trainer.precision_plugin.scaler.get_scale()

    class StepRecord(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            records.append({"scale_before": scale(trainer), "AB_before": _flat(*factors_of(module))})

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            records[-1].update(scale_after=scale(trainer), AB_after=_flat(*factors_of(module)),
                               step=trainer.global_step)

    return StepRecord()


def fit_with_overflow(trainer, model, overflow_at: set):
    """trainer.fit with +inf added to A's gradient in backward in the steps `overflow_at` (0-based steps done);
    the error the run stopped with, if any."""
    factors_of(model)[0].register_hook(
        lambda grad: grad + float("inf") if trainer.global_step in overflow_at else grad)
    try:
        trainer.fit(model)
    except Exception as caught:  # noqa: BLE001 - the run's own error is what is checked
        return caught
    return None


def _fp16_run(tiny, tmp_path, *, overflow_at: set, steps: int, init_scale: float = 2.0**16, **tuning):
    """Train `steps` steps with a CPU loss scaler and overflows in the steps `overflow_at`. Returns (per step: scale
    before and after, A and B before and after, B's gradient in backward and at the optimizer; the error if any)."""
    from lightning.pytorch import Callback
    from nemo.collections.nlp.parts.nlp_overrides import PipelineMixedPrecisionPlugin
    from omegaconf import open_dict

    from nemo_tiedlora.nemo.finetune import build
    from nemo_tiedlora.nemo.find_adapters import model_chunks

    base, data, _ = tiny
    cfg = finetune_cfg(base, data, tmp_path, preset="tl6", adapter_dim=4, **tuning)
    with open_dict(cfg):
        cfg.trainer.update(max_steps=steps, val_check_interval=steps, limit_val_batches=0, num_sanity_val_steps=0)
        cfg.exp_manager.create_checkpoint_callback = False
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    records = []

    class UnscaledGrad(Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):  # after the scaler's unscale_
            records[-1]["B_grad_unscaled"] = factors_of(module)[1].grad.detach().clone()

    trainer, model, _, _ = build(cfg, callbacks=[step_recorder(records), UnscaledGrad()])
    trainer.strategy.precision_plugin = PipelineMixedPrecisionPlugin(precision="16-mixed", device="cpu",
                                                                     scaler=scaler)
    for chunk in model_chunks(model):
        chunk.config.grad_scale_func = scaler.scale  # what NeMo sets when trainer.precision is 16
    factors_of(model)[1].register_hook(lambda grad: records[-1].update(B_grad_in_backward=grad.detach().clone()))
    return records, fit_with_overflow(trainer, model, overflow_at)


def test_overflow_is_skipped_the_scale_halves_and_the_run_goes_on(tiny, tmp_path):
    """The loss is scaled (B's gradient in backward is 2^16 times the one the optimizer gets). Overflow in step 2
    of 4 (scale 2^16): that step leaves A and B bitwise as they were and the scale becomes
    2^15 (torch's rule: backoff 0.5); steps 1, 3 and 4 change them (finite) with the scale unchanged; no error, 4
    steps done."""
    records, error = _fp16_run(tiny, tmp_path, overflow_at={1}, steps=4)
    assert error is None, repr(error)
    # backward saw the gradient scaled by 2^16 (one micro-batch), the optimizer the unscaled one (exact: a power of 2)
    first = records[0]
    assert first["B_grad_unscaled"].abs().max() > 0
    assert torch.equal(first["B_grad_in_backward"], first["B_grad_unscaled"] * 2.0**16)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["scale_before"] for r in records] == [2.0**16, 2.0**16, 2.0**15, 2.0**15]
    assert records[1]["scale_after"] == records[1]["scale_before"] / 2
    assert torch.equal(records[1]["AB_after"], records[1]["AB_before"])  # skipped
    for index in (0, 2, 3):
        assert not torch.equal(records[index]["AB_after"], records[index]["AB_before"]), index
        assert torch.isfinite(records[index]["AB_after"]).all()


def test_persistent_overflow_stops_with_one_line(tiny, tmp_path):
    """Overflow in every step, fp16_max_skipped_steps=3: steps 1 and 2 are skipped (scale 2^16 -> 2^15 -> 2^14),
    the third stops the run with TiedLoraGradientError naming the count, the key and the scale; A and B never
    changed."""
    from nemo_tiedlora.core.errors import TiedLoraGradientError

    records, error = _fp16_run(tiny, tmp_path, overflow_at={0, 1, 2, 3}, steps=4, fp16_max_skipped_steps=3)
    assert isinstance(error, TiedLoraGradientError), repr(error)
    message = str(error)
    assert "\n" not in message
    assert message.startswith("fp16 overflow (NaN/Inf adapter gradient) in 3 optimizer steps in a row "
                              "(fp16_max_skipped_steps=3), the last at step 3 in ['"), message
    assert "with the loss scale at 16384: the loss scaler does not recover" in message, message
    assert [r["scale_before"] for r in records] == [2.0**16, 2.0**15, 2.0**14]
    assert all(torch.equal(r["AB_after"], records[0]["AB_before"]) for r in records[:2])


def test_overflow_at_the_scale_floor_stops_with_one_line(tiny, tmp_path):
    """fp16_min_loss_scale=2: an overflow at scale 4 is skipped (scale -> 2), the next one, at 2, stops the run."""
    from nemo_tiedlora.core.errors import TiedLoraGradientError

    records, error = _fp16_run(tiny, tmp_path, overflow_at={0, 1}, steps=3, init_scale=4.0, fp16_min_loss_scale=2.0)
    assert isinstance(error, TiedLoraGradientError), repr(error)
    assert str(error).startswith("fp16 overflow (NaN/Inf adapter gradient) at optimizer step 2 in ['"), str(error)
    assert "with the loss scale at 2 <= fp16_min_loss_scale=2: the gradients are non-finite without amplification" \
        in str(error)
    assert records[0]["scale_after"] == 2.0

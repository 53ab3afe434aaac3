"""fp16 loss scaling on CUDA, all of it NeMo's own (the GPU pack; skipped without CUDA): trainer.precision=16 through
finetune.build, so NeMo's trainer builder installs its PipelineMixedPrecisionPlugin with NeMo's GradScaler
(hysteresis set to 1 here, so the first overflow already halves the scale), megatron runs the forward under fp16
autocast and scales the loss with the scaler. The overflow is injected (+inf added to A's gradient in backward at
chosen steps): an overflow step leaves A and B as they were and halves the scale, the run goes on; a persistent
overflow stops with one line. tests/integration/test_loss_scaling.py is the CPU variant (torch's CPU scaler)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _fp16_run(dist_base, work: Path, *, overflow_at: set, steps: int, **tuning):
    from omegaconf import open_dict

    from nemo_tiedlora.nemo.finetune import build, tuning_config
    from tests.integration.test_loss_scaling import fit_with_overflow, step_recorder

    base, data, _ = dist_base
    cfg = tuning_config("finetuning")
    with open_dict(cfg):
        cfg.trainer.update(accelerator="gpu", devices=1, precision=16, max_steps=steps, val_check_interval=steps,
                           limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
                           enable_progress_bar=False)
        cfg.exp_manager.update(exp_dir=str(work), create_checkpoint_callback=False, resume_if_exists=False)
        cfg.model.update(restore_from_path=str(base), global_batch_size=8, micro_batch_size=8,
                         native_amp_init_scale=2.0**16, hysteresis=1)
        cfg.model.optim.sched.warmup_steps = 0
        cfg.model.optim.lr = 1e-2
        for split, name in (("train_ds", "train.jsonl"), ("validation_ds", "validation.jsonl")):
            cfg.model.data[split].file_names = [str(Path(data) / name)]
            cfg.model.data[split].max_seq_length = 64
        cfg.model.data.validation_ds.names = ["validation"]
        cfg.model.peft.tiedlora_tuning.update(preset="tl6", adapter_dim=4, **tuning)
    records = []
    trainer, model, _, _ = build(cfg, callbacks=[step_recorder(records)])
    scaler = trainer.precision_plugin.scaler
    assert type(scaler).__module__ == "nemo.collections.nlp.parts.nlp_overrides" and scaler.is_enabled()
    return records, fit_with_overflow(trainer, model, overflow_at)


def test_cuda_fp16_overflow_is_skipped_and_the_run_goes_on(dist_base, tmp_path):
    records, error = _fp16_run(dist_base, tmp_path, overflow_at={1}, steps=4)
    assert error is None, repr(error)
    assert len(records) == 4
    assert records[1]["scale_after"] == records[1]["scale_before"] / 2
    assert torch.equal(records[1]["AB_after"], records[1]["AB_before"])
    for index in (0, 2, 3):
        assert not torch.equal(records[index]["AB_after"], records[index]["AB_before"]), index
        assert torch.isfinite(records[index]["AB_after"]).all()


def test_cuda_fp16_persistent_overflow_stops_with_one_line(dist_base, tmp_path):
    from nemo_tiedlora.core.errors import TiedLoraGradientError

    records, error = _fp16_run(dist_base, tmp_path, overflow_at={0, 1, 2, 3}, steps=4, fp16_max_skipped_steps=3)
    assert isinstance(error, TiedLoraGradientError), repr(error)
    assert "\n" not in str(error)
    assert str(error).startswith("fp16 overflow (NaN/Inf adapter gradient) in 3 optimizer steps in a row "
                                 "(fp16_max_skipped_steps=3), the last at step 3 in ['"), str(error)
    assert all(torch.equal(r["AB_after"], records[0]["AB_before"]) for r in records[:2])

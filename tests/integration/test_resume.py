"""An interrupted fine-tuning run resumed from NeMo's checkpoint gives the same per-step losses as an
uninterrupted one (optimizer and scheduler state included).

The interruption falls after a validation at step 3 (where the checkpoint is written), mid-epoch: this is the case in
which NeMo's batch sampler and Lightning's restored loop state must agree on the epoch length (compat fix
``resume-epoch-length`` makes them agree).
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.conftest import finetune_cfg
from tests.integration.test_nemo_tiedlora import _Recorder

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(tiny, log_dir, steps: int, resume: bool, stop_after: int | None = None, always_save_nemo=False):
    from omegaconf import open_dict

    from nemo_tiedlora.nemo.finetune import finetune

    base, data, _ = tiny
    cfg = finetune_cfg(base, data, log_dir.parent, preset="tl6", adapter_dim=4)
    with open_dict(cfg):
        cfg.trainer.max_steps = steps
        cfg.trainer.val_check_interval = 3
        cfg.trainer.limit_val_batches = 1
        cfg.model.optim.sched = {"name": "CosineAnnealing", "warmup_steps": 2, "min_lr": 0.0, "constant_steps": 0}
        cfg.exp_manager.explicit_log_dir = str(log_dir)
        cfg.exp_manager.resume_if_exists = resume
        cfg.exp_manager.resume_ignore_no_checkpoint = True
        cfg.exp_manager.checkpoint_callback_params.save_top_k = -1
        cfg.exp_manager.checkpoint_callback_params.save_last = True
        cfg.exp_manager.checkpoint_callback_params.save_nemo_on_train_end = False
        cfg.exp_manager.checkpoint_callback_params.always_save_nemo = always_save_nemo
    recorder = _Recorder()
    callbacks = [recorder]
    if stop_after is not None:
        from lightning.pytorch import Callback

        class Interrupt(Callback):  # the job dies after `stop_after` steps (after that step's checkpoint)
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step >= stop_after:
                    trainer.should_stop = True

        callbacks.append(Interrupt())
    finetune(cfg, callbacks=callbacks)
    return recorder


def test_resume_equals_uninterrupted(tiny, tmp_path):
    from nemo_tiedlora.formats.adapter_archive import is_tiedlora_archive, load_archive
    from nemo_tiedlora.nemo.adapter_state import gather_adapter_state

    uninterrupted = _run(tiny, tmp_path / "straight", 6, resume=False).losses
    first = _run(tiny, tmp_path / "interrupted", 6, resume=False, stop_after=3, always_save_nemo=True)
    second = _run(tiny, tmp_path / "interrupted", 6, resume=True).losses
    assert len(uninterrupted) == 6 and len(first.losses) == 3 and len(second) == 3
    assert first.losses == pytest.approx(uninterrupted[:3], rel=1e-6)
    assert second == pytest.approx(uninterrupted[3:], rel=1e-6)
    # The adapter .nemo written during training (always_save_nemo, at the step-3 checkpoint, before the
    # interruption) is the Tied-LoRA archive and holds the adapter as it was at that step.
    saved = sorted((tmp_path / "interrupted" / "checkpoints").glob("*.nemo"))
    assert saved and all(is_tiedlora_archive(path) for path in saved)
    at_interruption = gather_adapter_state(first.module)
    archive = load_archive(saved[0]).tensors
    assert sorted(archive) == sorted(at_interruption)
    for key, tensor in at_interruption.items():
        assert torch.equal(archive[key], tensor.to(archive[key].dtype)), key

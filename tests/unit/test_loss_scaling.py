"""fp16 loss scaling vs the NaN guard (nemo_tiedlora.nemo.loss_scaling), with torch's CPU GradScaler and a real Adam
step: an overflow of the scaled adapter gradient is left to the scaler (step skipped, scale halved, training goes on),
what the scaler cannot fix stops with one line; the fp16_* keys of model.peft.tiedlora_tuning are validated with one
line and never stored in the adapter config. The NeMo model object is a stand-in holding only what the guard reads
(its trainer's precision plugin's scaler, its cfg); tests/integration/test_loss_scaling.py runs NeMo's real step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nemo_tiedlora.core.config import LossScalingGuard, TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraConfigError, TiedLoraGradientError
from nemo_tiedlora.core.modules import REPLICA_TAG
from nemo_tiedlora.nemo.loss_scaling import active_scaler, check_scaled_grads


def _setup(init_scale: float = 2.0**16, **tuning):
    chunk = torch.nn.Module()
    chunk.lora_a = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8).reshape(2, 4))
    setattr(chunk.lora_a, REPLICA_TAG, "model")
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    model = SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)),
                            cfg={"peft": {"tiedlora_tuning": tuning}})
    return chunk, scaler, model, torch.optim.Adam(chunk.parameters(), lr=0.1)


def _step(chunk, scaler, model, optimizer, *, step: int, overflow: bool) -> None:
    """One optimizer step as NeMo's fp16 path orders it: scaled backward, our hook, unscale + step + update."""
    optimizer.zero_grad()
    scaler.scale((chunk.lora_a * torch.arange(8.0).reshape(2, 4)).sum()).backward()
    if overflow:
        chunk.lora_a.grad[0, 1] = float("inf")  # what an fp16 overflow leaves in the scaled gradient
    check_scaled_grads(model, [chunk], scaler, step=step)
    scaler.step(optimizer)
    scaler.update()


def test_overflow_is_skipped_scale_halved_and_training_goes_on():
    chunk, scaler, model, optimizer = _setup()
    _step(chunk, scaler, model, optimizer, step=0, overflow=False)
    before = chunk.lora_a.detach().clone()
    _step(chunk, scaler, model, optimizer, step=1, overflow=True)
    assert torch.equal(chunk.lora_a, before) and scaler.get_scale() == 2.0**15 and model._tiedlora_skipped_in_a_row == 1
    _step(chunk, scaler, model, optimizer, step=2, overflow=False)
    assert not torch.equal(chunk.lora_a, before) and torch.isfinite(chunk.lora_a).all()
    assert model._tiedlora_skipped_in_a_row == 0 and scaler.get_scale() == 2.0**15


def test_persistent_overflow_stops_after_max_skipped_steps():
    chunk, scaler, model, optimizer = _setup(fp16_max_skipped_steps=3)
    for step in range(2):
        _step(chunk, scaler, model, optimizer, step=step, overflow=True)
    with pytest.raises(TiedLoraGradientError) as caught:
        _step(chunk, scaler, model, optimizer, step=2, overflow=True)
    assert str(caught.value).startswith(
        "fp16 overflow (NaN/Inf adapter gradient) in 3 optimizer steps in a row (fp16_max_skipped_steps=3), the last "
        "at step 3 in ['lora_a'] on rank 0 with the loss scale at 16384: the loss scaler does not recover")
    assert "\n" not in str(caught.value)


def test_overflow_at_or_below_the_floor_stops_at_once():
    chunk, scaler, model, optimizer = _setup(init_scale=1.0)  # default floor 1.0: unamplified gradients overflow
    with pytest.raises(TiedLoraGradientError, match=r"^fp16 overflow .* at optimizer step 1 in \['lora_a'\] on rank 0 "
                                                    r"with the loss scale at 1 <= fp16_min_loss_scale=1: "):
        _step(chunk, scaler, model, optimizer, step=0, overflow=True)


def test_no_enabled_scaler_means_the_plain_guard():
    """bf16 / fp32 (no scaler) and fp16 with NeMo's scaler disabled (PP > 1) take the plain NaN guard."""
    for scaler in (None, torch.amp.GradScaler("cpu", enabled=False)):
        model = SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)))
        assert active_scaler(model) is None
    assert active_scaler(SimpleNamespace()) is None
    enabled = torch.amp.GradScaler("cpu")
    assert active_scaler(SimpleNamespace(_trainer=SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=enabled)))) is enabled


@pytest.mark.parametrize("key, value, words", [
    ("fp16_max_skipped_steps", 0, "fp16_max_skipped_steps must be a positive int, got 0: use e.g. 50"),
    ("fp16_max_skipped_steps", 2.5, "fp16_max_skipped_steps must be a positive int, got 2.5"),
    ("fp16_min_loss_scale", -1.0, "fp16_min_loss_scale must be a positive number, got -1.0: use e.g. 1.0"),
    ("fp16_min_loss_scale", float("nan"), "fp16_min_loss_scale must be a positive number, got nan"),
])
def test_bad_guard_keys_are_refused_in_one_line(key, value, words):
    with pytest.raises(TiedLoraConfigError, match=f"^{words}") as caught:
        TiedLoraConfig.from_nemo({"preset": "tl6", key: value})
    assert "\n" not in str(caught.value)


def test_guard_keys_are_run_settings_not_adapter_config():
    config = TiedLoraConfig.from_nemo({"preset": "tl6", "fp16_max_skipped_steps": 7, "fp16_min_loss_scale": 0.5})
    assert config == TiedLoraConfig(preset="tl6")
    assert not any(key.startswith("fp16") for key in config.to_dict())
    assert LossScalingGuard.from_nemo({"fp16_max_skipped_steps": 7, "fp16_min_loss_scale": None}) == \
        LossScalingGuard(max_skipped_steps=7, min_loss_scale=1.0)
    from nemo_tiedlora.nemo.finetune import tuning_config

    yaml = tuning_config("finetuning").model.peft.tiedlora_tuning
    assert LossScalingGuard.from_nemo(yaml) == LossScalingGuard()  # the YAML's values are the defaults

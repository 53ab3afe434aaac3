"""megatron-core distributed checkpointing of a Tied-LoRA-adapted NeMo GPT model (real NeMo and megatron-core on CPU,
in this process, TP=PP=1; TP2 and PP2 through torchrun: tests/distributed/test_dist_checkpoint_dist.py).

Checked: NeMo's `DistributedCheckpointIO` (torch_dist format, what `model.dist_ckpt_format` selects) saves
`model.sharded_state_dict()` of an adapted model whose adapter tensors were set to random values, and loading it
into a freshly built adapted model whose adapter tensors hold other values gives back every adapter tensor (the
shared A, B and each layer's u_l, v_l) and every base weight bit for bit. The checkpoint's keys: the base linear's
under the key it has without the adapter, A/B once, u_l/v_l once per global layer. And the NeMo behaviour the
adapter's own (PEFT) checkpoints rely on: once a PEFT model is set up, NeMo's `sharded_state_dict()` is None (its
checkpoints hold the plain adapter-only state dict), adapter or not.
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.conftest import finetune_cfg

pytestmark = pytest.mark.integration


def _adapted(tiny, tmp_path, seed: int):
    """A freshly built tl6 model (rank 4) whose adapter tensors are then set to random values drawn from `seed`."""
    from nemo_tiedlora.nemo.finetune import build

    base, data, _ = tiny
    _, model, _, _ = build(finetune_cfg(base, data, tmp_path / f"build{seed}", preset="tl6", adapter_dim=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in _adapter_tensors(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict(keep_vars=True).items() if "adapter_layer" in key}


def test_adapter_tensors_survive_a_distributed_checkpoint(tiny, tmp_path):
    from megatron.core import dist_checkpointing
    from nemo.utils.callbacks.dist_ckpt_io import DistributedCheckpointIO

    saved = _adapted(tiny, tmp_path, seed=1)
    io = DistributedCheckpointIO(save_ckpt_format="torch_dist")
    io.save_checkpoint({"state_dict": saved.sharded_state_dict()}, tmp_path / "ckpt")

    layers = saved.cfg.num_layers
    keys = set(dist_checkpointing.load_tensors_metadata(str(tmp_path / "ckpt")))
    qkv = "model.decoder.layers.self_attention.linear_qkv."
    assert qkv + "weight" in keys  # the base linear's key, as without the adapter
    assert {key for key in keys if "adapter_layer" in key} == {
        "model.tiedlora_shared.adapter_layer.tiedlora.lora_a",
        "model.tiedlora_shared.adapter_layer.tiedlora.lora_b",
        *(f"{qkv}adapter_layer.tiedlora.global_layer_{layer}.{name}" for layer in range(layers)
          for name in ("vec_u", "vec_v"))}

    loaded = _adapted(tiny, tmp_path, seed=2)
    expected = {key: value.detach().clone() for key, value in saved.state_dict().items()
                if isinstance(value, torch.Tensor)}  # (the linears' _extra_state is None on CPU)
    before = _adapter_tensors(loaded)
    assert len(before) == 2 + 2 * layers
    assert not any(torch.equal(before[key], expected[key]) for key in before)  # every adapter tensor differs
    state = io.load_checkpoint(tmp_path / "ckpt", sharded_state_dict={"state_dict": loaded.sharded_state_dict()})
    loaded.load_state_dict(state["state_dict"], strict=True)
    after = loaded.state_dict()
    different = [key for key in expected if not torch.equal(after[key], expected[key])]
    assert different == []


def test_set_up_peft_model_keeps_nemo_plain_checkpoints(tiny, tmp_path):
    """NeMo's PEFT models answer None to sharded_state_dict once set up (then the trainer writes the adapter-only
    torch state dict, unchanged by the adapter's own sharded_state_dict); before set-up they answer the full model's,
    adapter included."""
    model = _adapted(tiny, tmp_path, seed=3)
    assert model.use_peft and not model.setup_complete
    assert any("adapter_layer" in key for key in model.sharded_state_dict())
    model.setup_complete = True
    assert model.sharded_state_dict() is None

"""megatron-core's distributed checkpoint of a Tied-LoRA-adapted NeMo model at TP2 x PP2 (4 ranks, torchrun, gloo,
real NeMo; the in-process TP=PP=1 case: tests/integration/test_dist_checkpoint.py). Driver:
tests/distributed/dist_ckpt_driver.py.

Checked on every rank: NeMo's DistributedCheckpointIO (torch_dist) saves `model.sharded_state_dict()` (its first save
validates that each tensor has exactly one writer: A and B are replicas on all 4 ranks, u_l/v_l on the 2 TP ranks
of their stage), and loading it into a second adapted model whose adapter tensors hold other values gives back the
whole model's adapter tensors (A, B, u_l and v_l of the 4 layers, gathered over the pipeline) and the rank's whole
state dict bit for bit. The checkpoint holds A and B once and u_l, v_l once per global layer.
"""

from __future__ import annotations

import json

import pytest

from tests.distributed.conftest import DRIVER, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_tp2_pp2_checkpoint_round_trip(dist_base, tmp_path):
    base, data, _ = dist_base
    driver = DRIVER.with_name("dist_ckpt_driver.py")
    result = torchrun(driver, 4, [str(base), str(data), str(tmp_path), "2", "2"], tmp_path / "dist_ckpt.log")
    assert result.returncode == 0, (tmp_path / "dist_ckpt.log").read_text()[-3000:]
    reports = [json.loads((tmp_path / f"dist_ckpt.{rank}.json").read_text()) for rank in range(4)]
    layers = 4
    adapter = ["A", "B"] + [f"layers.{n}.{factor}" for n in range(1, layers + 1) for factor in ("u", "v")]
    qkv = "model.decoder.layers.self_attention.linear_qkv."
    for report in reports:
        assert sorted(report["adapter_keys"]) == sorted(adapter)
        assert report["differed_before"] == report["adapter_keys"]
        assert report["adapter_mismatch"] == [] and report["local_mismatch"] == []
        assert {key for key in report["checkpoint_keys"] if "adapter_layer" in key} == {
            "model.tiedlora_shared.adapter_layer.tiedlora.lora_a",
            "model.tiedlora_shared.adapter_layer.tiedlora.lora_b",
            *(f"{qkv}adapter_layer.tiedlora.global_layer_{n}.{name}" for n in range(layers)
              for name in ("vec_u", "vec_v"))}
        assert qkv + "weight" in report["checkpoint_keys"]

"""``torchrun --nproc_per_node=4 tests/distributed/dist_ckpt_driver.py BASE DATA WORK TP PP``: megatron-core's
distributed checkpoint of a Tied-LoRA-adapted NeMo model built at TP x PP (real NeMo, gloo, CPU).

Every rank builds the adapted model (tl6, rank 4) from BASE, sets its adapter tensors to values drawn from seed 1
(a function of the tensor's global name, so A/B replicas and each layer's u/v agree on every rank holding them),
saves `model.sharded_state_dict()` with NeMo's `DistributedCheckpointIO` (torch_dist; its first save validates
that every tensor is written by exactly one rank), builds a second model, sets its adapter tensors from seed 2,
loads the checkpoint into it and compares: the whole model's adapter state (gathered over the pipeline) and this
rank's whole state dict, bit for bit. Each rank writes WORK/dist_ckpt.<rank>.json.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the tests' finetuning config


def _fill(model, seed: int) -> None:
    from nemo_tiedlora.nemo.find_adapters import iter_layer_adapters, iter_shared_adapters

    named = [(name, param) for shared in iter_shared_adapters(model) for name, param in shared.named_parameters()]
    named += [(f"{number}.{name}", param) for number, adapter in iter_layer_adapters(model)
              for name, param in adapter.named_parameters(recurse=False)]
    with torch.no_grad():
        for name, param in named:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=generator))


def _build(base: str, data: str, work: Path, tp: int, pp: int):
    from omegaconf import open_dict

    from nemo_tiedlora.nemo.finetune import build
    from tests.integration.conftest import finetune_cfg

    files = SimpleNamespace(train=Path(data) / "train.jsonl", validation=Path(data) / "validation.jsonl")
    cfg = finetune_cfg(Path(base), files, work, preset="tl6", adapter_dim=4)
    with open_dict(cfg):
        cfg.trainer.devices = int(os.environ["WORLD_SIZE"])
        cfg.exp_manager = None
        cfg.model.tensor_model_parallel_size = tp
        cfg.model.pipeline_model_parallel_size = pp
    return build(cfg)[1]


def main() -> None:
    from megatron.core import dist_checkpointing
    from nemo.utils.callbacks.dist_ckpt_io import DistributedCheckpointIO

    from nemo_tiedlora.nemo.launch import finish_distributed
    from nemo_tiedlora.nemo.adapter_state import gather_adapter_state

    base, data, work, tp, pp = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ckpt = work / "dist_ckpt"
    saved = _build(base, data, work, tp, pp)
    _fill(saved, seed=1)
    expected = gather_adapter_state(saved)
    io = DistributedCheckpointIO(save_ckpt_format="torch_dist")
    io.save_checkpoint({"state_dict": saved.sharded_state_dict()}, ckpt)
    expected_local = {key: value.detach().clone() for key, value in saved.state_dict().items()
                      if isinstance(value, torch.Tensor)}

    loaded = _build(base, data, work, tp, pp)
    _fill(loaded, seed=2)
    before = gather_adapter_state(loaded)
    state = io.load_checkpoint(ckpt, sharded_state_dict={"state_dict": loaded.sharded_state_dict()})
    loaded.load_state_dict(state["state_dict"], strict=True)
    after = gather_adapter_state(loaded)
    local = loaded.state_dict()
    rank = torch.distributed.get_rank()
    report = {
        "adapter_keys": sorted(expected),
        "differed_before": sorted(key for key in expected if not torch.equal(before[key], expected[key])),
        "adapter_mismatch": sorted(key for key in expected if not torch.equal(after[key], expected[key])),
        "local_mismatch": sorted(key for key in expected_local if not torch.equal(local[key], expected_local[key])),
        "checkpoint_keys": sorted(dist_checkpointing.load_tensors_metadata(str(ckpt))),
    }
    with open(work / f"dist_ckpt.{rank}.json", "w") as out:
        json.dump(report, out)
    finish_distributed()


if __name__ == "__main__":
    main()

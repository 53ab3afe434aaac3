"""``torchrun --nproc_per_node=4 tests/distributed/replica_drift_driver.py OUT``: the replica check on real
process groups (megatron-core's parallel state, gloo, TP=2 x DP=2), without NeMo.

Every rank builds the same tagged tensors (A, B model-wide; u, v of one layer), checks them (must pass), then
global rank 3 perturbs one element of A and all ranks check again: the error must name A, rank 3 and the step.
Rank 0 writes {"checked": n, "error": message} to OUT.0.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn


def main() -> None:
    from megatron.core import parallel_state

    from nemo_tiedlora.core.modules import REPLICA_TAG, REPLICATED_IN_LAYER, REPLICATED_MODEL_WIDE
    from nemo_tiedlora.nemo.replica_check import ReplicaDriftError, check_replicas

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(0)  # the same tensors on every rank
    chunk = nn.Module()
    for name, shape, kind in (("A", (4, 8), REPLICATED_MODEL_WIDE), ("B", (12, 4), REPLICATED_MODEL_WIDE),
                              ("u", (4,), REPLICATED_IN_LAYER), ("v", (12,), REPLICATED_IN_LAYER)):
        param = nn.Parameter(torch.randn(shape))
        setattr(param, REPLICA_TAG, kind)
        chunk.register_parameter(name, param)
    checked = check_replicas([chunk], step=6)
    if dist.get_rank() == 3:
        with torch.no_grad():
            chunk.A[1, 2] += 0.5  # changed outside the optimizer on one rank only
    error = None
    try:
        check_replicas([chunk], step=7)
    except ReplicaDriftError as err:
        error = str(err)
    if dist.get_rank() == 0:
        with open(f"{sys.argv[1]}.0.json", "w") as out:
            json.dump({"checked": checked, "error": error}, out)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""``torchrun --nproc_per_node=2 tests/distributed/sync_count_driver.py OUT``: the per-step adapter checks on a real
gloo process group (megatron-core's parallel state, TP=2), without NeMo, counted with tests/host_syncs.DeviceTraffic.

Each rank builds the same tl6 adapter of 32 layers (tests/unit/test_sync_counts.tl6_chunk) and records, for one
step: the host reads and collectives of the TP gradient sums, the replica check and the finite check; then rank 1
alone puts a NaN into layer 17's v gradient (every rank must stop, naming it on rank 1); then rank 1 alone turns an
element of layer 5's u into -0.0 where the other rank holds +0.0 (equal as numbers, not bitwise: must be reported).
Each rank writes OUT.<rank>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the counter and the test adapter


def main() -> None:
    from megatron.core import parallel_state

    from nemo_tiedlora.core.anomaly import check_finite_grads
    from nemo_tiedlora.core.errors import TiedLoraGradientError
    from nemo_tiedlora.nemo.replica_check import ReplicaDriftError, check_replicas
    from nemo_tiedlora.nemo.grad_sync import reduce_adapter_grads
    from tests.host_syncs import DeviceTraffic
    from tests.unit.test_sync_counts import tl6_chunk

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    chunk = tl6_chunk()
    report = {}
    for name, work in (("sums", lambda: reduce_adapter_grads([chunk])),
                       ("replicas", lambda: check_replicas([chunk], step=0)),
                       ("finite", lambda: check_finite_grads([chunk], step=0))):
        with DeviceTraffic() as traffic:
            result = work()
        report[name] = {"host_reads": traffic.host_reads, "collectives": traffic.collectives, "result": result}
    if rank == 1:
        chunk.layers[16].vec_v.grad[3] = float("nan")
    try:
        check_finite_grads([chunk], step=41)
        report["nan_error"] = None
    except TiedLoraGradientError as err:
        report["nan_error"] = str(err)
    with torch.no_grad():
        chunk.layers[4].vec_u[2] = -0.0 if rank == 1 else 0.0
    try:
        check_replicas([chunk], step=9)
        report["drift_error"] = None
    except ReplicaDriftError as err:
        report["drift_error"] = str(err)
    with open(f"{sys.argv[1]}.{rank}.json", "w") as out:
        json.dump(report, out)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

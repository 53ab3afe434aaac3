"""The collectives the adapter's update really issues at TP=2, observed on a real 2-rank gloo process group.

``observe`` runs in each of two spawned processes: megatron-core's parallel state at TP=2, then one forward and
backward of the fused update through the region the adapter uses (``copy_to_tensor_model_parallel_region``, or with
sequence parallelism ``gather_from_sequence_parallel_region``), applied to g [s, b, r] ("after": the adapter's
layout) and, for comparison, to x [s, b, d] ahead of the update ("before": the region on the layer's input). Every
all-reduce, all-gather and reduce-scatter is recorded as it is called: the pass, the collective, the elements of the
full tensor and their bytes. Rank 0 writes the record to ``out`` as JSON.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

SEQ, BATCH, D, OUT, RANK = 8, 3, 16, 24, 4


def _recording(calls: list, phase: list):
    """Wrap the three collectives megatron's mappings call; each call appends (pass, name, elements, bytes)."""
    from megatron.core.tensor_parallel import mappings

    def wrap(name, fn, full):
        def run(*args, **kwargs):
            tensor = args[full]
            calls.append((phase[0], name, tensor.numel(), tensor.numel() * tensor.element_size()))
            return fn(*args, **kwargs)
        return run

    dist.all_reduce = wrap("all-reduce", dist.all_reduce, 0)  # mappings calls torch.distributed.all_reduce
    mappings.dist_all_gather_func = wrap("all-gather", mappings.dist_all_gather_func, 0)  # output: the full one
    mappings.dist_reduce_scatter_func = wrap("reduce-scatter", mappings.dist_reduce_scatter_func, 1)  # input: full


def _one_step(region, layout: str, sequence_parallel: bool, dtype: torch.dtype, phase: list) -> None:
    """Forward (phase 'forward') and backward (phase 'backward') of this rank's rows of the update."""
    from nemo_tiedlora.core.autograd import fused_tied_lora_update

    rank, tp = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    a, u = torch.randn(RANK, D, generator=g), torch.randn(RANK, generator=g)
    b, v = torch.randn(OUT, RANK, generator=g), torch.randn(OUT, generator=g)
    rows = slice(rank * OUT // tp, (rank + 1) * OUT // tp)
    factors = [t.to(dtype).requires_grad_(True) for t in (a, b[rows].contiguous(), u, v[rows].contiguous())]
    seq = SEQ // tp if sequence_parallel else SEQ
    x = torch.randn(seq, BATCH, D, generator=g).to(dtype).requires_grad_(True)
    phase[0] = "forward"
    if layout == "after":
        z = fused_tied_lora_update(x, *factors, 0.5, region=region)
    else:
        z = fused_tied_lora_update(region(x), *factors, 0.5)
    phase[0] = "backward"
    z.float().square().sum().backward()


def observe(rank: int, init_file: str, out: str, dtype_name: str) -> None:
    """One of the two ranks (torch.multiprocessing.spawn's entry): record every layout x sequence parallelism."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    torch.cuda.current_device = lambda: torch.device("cpu")  # megatron allocates the gather's output there
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    dtype = getattr(torch, dtype_name)
    record, calls, phase = {}, [], [""]
    _recording(calls, phase)
    for sequence_parallel in (False, True):
        region = gather_from_sequence_parallel_region if sequence_parallel else copy_to_tensor_model_parallel_region
        for layout in ("before", "after"):
            calls.clear()
            _one_step(region, layout, sequence_parallel, dtype, phase)
            record[f"{layout} sp={sequence_parallel}"] = [list(c) for c in calls]
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(record, f)

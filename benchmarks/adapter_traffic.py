"""Count the adapter's activation collectives in a real run (torchrun, gloo on CPU; nccl with --accelerator gpu).

    torchrun --nproc_per_node=2 benchmarks/adapter_traffic.py --out traffic.json [--sp]

One megatron ColumnParallelLinear (the QKV linear) at TP = world size, wrapped by the package's TiedLoraQKV with a
tl6 adapter, one forward + backward of one micro-batch. megatron's mapping helpers (`_reduce`,
`_gather_along_first_dim`, `_reduce_scatter_along_first_dim`: what copy-to-TP-region and the sequence-parallel
gather call) are wrapped to count every collective with its tensor's elements and bytes. Three runs:
- base: the linear alone (its own collectives do not go through these helpers: 0 expected);
- before: the input x itself entering the TP region (`copy_to_tensor_model_parallel_region(x)` /
  `gather_from_sequence_parallel_region(x)`) then the plain composition on this rank's rows, for comparison;
- after: TiedLoraQKV as shipped (g = u * (A x) enters the region).
The adapter's traffic is each run's calls minus the base's. Rank 0 writes the counts (JSON) to --out.
`benchmarks/parallel_overhead.py` runs it and reports the traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sp", action="store_true", help="sequence parallelism")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
        mappings,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_tiedlora.core.config import TiedLoraConfig
    from nemo_tiedlora.core.functional import qkv_out_width, tied_lora_update
    from nemo_tiedlora.nemo.adapters import TiedLoraLayerAdapter, TiedLoraQKV, TiedLoraSharedAdapter
    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.launch import ensure_process_groups
    from nemo_tiedlora.nemo.launch import finish_distributed

    compat.apply()  # the CPU fixes (RNG, device) megatron needs here
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    ensure_process_groups(world_size=world, global_rank=rank, tensor_model_parallel_size=world)
    tp, tp_rank = world, parallel_state.get_tensor_model_parallel_rank()
    d, r = args.hidden, args.rank
    out = qkv_out_width(d, args.heads, args.groups)
    config = TransformerConfig(num_layers=1, hidden_size=d, num_attention_heads=args.heads,
                               num_query_groups=args.groups, tensor_model_parallel_size=tp,
                               sequence_parallel=args.sp, params_dtype=torch.float32,
                               use_cpu_initialization=not torch.cuda.is_available())
    base = ColumnParallelLinear(d, out, config=config, init_method=torch.nn.init.xavier_uniform_,
                                gather_output=False, bias=False, skip_bias_add=False)
    for p in base.parameters():
        p.requires_grad_(False)
    cfg = TiedLoraConfig(preset="tl6", rank=r)
    shared = TiedLoraSharedAdapter(in_features=d, out_features=out, tiedlora=cfg)
    layer = TiedLoraLayerAdapter(in_features=d, out_features=out, tiedlora=cfg, layer_number=1)
    layer.bind_shared(shared)
    with torch.no_grad():  # non-zero B so that every factor carries a gradient
        torch.nn.init.normal_(shared.factors[1], generator=torch.Generator().manual_seed(1))
    rows = slice(tp_rank * out // tp, (tp_rank + 1) * out // tp)
    wrapper = TiedLoraQKV(base, layer_number=1, shared_owner=None, out_rows=rows, tensor_parallel_size=tp,
                          sequence_parallel=args.sp)
    wrapper.adapter_layer = torch.nn.ModuleDict({"tiedlora": layer})
    wrapper.adapter_cfg = {"tiedlora": {"enabled": True}}

    counted: list[dict] = []

    def counting(name, original):
        def wrapped(input_, *rest, **kwargs):
            # elements of the full tensor at the collective (an all-gather's output, the others' input)
            full = input_.numel() * (tp if name == "all-gather" else 1)
            counted.append({"collective": name, "elements": full, "bytes": full * input_.element_size()})
            return original(input_, *rest, **kwargs)
        return wrapped

    mappings._reduce = counting("all-reduce", mappings._reduce)
    mappings._gather_along_first_dim = counting("all-gather", mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = counting("reduce-scatter", mappings._reduce_scatter_along_first_dim)

    local_seq = args.seq // tp if args.sp else args.seq
    generator = torch.Generator().manual_seed(0)  # the same full input on every rank; SP takes its own shard
    full = torch.randn(args.seq, args.batch, d, generator=generator)
    x = full[tp_rank * local_seq:(tp_rank + 1) * local_seq] if args.sp else full

    def before(x):
        result, _ = base(x)
        xr = gather_from_sequence_parallel_region(x) if args.sp else copy_to_tensor_model_parallel_region(x)
        a, b, u, v = layer.factors
        return result + tied_lora_update(xr, a, b[rows], u, v[rows], cfg.scale)

    runs = {"base": lambda x: base(x)[0], "before": before, "after": lambda x: wrapper(x)[0]}
    report = {"tp": tp, "sequence_parallel": args.sp, "tokens": args.seq * args.batch, "hidden_size": d, "rank": r,
              "out_features": out, "runs": {}}
    for name, fn in runs.items():
        counted.clear()
        xi = x.detach().clone().requires_grad_(True)
        fn(xi).square().sum().backward()
        report["runs"][name] = list(counted)
    base_calls = report["runs"]["base"]  # with SP the base's own gather/reduce-scatter use the same helpers
    for name in ("before", "after"):
        adapter = list(report["runs"][name])
        for call in base_calls:
            adapter.remove(call)
        report[f"adapter_{name}"] = adapter
    if rank == 0:
        Path(args.out).write_text(json.dumps(report, indent=2))
    finish_distributed()


if __name__ == "__main__":
    main()

"""Training-step time at a real model shape on CPU: frozen base, lora, tl6 (fused), tl6 (reference composition).

    python benchmarks/step_time.py [--steps 2 --rounds 3 --seq 512 --threads 2] [--out benchmarks/results]

One process, one megatron-core GPTModel (local layer spec, RMSNorm, SwiGLU, RoPE, GQA) at SmolLM2-135M's shape
(d=576, 30 layers, 9 heads / 3 query groups, ffn 1536, vocab 49152, tied embeddings; random weights), batch 1 x
`--seq` tokens. Every `linear_qkv` is wrapped once by the package's `TiedLoraQKV` holding three adapters (lora,
tl6, tl6 through the plain composition `functional.tied_lora_update`); each configuration enables one of them (or
none: the frozen base) and runs forward + backward + Adam on its trainable tensors. Gradients flow back to the
input embeddings in every configuration, so the frozen base pays the full backward too. The configurations are
interleaved step by step for `--rounds` x `--steps` cycles (a busy moment on a shared machine hits one cycle's
configurations alike); ratios are medians of the per-cycle ratios. Writes step_time_cpu.json and .md. Measured,
not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = ("base", "lora", "tl6", "tl6_reference")
SHAPE = dict(hidden_size=576, num_layers=30, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536,
             vocab_size=49152)


def build_stack(*, seq: int, rank: int, shape: dict = SHAPE, dtype=None, device: str = "cpu"):
    """(model, adapters, shared): a megatron-core GPTModel of `shape` (local spec; random frozen weights in `dtype`,
    float32 by default, initialized on `device`) whose every `linear_qkv` is wrapped once by `TiedLoraQKV` holding
    the lora, tl6 and tl6-reference adapters (all disabled; :func:`enable` picks one), B drawn non-zero.
    `adapters[name]` lists (wrapper, adapter module) per layer; `shared` holds tl6's A and B."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_tiedlora.core.config import TiedLoraConfig
    from nemo_tiedlora.core.functional import qkv_out_width, tied_lora_update
    from nemo_tiedlora.nemo import compat
    from nemo_tiedlora.nemo.adapters import TiedLoraLayerAdapter, TiedLoraQKV, TiedLoraSharedAdapter
    from nemo_tiedlora.nemo.launch import ensure_process_groups

    class ReferenceLayer(TiedLoraLayerAdapter):
        """tl6 through the plain composition of torch ops (what ran before the fused functions)."""

        def forward(self, x, out_rows=None, region=None):
            return tied_lora_update(x, *self.factors, self.cfg.scale)

    compat.apply()
    ensure_process_groups(world_size=1, global_rank=0)
    dtype = dtype or torch.float32
    d = shape["hidden_size"]
    config = TransformerConfig(
        num_layers=shape["num_layers"], hidden_size=d, num_attention_heads=shape["num_attention_heads"],
        num_query_groups=shape["num_query_groups"], ffn_hidden_size=shape["ffn_hidden_size"],
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=device == "cpu", params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=shape["vocab_size"],
                     max_sequence_length=seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=shape.get("tied", True))
    for p in model.parameters():
        p.requires_grad_(False)
    out = qkv_out_width(d, shape["num_attention_heads"], shape["num_query_groups"])
    cfgs = {"lora": TiedLoraConfig(preset="lora", rank=rank), "tl6": TiedLoraConfig(preset="tl6", rank=rank)}
    shared = TiedLoraSharedAdapter(in_features=d, out_features=out, tiedlora=cfgs["tl6"])
    adapters = {name: [] for name in CONFIGS[1:]}
    for layer in model.decoder.layers:
        attention = layer.self_attention
        wrapper = TiedLoraQKV(attention.linear_qkv, layer_number=layer.layer_number, shared_owner=None,
                              out_rows=None, tensor_parallel_size=1, sequence_parallel=False)
        built = {
            "lora": TiedLoraLayerAdapter(in_features=d, out_features=out, tiedlora=cfgs["lora"],
                                         layer_number=layer.layer_number),
            "tl6": TiedLoraLayerAdapter(in_features=d, out_features=out, tiedlora=cfgs["tl6"],
                                        layer_number=layer.layer_number),
            "tl6_reference": ReferenceLayer(in_features=d, out_features=out, tiedlora=cfgs["tl6"],
                                            layer_number=layer.layer_number),
        }
        for name in ("tl6", "tl6_reference"):
            built[name].bind_shared(shared)
        wrapper.adapter_layer = torch.nn.ModuleDict(built)
        wrapper.adapter_cfg = {name: {"enabled": False} for name in built}
        wrapper.set_accepted_adapter_types([TiedLoraLayerAdapter])
        attention.linear_qkv = wrapper
        for name, module in built.items():
            adapters[name].append((wrapper, module))
    shared.to(device=device, dtype=dtype)
    for modules in adapters.values():
        for _, module in modules:
            module.to(device=device, dtype=dtype)
    with torch.no_grad():  # B starts at zero (the model equals the base); non-zero B makes every factor work
        for modules in adapters.values():
            for _, module in modules:
                module.factors[1].normal_(0.0, 0.02)
    return model, adapters, shared


def trainable(name, adapters) -> list:
    """The trainable adapter tensors of configuration `name` (none for the frozen base; tl6's A and B once)."""
    if name == "base":
        return []
    params = {id(p): p for _, module in adapters[name] for p in module.factors if p.requires_grad}
    return list(params.values())


def enable(name, adapters) -> None:
    """Turn on the adapter `name` in every layer (every other one off; "base": all off)."""
    for adapter, modules in adapters.items():
        for wrapper, _ in modules:
            wrapper.adapter_cfg[adapter]["enabled"] = adapter == name


def measure(*, steps: int, rounds: int, seq: int, rank: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, adapters, _ = build_stack(seq=seq, rank=rank)
    model.train()
    model.embedding.word_embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab_size"], (steps + 1, 1, seq + 1), generator=generator)
    positions = torch.arange(seq).unsqueeze(0)
    optimizers = {name: torch.optim.Adam(trainable(name, adapters), lr=1e-4) if name != "base" else None
                  for name in CONFIGS}

    def step(name: str, index: int) -> float:
        enable(name, adapters)
        started = time.perf_counter()
        loss = model(input_ids=tokens[index, :, :-1], position_ids=positions, attention_mask=None,
                     labels=tokens[index, :, 1:]).mean()
        loss.backward()
        if optimizers[name] is not None:
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for name in CONFIGS:  # warm-up
        step(name, 0)
    # Interleaved at the finest grain: every cycle runs one step of each configuration, so a busy moment on the
    # shared machine hits the configurations of one cycle alike; ratios are taken per cycle (paired), then the median.
    cycles: list[dict[str, float]] = []
    for cycle in range(rounds * steps):
        cycles.append({name: step(name, 1 + cycle % steps) for name in CONFIGS})
    rows = []
    for name in CONFIGS:
        times = [c[name] for c in cycles]
        rows.append({"config": name, "step_s": statistics.median(times), "rounds_s": times,
                     "x_lora": statistics.median(c[name] / c["lora"] for c in cycles),
                     "x_base": statistics.median(c[name] / c["base"] for c in cycles),
                     "trainable": sum(p.numel() for p in trainable(name, adapters))})
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
               "load_average_at_end": os.getloadavg()}
    ratio = statistics.median(c["tl6"] / c["tl6_reference"] for c in cycles)
    return {"machine": machine, "shape": SHAPE, "seq": seq, "batch": 1, "rank": rank, "steps": steps,
            "rounds": rounds, "cycles": len(cycles), "rows": rows, "tl6_x_reference": ratio}


def markdown(report: dict) -> str:
    rows = {row["config"]: row for row in report["rows"]}
    lines = ["# Tied-LoRA step time at SmolLM2-135M's shape (CPU)", "",
             f"Machine: {report['machine']}",
             f"Model: megatron-core GPTModel, local spec, {report['shape']}, random weights; batch 1 x {report['seq']} "
             f"tokens; rank {report['rank']}; forward + backward (+ Adam on the adapter); {report['cycles']} cycles, "
             "each one step of every configuration in turn (after one warm-up step each); step = median over cycles; "
             "x lora / x frozen base = median over cycles of the ratio within the cycle (paired).", "",
             "| config | step (s) | every cycle (s) | x lora | x frozen base | trainable |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['step_s']:.3f} | {' / '.join(f'{t:.3f}' for t in row['rounds_s'])} | "
                     f"{row['x_lora']:.3f} | {row['x_base']:.3f} | {row['trainable']:,} |")
    x_lora, x_ref = rows["tl6"]["x_lora"], report["tl6_x_reference"]
    lines += ["", "Targets (same run, measured, paired medians):",
              f"- tl6 fused <= 1.02 x lora: {x_lora:.3f} -> {'met' if x_lora <= 1.02 else 'MISSED'}",
              f"- tl6 fused <= tl6 reference composition: {x_ref:.3f} -> {'met' if x_ref <= 1.0 else 'MISSED'}",
              "", "The machine is shared (see the load average): differences of a few percent between rows are within "
              "the spread between rounds."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    report = measure(steps=args.steps, rounds=args.rounds, seq=args.seq, rank=args.rank, threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time_cpu.json").write_text(json.dumps(report, indent=2))
    (out / "step_time_cpu.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

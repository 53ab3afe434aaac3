"""Step time and peak memory of a Llama-2 7B layer stack on one GPU: frozen base, lora, tl6 (fused), tl6 (reference
composition).

    python -m benchmarks.gpu_layer_stack [--layers N] [--budget-gb 100] [--cycles 8] [--out DIR]
    python -m benchmarks.gpu_layer_stack --tiny        # a few tiny layers on CPU: the same code path, no GPU

One process, one megatron-core GPTModel at Llama-2 7B's shape (d=4096, 32 heads, MHA, ffn 11008, vocab 32000,
untied embeddings; local layer spec, RMSNorm, SwiGLU, RoPE), random frozen weights in bf16, micro-batch 1 x 4096
tokens, built by ``benchmarks.step_time.build_stack`` (every ``linear_qkv`` wrapped once by ``TiedLoraQKV`` holding
the three adapters at rank 8, in bf16). Without ``--layers`` the stack is as deep as fits in ``--budget-gb`` of
activations and weights: a 1-layer and a 2-layer model are measured first (one step of the heaviest configuration,
tl6 reference), the difference of their peaks is the cost of a layer. Each configuration runs forward + backward +
Adam on its trainable tensors (none for the frozen base; gradients still flow back to the embeddings, so the base
pays the full backward). Configurations are interleaved step by step: ``--warmup`` cycles, then ``--cycles`` timed
cycles of one step each; the step time is the median over cycles (CUDA-synchronized wall clock), the ratios are
medians of the per-cycle ratios; the peak is ``torch.cuda.max_memory_allocated`` over the configuration's steps
(the counter is reset before each step). Targets: tl6 fused <= 1.02 x lora step time, peak <= lora peak + 1%.
Measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.step_time import CONFIGS, build_stack, enable, trainable  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=32, ffn_hidden_size=11008,
                 vocab_size=32000, tied=False)
TINY = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=256, tied=False)
TARGET_TIME = 1.02  # tl6 fused step time <= this x lora's
TARGET_PEAK = 1.01  # tl6 fused peak memory <= this x lora's
GB = 1e9  # memory is reported in GB (10^9 bytes)


class Stack:
    """The model, its adapters, one batch and the step function of every configuration."""

    def __init__(self, *, shape: dict, layers: int, seq: int, rank: int, device: str, dtype) -> None:
        import torch

        self.device = device
        self.model, self.adapters, _ = build_stack(seq=seq, rank=rank, shape=dict(shape, num_layers=layers),
                                                   dtype=dtype, device=device)
        self.model.train()
        # Gradients reach the input embeddings in every configuration: the frozen base runs the full backward too.
        self.model.embedding.word_embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, shape["vocab_size"], (1, seq + 1), generator=generator).to(device)
        self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]  # [b, s]
        self.positions = torch.arange(seq, device=device).unsqueeze(0)
        self.optimizers = {name: torch.optim.Adam(trainable(name, self.adapters), lr=1e-4) if name != "base" else None
                           for name in CONFIGS}

    def _sync(self) -> None:
        import torch

        if self.device != "cpu":
            torch.cuda.synchronize()

    def step(self, name: str, *, update: bool = True) -> dict:
        """One training step of configuration `name`: {'seconds', 'peak' (bytes, None on CPU), 'loss'}; with
        update=False the gradients are left in place (no optimizer step, no zeroing)."""
        import torch

        enable(name, self.adapters)
        on_gpu = self.device != "cpu"
        self._sync()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        loss = self.model(input_ids=self.inputs, position_ids=self.positions, attention_mask=None,
                          labels=self.labels).float().mean()
        loss.backward()
        if update and self.optimizers[name] is not None:
            self.optimizers[name].step()
            self.optimizers[name].zero_grad(set_to_none=True)
        self._sync()
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "loss": float(loss.detach()),
                "peak": torch.cuda.max_memory_allocated() if on_gpu else None}

    def adapter_grads(self) -> dict[str, list[str]]:
        """Which adapter tensors hold a gradient, per configuration ("A", "B", "u", "v" and the layer)."""
        found = {}
        for name, modules in self.adapters.items():
            found[name] = [f"{factor}{index}" for index, (_, module) in enumerate(modules)
                           for factor, tensor in zip("ABuv", module.factors) if tensor.grad is not None]
        return found

    def release(self) -> None:
        import gc

        import torch

        del self.model, self.adapters, self.optimizers
        gc.collect()
        if self.device != "cpu":
            torch.cuda.empty_cache()


def layers_that_fit(*, shape: dict, seq: int, rank: int, budget_bytes: float, dtype) -> dict:
    """Peaks of 1- and 2-layer stacks (one tl6-reference step each, after one warm-up step) -> layers that fit."""
    peaks = {}
    for layers in (1, 2):
        stack = Stack(shape=shape, layers=layers, seq=seq, rank=rank, device="cuda", dtype=dtype)
        stack.step("tl6_reference")
        peaks[layers] = stack.step("tl6_reference")["peak"]
        stack.release()
    per_layer = peaks[2] - peaks[1]
    fixed = peaks[1] - per_layer
    fit = int((budget_bytes - fixed) // per_layer)
    return {"per_layer_gb": per_layer / GB, "fixed_gb": fixed / GB, "layers": max(1, min(shape["num_layers"], fit)),
            "layers_fitting_budget": fit}


def measure(*, shape: dict, layers: int, seq: int, rank: int, cycles: int, warmup: int, device: str,
            sizing: dict | None = None) -> dict:
    import torch

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    stack = Stack(shape=shape, layers=layers, seq=seq, rank=rank, device=device, dtype=dtype)
    for _ in range(warmup):
        for name in CONFIGS:
            stack.step(name)
    runs = [{name: stack.step(name) for name in CONFIGS} for _ in range(cycles)]
    rows = []
    for name in CONFIGS:
        times = [run[name]["seconds"] for run in runs]
        peaks = [run[name]["peak"] for run in runs if run[name]["peak"] is not None]
        rows.append({"config": name, "step_s": statistics.median(times), "cycles_s": times,
                     "x_lora": statistics.median(run[name]["seconds"] / run["lora"]["seconds"] for run in runs),
                     "peak_gb": max(peaks) / GB if peaks else None,
                     "trainable": sum(p.numel() for p in trainable(name, stack.adapters))})
    stack.release()
    by_name = {row["config"]: row for row in rows}
    peak_ratio = (by_name["tl6"]["peak_gb"] / by_name["lora"]["peak_gb"]
                  if by_name["lora"]["peak_gb"] else None)
    machine = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device != "cpu" else "cpu"}
    return {"machine": machine, "shape": dict(shape, num_layers=layers), "sizing": sizing, "seq": seq, "batch": 1,
            "rank": rank, "dtype": str(dtype).replace("torch.", ""), "warmup": warmup, "cycles": cycles,
            "rows": rows, "tl6_x_lora_time": by_name["tl6"]["x_lora"], "tl6_x_lora_peak": peak_ratio,
            "time_target_met": by_name["tl6"]["x_lora"] <= TARGET_TIME,
            "peak_target_met": None if peak_ratio is None else peak_ratio <= TARGET_PEAK}


def markdown(report: dict) -> str:
    shape = report["shape"]
    name = "Llama-2 7B" if shape["hidden_size"] == LLAMA2_7B["hidden_size"] else "tiny (CPU check of the code path)"
    lines = [f"Layer stack, {name}: {shape['num_layers']} layers (d={shape['hidden_size']}, ffn "
             f"{shape['ffn_hidden_size']}, vocab {shape['vocab_size']}), {report['dtype']}, micro-batch 1 x "
             f"{report['seq']} tokens, rank {report['rank']}, megatron-core local spec, on "
             f"{report['machine']['device']}; {report['warmup']} warm-up + {report['cycles']} timed cycles "
             "(interleaved)."]
    if report["sizing"] and "per_layer_gb" in report["sizing"]:
        s = report["sizing"]
        lines.append(f"Layers: as many as fit the budget: {s['per_layer_gb']:.2f} GB per layer + {s['fixed_gb']:.2f} "
                     f"GB fixed (tl6 reference, the heaviest) -> {s['layers_fitting_budget']} fit, "
                     f"{shape['num_layers']} run.")
    if report["sizing"] and report["sizing"].get("retried_after_out_of_memory"):
        lines.append("(Run with a fifth fewer layers than estimated, after an out-of-memory error.)")
    lines += ["", "| config | step (s) | x lora (paired median) | peak allocated (GB) | trainable |",
              "|---|---|---|---|---|"]
    for row in report["rows"]:
        peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.2f}"
        lines.append(f"| {row['config']} | {row['step_s']:.4f} | {row['x_lora']:.3f} | {peak} | {row['trainable']:,} |")
    time_ratio, peak_ratio = report["tl6_x_lora_time"], report["tl6_x_lora_peak"]
    lines += ["", f"- tl6 fused step time <= {TARGET_TIME} x lora: {time_ratio:.3f} -> "
              f"{'met' if report['time_target_met'] else 'MISSED'}"]
    if peak_ratio is not None:
        lines.append(f"- tl6 fused peak <= lora peak + {round(100 * (TARGET_PEAK - 1))}%: {peak_ratio:.4f} -> "
                     f"{'met' if report['peak_target_met'] else 'MISSED'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer tiny stack on CPU (checks the code path)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: as many as fit --budget-gb)")
    parser.add_argument("--budget-gb", type=float, default=100.0, help="memory for weights and activations")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per micro-batch")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank")
    parser.add_argument("--cycles", type=int, default=8, help="timed cycles (one step of each configuration)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up cycles")
    parser.add_argument("--out", default=None, help="folder for gpu_layer_stack.json and .md")
    args = parser.parse_args(argv)
    if args.tiny:
        report = measure(shape=TINY, layers=args.layers or TINY["num_layers"], seq=min(args.seq, 32), rank=4,
                         cycles=min(args.cycles, 2), warmup=1, device="cpu")
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_layer_stack: no CUDA device; run with --tiny for the CPU check of the code path")
        sizing, layers = None, args.layers
        if layers is None:
            sizing = layers_that_fit(shape=LLAMA2_7B, seq=args.seq, rank=args.rank, budget_bytes=args.budget_gb * GB,
                                     dtype=torch.bfloat16)
            layers = sizing["layers"]
        report = None
        try:
            report = measure(shape=LLAMA2_7B, layers=layers, seq=args.seq, rank=args.rank, cycles=args.cycles,
                             warmup=args.warmup, device="cuda", sizing=sizing)
        except torch.cuda.OutOfMemoryError:  # the estimate was off: once more with a fifth fewer layers (below,
            pass                             # once the error and the frames holding the model are gone)
        if report is None:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            layers = max(1, int(0.8 * layers))
            sizing = dict(sizing or {}, retried_after_out_of_memory=True)
            report = measure(shape=LLAMA2_7B, layers=layers, seq=args.seq, rank=args.rank, cycles=args.cycles,
                             warmup=args.warmup, device="cuda", sizing=sizing)
    text = markdown(report)
    if args.out:
        from nemo_tiedlora.core.fileio import atomic_write_bytes

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "gpu_layer_stack.json", json.dumps(report, indent=2).encode())
        atomic_write_bytes(out / "gpu_layer_stack.md", text.encode())
    print(text, flush=True)


if __name__ == "__main__":
    main()

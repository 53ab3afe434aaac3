"""`python -m nemo_tiedlora bench --memory`: what the adapter keeps for backward and what it moves between ranks.

Measured, before (the plain composition `functional.tied_lora_update`, the reference implementation) and after (the
fused functions of `core/autograd.py`), per preset, at real layer shapes (Llama-2 7B, Llama-3 8B, Llama-3 70B; rank 8):

- **Saved bytes per token per layer**: every tensor autograd keeps for the adapter's backward, counted with
  `torch.autograd.graph.saved_tensors_hooks`, beyond the layer input x that the base keeps anyway and beyond the
  parameter-sized tensors (A, B, u, v and vectors derived from them): the difference between two token counts,
  divided by the difference of tokens. `fused` is the one-piece function (TP = 1); `split` is the two halves around
  the tensor-parallel region (TP > 1). The whole-model figure multiplies by the layers and a 4096-token micro-batch.
- **Communication per layer per micro-batch** at the collectives the adapter calls, counted by construction from
  the shapes (`adapter_traffic`): before, x [tokens, d] entered the TP region (TP: backward all-reduce; SP:
  forward all-gather + backward reduce-scatter); after, g = u * (A x) [tokens, r] does. `benchmarks/adapter_traffic.py`
  counts the same collectives in a real gloo run (TP2, TP2+SP) by wrapping megatron's mappings.

No NeMo or Megatron import; results go to `benchmarks/results/bench_memory.{json,md}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nemo_tiedlora.core.config import PRESETS, TiedLoraConfig
from nemo_tiedlora.core.functional import init_factors, qkv_out_width, tied_lora_update
from nemo_tiedlora.core.autograd import fused_tied_lora_update

# name: (hidden size d, attention heads, query groups, layers)
MODEL_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "llama2-7b": (4096, 32, 32, 32),
    "llama3-8b": (4096, 32, 8, 32),
    "llama3-70b": (8192, 64, 8, 80),
}
IMPLS = ("reference", "fused", "split")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _update_fn(impl: str) -> Callable[..., Tensor]:
    if impl == "reference":
        return tied_lora_update
    if impl == "fused":
        return fused_tied_lora_update
    if impl == "split":  # the TP path: the region (identity here) splits the function in two
        return lambda x, a, b, u, v, s: fused_tied_lora_update(x, a, b, u, v, s, region=lambda g: g)
    raise ValueError(f"unknown implementation {impl!r}: expected one of {IMPLS}")


def _saved_bytes(fn: Callable[[], Tensor], excluded: list[Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps while building fn()'s graph, except those of `excluded`."""
    skip = {t.untyped_storage().data_ptr() for t in excluded}
    kept: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = max(kept.get(ptr, 0), tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(kept.values())


def saved_bytes_per_token(
    preset: str, *, hidden_size: int, out_features: int, rank: int = 8, impl: str = "fused",
    dtype: torch.dtype = torch.float32, tokens: tuple[int, int] = (32, 96),
) -> float:
    """Bytes per token that one layer's adapter keeps for backward beyond x (see the module docstring)."""
    cfg = TiedLoraConfig(preset=preset, rank=rank)
    init = init_factors(cfg, in_features=hidden_size, out_features=out_features, layer_index=0)
    factors = [init[name].to(dtype).requires_grad_(cfg.flags.trains(name)) for name in ("A", "B", "u", "v")]
    update = _update_fn(impl)
    measured = []
    for count in tokens:
        x = torch.randn(count, 1, hidden_size, dtype=dtype, requires_grad=True)  # [s, b, d]; the layer's input
        measured.append(_saved_bytes(lambda: update(x, *factors, cfg.scale), [x, *factors]))
    return (measured[1] - measured[0]) / (tokens[1] - tokens[0])


def adapter_traffic(*, tokens: int, hidden_size: int, rank: int, tp: int, sequence_parallel: bool,
                    bytes_per_element: int) -> dict[str, list[dict[str, Any]]]:
    """The collectives the adapter calls per layer per micro-batch, before and after, by construction.

    `elements` is the size of the tensor at the collective (the full [tokens, width] one); `bytes_sent_per_rank` is
    what a ring algorithm sends from each rank: all-reduce 2 (tp-1)/tp, all-gather and reduce-scatter (tp-1)/tp of
    it. TP = 1 moves nothing.
    """
    result: dict[str, list[dict[str, Any]]] = {}
    for phase, width in (("before", hidden_size), ("after", rank)):
        rows = []
        if tp > 1:
            n = tokens * width
            calls = ([("forward", "all-gather", 1), ("backward", "reduce-scatter", 1)] if sequence_parallel
                     else [("backward", "all-reduce", 2)])
            for when, name, factor in calls:
                rows.append({"pass": when, "collective": name, "elements": n, "bytes": n * bytes_per_element,
                             "bytes_sent_per_rank": factor * (tp - 1) * n * bytes_per_element // tp})
        result[phase] = rows
    return result


def memory_report(*, rank: int = 8, tokens: int = 4096) -> dict[str, Any]:
    """Saved bytes (every preset x implementation x shape x dtype) and the communication table."""
    rows = []
    for model, (d, heads, groups, layers) in MODEL_SHAPES.items():
        out = qkv_out_width(d, heads, groups)
        for dtype_name, dtype in DTYPES.items():
            for preset in PRESETS:
                per_token = {impl: saved_bytes_per_token(preset, hidden_size=d, out_features=out, rank=rank,
                                                         impl=impl, dtype=dtype) for impl in IMPLS}
                rows.append({"model": model, "hidden_size": d, "out_features": out, "layers": layers,
                             "dtype": dtype_name, "preset": preset, "bytes_per_token_per_layer": per_token,
                             "model_bytes_per_microbatch": {k: v * tokens * layers for k, v in per_token.items()}})
    comm = []
    for model, (d, _, _, _) in MODEL_SHAPES.items():
        for sp in (False, True):
            for dtype_name, dtype in DTYPES.items():
                traffic = adapter_traffic(tokens=tokens, hidden_size=d, rank=rank, tp=2, sequence_parallel=sp,
                                          bytes_per_element=torch.tensor([], dtype=dtype).element_size())
                comm.append({"model": model, "layout": "TP2+SP" if sp else "TP2", "dtype": dtype_name, **traffic})
    return {"rank": rank, "tokens": tokens, "saved": rows, "comm": comm}


def _targets(report: dict[str, Any]) -> list[str]:
    """Every preset within two r-sized vectors per token of LoRA's reference (2 x r x element size)."""
    lines = []
    for model in MODEL_SHAPES:
        for dtype_name, dtype in DTYPES.items():
            rows = [r for r in report["saved"] if r["model"] == model and r["dtype"] == dtype_name]
            lora = next(r for r in rows if r["preset"] == "lora")["bytes_per_token_per_layer"]["reference"]
            limit = lora + 2 * report["rank"] * torch.tensor([], dtype=dtype).element_size()
            worst = max(max(r["bytes_per_token_per_layer"]["fused"], r["bytes_per_token_per_layer"]["split"])
                        for r in rows)
            lines.append(f"{model} {dtype_name}: every preset, fused and split <= lora + 2r elements "
                         f"({limit:g} B): worst {worst:g} B -> {'met' if worst <= limit else 'MISSED'}")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    r, tokens = report["rank"], report["tokens"]
    lines = [f"# Tied-LoRA activation memory and adapter communication (rank {r})", "",
             "Saved for backward per token per layer, beyond the layer input x (which the base keeps anyway) and "
             "beyond parameter-sized tensors; counted with `torch.autograd.graph.saved_tensors_hooks`. "
             "reference: the plain composition of torch ops (before); fused: the one-piece autograd function "
             "(TP = 1); split: the two halves around the TP region (TP > 1). No dropout (with dropout the fused "
             "functions keep a bool keep-mask: + d bytes per token per layer; the reference keeps the mask and a "
             "dropped copy of x). An earlier count of the same layer at d=4096, made another way, read 96 B higher "
             "on every preset; the differences between presets agree (vera - lora = 3d x 4 B in both).", ""]
    presets = list(PRESETS)
    for model, (d, heads, groups, layers) in MODEL_SHAPES.items():
        for dtype_name in DTYPES:
            rows = {row["preset"]: row for row in report["saved"]
                    if row["model"] == model and row["dtype"] == dtype_name}
            out = next(iter(rows.values()))["out_features"]
            lines += [f"## {model} (d={d}, {heads} heads / {groups} groups, out={out}, {layers} layers), {dtype_name}",
                      "", "| | " + " | ".join(presets) + " |", "|---" * (len(presets) + 1) + "|"]
            for impl in IMPLS:
                lines.append(f"| {impl} B/token/layer | " + " | ".join(
                    f"{rows[p]['bytes_per_token_per_layer'][impl]:,.0f}" for p in presets) + " |")
            for impl in IMPLS:
                lines.append(f"| {impl}: model, {tokens}-token micro-batch (MiB) | " + " | ".join(
                    f"{rows[p]['model_bytes_per_microbatch'][impl] / 2**20:,.1f}" for p in presets) + " |")
            lines.append("")
    lines += ["Targets:"] + [f"- {t}" for t in _targets(report)] + [""]
    lines += [f"## Adapter communication per layer per micro-batch ({tokens} tokens, TP2), by construction", "",
              "elements: the tensor at the collective; bytes sent per rank: a ring algorithm's share. Before: x "
              "[tokens, d] entered the TP region; after: g = u * (A x) [tokens, r].", "",
              "| model | layout | dtype | pass | collective | elements before | elements after | bytes before | "
              "bytes after | sent/rank before | sent/rank after |", "|---" * 11 + "|"]
    for row in report["comm"]:
        for before, after in zip(row["before"], row["after"]):
            lines.append(f"| {row['model']} | {row['layout']} | {row['dtype']} | {before['pass']} | "
                         f"{before['collective']} | {before['elements']:,} | {after['elements']:,} | "
                         f"{before['bytes']:,} | {after['bytes']:,} | {before['bytes_sent_per_rank']:,} | "
                         f"{after['bytes_sent_per_rank']:,} |")
    return "\n".join(lines) + "\n"


def run(*, out: Path = Path("benchmarks/results"), rank: int = 8, tokens: int = 4096) -> dict[str, Any]:
    """Measure, write `bench_memory.json` and `.md` under `out`, return the report."""
    report = memory_report(rank=rank, tokens=tokens)
    report["targets"] = _targets(report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_memory.json").write_text(json.dumps(report, indent=2))
    (out / "bench_memory.md").write_text(to_markdown(report))
    return report

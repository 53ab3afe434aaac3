"""Trainable parameters of every preset for one model shape (``python -m nemo_tiedlora params``).

Computes the report as plain data and formats it; the CLI (:mod:`nemo_tiedlora.apps.cli`) does the I/O.
No NeMo or Megatron import.
"""

from __future__ import annotations

from typing import Any

from nemo_tiedlora.core.config import FACTOR_NAMES, PRESETS, TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.core.functional import lora_parameter_count, parameter_counts, qkv_out_width


def params_report(
    *,
    hidden_size: int,
    num_layers: int,
    rank: int,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    kv_channels: int | None = None,
) -> dict[str, Any]:
    """Per-preset trainable parameters (A, B, u, v, total) and their percentage of LoRA at the same rank.

    Without ``num_attention_heads`` the QKV output width is ``3 * hidden_size`` (multi-head attention);
    GQA needs the heads and ``num_query_groups``. Returns a JSON-able dict.
    """
    configs = {name: TiedLoraConfig(rank=rank, preset=name) for name in PRESETS}
    if num_attention_heads is None:
        if num_query_groups is not None or kv_channels is not None:
            raise TiedLoraConfigError(
                "num_query_groups and kv_channels need num_attention_heads: give --num-attention-heads too"
            )
        out_features = 3 * hidden_size
    else:
        out_features = qkv_out_width(hidden_size, num_attention_heads, num_query_groups, kv_channels)
    shape = {"hidden_size": hidden_size, "num_layers": num_layers, "out_features": out_features}
    configs["lora"].validate_for_model(**shape)
    lora = lora_parameter_count(**shape, rank=rank)
    presets = {}
    for name, cfg in configs.items():
        counts: dict[str, Any] = parameter_counts(cfg, **shape)
        counts["percent_of_lora"] = 100.0 * counts["total"] / lora
        presets[name] = counts
    return {
        **shape,
        "rank": rank,
        "num_attention_heads": num_attention_heads,
        "num_query_groups": num_query_groups,
        "kv_channels": kv_channels,
        "lora_parameters": lora,
        "presets": presets,
    }


def format_params_table(report: dict[str, Any]) -> str:
    """The report as an aligned plain-text table, one row per preset."""
    header = ["preset", *FACTOR_NAMES, "total", "% of LoRA"]
    rows = [
        [name, *(f"{counts[f]:,}" for f in FACTOR_NAMES), f"{counts['total']:,}", f"{counts['percent_of_lora']:.2f}"]
        for name, counts in report["presets"].items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest])

    title = (
        f"Tied-LoRA trainable parameters: hidden size {report['hidden_size']}, {report['num_layers']} layers, "
        f"rank {report['rank']}, QKV out width {report['out_features']}"
    )
    return "\n".join([title, line(header), *(line(row) for row in rows)])

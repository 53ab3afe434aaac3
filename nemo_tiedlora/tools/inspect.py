"""``inspect``: what an adapter archive holds, without NeMo (tools layer; imports the core and the formats only).

Scheme, flags, rank, alpha, seed, the base shape, trainable and stored parameter counts, file and tensor bytes, the
per-layer norms of u_l and v_l, and the tensors holding NaN/Inf (shown, not refused: merge, export and loading
refuse them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_tiedlora.formats.adapter_archive import load_archive
from nemo_tiedlora.core.functional import parameter_counts, stored_parameter_counts
from nemo_tiedlora.formats.adapter_keys import layer_key, layers_of


def inspect_adapter(adapter: Path) -> dict[str, Any]:
    """Scheme, flags, rank, counts, sizes and per-layer norms of u and v of an adapter archive (no NeMo)."""
    archive = load_archive(Path(adapter), finite=False)  # shown as it is; merge, export and loading refuse NaN/Inf
    cfg, shape = archive.config, archive.shape
    sizes = dict(hidden_size=shape["hidden_size"], num_layers=shape["num_layers"], out_features=shape["out_features"])
    raw = sum(t.numel() * t.element_size() for t in archive.tensors.values())
    return {
        "file": str(adapter),
        "scheme": archive.meta.get("scheme"),
        "preset": cfg.preset,
        "flags": {"tied": cfg.flags.tied, "train_a": cfg.flags.train_a, "train_b": cfg.flags.train_b,
                  "train_u": cfg.flags.train_u, "train_v": cfg.flags.train_v},
        "rank": cfg.rank,
        "alpha": cfg.resolved_alpha,
        "seed": cfg.seed,
        "base_shape": shape,
        "trainable_parameters": parameter_counts(cfg, **sizes),
        "stored_parameters": stored_parameter_counts(cfg, **sizes),
        "file_bytes": Path(adapter).stat().st_size,
        "raw_tensor_bytes": raw,
        "non_finite": sorted(k for k, t in archive.tensors.items() if not bool(torch.isfinite(t).all())),
        "layer_norms": {n: {"u": float(archive.tensors[layer_key(n, "u")].norm()),
                            "v": float(archive.tensors[layer_key(n, "v")].norm())} for n in layers_of(archive.tensors)},
    }


def format_inspect(report: dict[str, Any]) -> str:
    """The report of :func:`inspect_adapter` as the CLI prints it."""
    flags = ", ".join(f"{k}={v}" for k, v in report["flags"].items())
    lines = [
        f"{report['file']}: {report['scheme']} preset={report['preset']} rank={report['rank']} "
        f"alpha={report['alpha']} seed={report['seed']}",
        f"  flags: {flags}",
        f"  base shape: {report['base_shape']}",
        "  trainable parameters: " + ", ".join(f"{k}={v:,}" for k, v in report["trainable_parameters"].items()),
        "  stored parameters:    " + ", ".join(f"{k}={v:,}" for k, v in report["stored_parameters"].items()),
        f"  file {report['file_bytes']:,} bytes for {report['raw_tensor_bytes']:,} bytes of tensors",
        "  layer   |u|        |v|",
    ]
    lines += [f"  {n:>5}   {norms['u']:<10.4f} {norms['v']:.4f}" for n, norms in report["layer_norms"].items()]
    if report.get("non_finite"):
        lines.append(f"  NON-FINITE (NaN/Inf) tensors: {report['non_finite']}: merge, export and loading refuse "
                     "this file")
    return "\n".join(lines)

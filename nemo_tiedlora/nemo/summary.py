"""Trainable-parameter accounting of an instantiated Tied-LoRA model (nemo glue layer), logged by rank 0 when
adapters are added."""

from __future__ import annotations

import logging
from typing import Any

import torch

from nemo_tiedlora.core.functional import lora_parameter_count, parameter_counts
from nemo_tiedlora.core.modules import FACTOR_OF_PARAM
from nemo_tiedlora.nemo.find_adapters import iter_layer_adapters, iter_shared_adapters

logger = logging.getLogger("nemo_tiedlora")

FACTORS = ("A", "B", "u", "v")


def _pipeline_sum(value: int) -> int:
    """Sum a per-stage count over the pipeline group (layers are split over stages; each counts its own)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return value
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, group=parallel_state.get_pipeline_model_parallel_group())
    return int(tensor.item())


def instantiated_counts(model: Any) -> dict[str, int]:
    """Trainable elements per factor over the whole model, from the tensors that exist.

    Shared A and B are counted once (every rank and chunk holds a replica); per-layer tensors are counted on the
    stage that owns the layer and summed over the pipeline group. TP ranks hold identical replicas: counted once.
    """
    counts = dict.fromkeys(FACTORS, 0)
    for _, adapter in iter_layer_adapters(model):
        for name, param in adapter.named_parameters(recurse=False):
            if param.requires_grad:
                counts[FACTOR_OF_PARAM[name]] += param.numel()
    counts = {factor: _pipeline_sum(value) for factor, value in counts.items()}
    for shared in list(iter_shared_adapters(model))[:1]:
        for name, param in shared.named_parameters(recurse=False):
            if param.requires_grad:
                counts[FACTOR_OF_PARAM[name]] += param.numel()
    counts["total"] = sum(counts[f] for f in FACTORS)
    return counts


def parameter_table(model: Any, peft_cfg: Any) -> dict[str, Any]:
    """Instantiated and closed-form counts, and the LoRA comparison at the same rank."""
    shape = peft_cfg.shape
    cfg = peft_cfg.tiedlora
    closed = parameter_counts(
        cfg, hidden_size=shape["hidden_size"], num_layers=shape["num_layers"], out_features=shape["out_features"]
    )
    lora = lora_parameter_count(
        hidden_size=shape["hidden_size"],
        num_layers=cfg.num_adapted_layers(shape["num_layers"]),
        out_features=shape["out_features"],
        rank=cfg.rank,
    )
    counts = instantiated_counts(model)
    return {"instantiated": counts, "closed_form": closed, "lora": lora,
            "percent_of_lora": 100.0 * counts["total"] / lora}


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def log_parameter_summary(model: Any, peft_cfg: Any) -> dict[str, Any]:
    """Log (rank 0) trainable parameters per factor, the total and the LoRA comparison; return the table."""
    table = parameter_table(model, peft_cfg)
    counts, closed = table["instantiated"], table["closed_form"]
    if _is_rank0():
        cfg = peft_cfg.tiedlora
        flags = cfg.flags
        lines = [
            f"Tied-LoRA trainable parameters (preset={cfg.preset}, rank={cfg.rank}, alpha={cfg.resolved_alpha}, "
            f"tied={flags.tied}):"
        ]
        for factor in FACTORS:
            lines.append(f"  {factor}: {counts[factor]:>12,d}   (closed form {closed[factor]:,d})")
        lines.append(f"  total: {counts['total']:>8,d}   (closed form {closed['total']:,d})")
        lines.append(f"  LoRA at rank {cfg.rank}: {table['lora']:,d}  ->  {table['percent_of_lora']:.2f}% of LoRA")
        logger.info("\n".join(lines))
        if counts != closed:
            logger.warning("instantiated Tied-LoRA parameters differ from the closed form: %s vs %s", counts, closed)
    return table

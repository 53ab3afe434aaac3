"""Adapter tools on CPU: merge into a base .nemo, export to Hugging Face, inspect (the CLI's implementations).

Merging a distributed-checkpoint base into a distributed-checkpoint output restores the base once (one copy of its
weights in memory), adds s * diag(v_l) B diag(u_l) A to each adapted layer's linear_qkv weight in place, layer by
layer, and saves a standard .nemo through NeMo (loadable at any TP/PP). Legacy per-rank bases (any TP/PP) and legacy
outputs go through nemo_tiedlora.convert (memory-mapped shards, one output rank at a time). Every output is written
to a temporary name and renamed at the end.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_tiedlora.checkpoint import check_base_shape, load_archive
from nemo_tiedlora.errors import TiedLoraCheckpointError

logger = logging.getLogger("nemo_tiedlora")


def base_config(base: Path) -> Any:
    """The model config stored in a base .nemo (reads the archive index and one small member)."""
    base = Path(base)
    try:
        with tarfile.open(base) as tar:
            member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "model_config.yaml")
            return OmegaConf.load(io.StringIO(tar.extractfile(member).read().decode()))
    except (tarfile.TarError, OSError, StopIteration) as error:
        raise TiedLoraCheckpointError(f"{base} is not a readable NeMo .nemo archive ({error!r})") from error


def _restore_base(base: Path, *, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
    from nemo_tiedlora.nemo import setup

    setup()
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    from nemo_tiedlora.demo.base_model import _cpu_trainer

    cfg = base_config(base)
    with open_dict(cfg):
        cfg.tensor_model_parallel_size = tensor_model_parallel_size
        cfg.pipeline_model_parallel_size = pipeline_model_parallel_size
        cfg.use_cpu_initialization = True
        cfg.precision = 32
        cfg.update(_batch_sizes_in_force() or {})  # a second model in this process: megatron's calculator is set
    return MegatronGPTModel.restore_from(str(base), override_config_path=cfg, trainer=_cpu_trainer())


@contextlib.contextmanager
def _main_hidden_from_spawn():
    """While NeMo saves, the process's ``__main__`` is not re-run by spawned helpers.

    megatron-core's distributed-checkpoint writer starts a ``spawn`` ``multiprocessing.Manager()``, whose child
    re-executes the parent's main script (``__main__.__file__`` / ``__spec__``): from a script without an
    ``if __name__ == "__main__"`` guard that re-runs the whole script and the save fails with EOFError. The child
    needs nothing from the main module, so it is hidden from ``multiprocessing.spawn`` for the duration.
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        if "__file__" in saved:
            del main.__file__
        if "__spec__" in saved:
            main.__spec__ = None
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def _save_to(model: Any, out: Path) -> Path:
    """NeMo's save_to into a temporary name beside `out`, renamed at the end (nothing half-written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial.nemo")
    try:
        with _main_hidden_from_spawn():
            model.save_to(str(partial))
        os.replace(partial, out)
    finally:
        Path(partial).unlink(missing_ok=True)
    return out


def merge(*, base: Path, adapter: Path, out: Path, tp: int = 1, pp: int = 1, fmt: str = "dist",
          first_stage_layers: Optional[int] = None, vocab_size: Optional[int] = None,
          overwrite: bool = False) -> Path:
    """W_l' = W_l + (alpha/r) diag(v_l) B diag(u_l) A for every adapted layer; a standard .nemo at `out`.

    `base` may be a distributed-checkpoint or a legacy per-rank .nemo saved at any TP/PP. The output is written in
    `fmt`: 'dist' (loadable at any TP/PP; `tp`/`pp` are recorded in its config) or 'legacy' (one state dict per
    rank of the TP=`tp`, PP=`pp` layout, uneven first stage via `first_stage_layers`).
    """
    from nemo_tiedlora.convert import (
        checkpoint_format,
        layout_for,
        read_base,
        save_with_layout,
        write_dist,
        write_legacy,
    )
    from nemo_tiedlora.export import per_layer_lora
    from nemo_tiedlora.nemo.peft import model_shape

    out = Path(out)
    if fmt not in ("dist", "legacy"):
        raise TiedLoraCheckpointError(f"unknown output format {fmt!r}: choose 'dist' or 'legacy'")
    if out.exists() and not overwrite:
        raise TiedLoraCheckpointError(f"{out} exists: choose another --out or pass --overwrite")
    archive = load_archive(Path(adapter))
    cfg = base_config(base)
    check_base_shape(archive.shape, model_shape(cfg))
    layout = layout_for(cfg, tp, pp, first_stage_layers=first_stage_layers)  # refuse impossible layouts up front
    factors = per_layer_lora(archive.tensors, archive.config)

    def delta(layer_number: int, weight: torch.Tensor) -> torch.Tensor:
        a_l, b_l = factors[layer_number]
        return (b_l.to(torch.float32) @ a_l.to(torch.float32)).to(weight.dtype)

    if checkpoint_format(Path(base)) == "dist" and fmt == "dist":
        # One copy of the base: restore, add in place layer by layer, let NeMo save.
        model = _restore_base(Path(base))
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                if layer.layer_number in factors:
                    weight = layer.self_attention.linear_qkv.weight  # [out, d]
                    weight.add_(delta(layer.layer_number, weight))
        save_with_layout(model, layout, out)
    else:
        source = read_base(Path(base))
        for number in sorted(factors):  # layer by layer: one layer's update in memory at a time
            key = f"model.decoder.layers.{number - 1}.self_attention.linear_qkv.weight"
            weight = source.state[key]
            source.state[key] = weight + delta(number, weight)
        writer = write_dist if fmt == "dist" else write_legacy
        writer(source, out, layout, vocab_size=vocab_size, overwrite=overwrite)
    logger.info("merged %s into %s -> %s (%s, TP%d PP%d)", adapter, base, out, fmt, tp, pp)
    return out


def export_hf_peft(*, adapter: Path, base: Path, out: Path, base_out: Optional[Path] = None,
                   overwrite: bool = False) -> dict[str, Path]:
    """Write the adapter as HF PEFT LoRA to `out`; with `base_out`, also the base as a HF Llama checkpoint."""
    from nemo_tiedlora.export import hf_peft_adapter, nemo_gpt_to_hf_llama, write_hf_model, write_hf_peft
    from nemo_tiedlora.nemo.peft import model_shape

    archive = load_archive(Path(adapter))
    cfg = base_config(base)
    shape = model_shape(cfg)
    check_base_shape(archive.shape, shape)
    written = {}
    config, tensors = hf_peft_adapter(archive.tensors, archive.config, shape)
    written["adapter"] = write_hf_peft(out, config, tensors, overwrite=overwrite)
    if base_out is not None:
        from nemo_tiedlora.convert import read_base

        source = read_base(Path(base))  # either checkpoint format, any TP/PP
        state, llama_cfg = nemo_gpt_to_hf_llama(source.state, source.cfg)
        written["base"] = write_hf_model(base_out, state, llama_cfg, overwrite=overwrite)
    return written


def _loadable_at_tp1(base: Path, workdir: Path) -> Path:
    """`base` itself if NeMo can restore it at TP1/PP1 (a distributed checkpoint, or legacy saved at TP1/PP1);
    otherwise a TP1 legacy copy of it in `workdir` (a legacy archive loads only at the layout it was saved at)."""
    from nemo_tiedlora.convert import checkpoint_format, layout_for, read_base, write_legacy

    cfg = base_config(base)
    if checkpoint_format(base) == "dist" or (int(cfg.get("tensor_model_parallel_size", 1)) == 1
                                             and int(cfg.get("pipeline_model_parallel_size", 1)) == 1):
        return base
    source = read_base(base)
    return write_legacy(source, workdir / "base_tp1.nemo", layout_for(source.cfg, 1, 1))


def _batch_sizes_in_force() -> Optional[dict[str, int]]:
    """Megatron's process-wide micro-batch calculator refuses a second model with other batch sizes: when one is
    set up (a model was built in this process already), build with its sizes (they do not matter for an export)."""
    from megatron.core import num_microbatches_calculator as calculator

    if calculator._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
        return None
    return {"global_batch_size": calculator.get_current_global_batch_size(),
            "micro_batch_size": calculator.get_micro_batch_size()}


def export_nemo_lora(*, adapter: Path, base: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the adapter as NeMo's own ``lora`` PEFT .nemo (TP1/PP1), written by NeMo itself.

    Per layer l: ``linear_in = diag(u_l) A`` [r, d] and ``linear_out = diag(v_l) B`` [out, r] of NeMo's
    ``lora_kqv_adapter`` (Megatron's fused QKV order, as the base), with the same rank and alpha (NeMo scales by
    alpha/r), on the same layers (``layer_selection``). NeMo loads it with ``model.peft.peft_scheme=lora``
    ``model.peft.restore_from_path=<out>`` (any NeMo script: megatron_gpt_generate.py, ...).
    """
    from nemo_tiedlora.export import per_layer_lora
    from nemo_tiedlora.nemo.finetune import build, tuning_config
    from nemo_tiedlora.nemo.peft import model_shape

    out = Path(out)
    if out.exists() and not overwrite:
        raise TiedLoraCheckpointError(f"{out} exists: choose another --out or pass --overwrite")
    archive = load_archive(Path(adapter))
    check_base_shape(archive.shape, model_shape(base_config(base)))
    tcfg = archive.config
    factors = per_layer_lora(archive.tensors, tcfg)
    num_layers = int(archive.shape["num_layers"])
    cfg = tuning_config("finetuning")
    with open_dict(cfg):
        cfg.trainer.update(accelerator="cpu", devices=1, num_nodes=1, logger=False, enable_checkpointing=False)
        cfg.exp_manager = None
        cfg.model.update(restore_from_path=str(base), tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        cfg.model.update(_batch_sizes_in_force() or {})
        for split in cfg.model.data.values():  # no data: nothing is trained or evaluated here
            if isinstance(split, DictConfig) and OmegaConf.is_missing(split, "file_names"):
                split.file_names = []
        cfg.model.peft.peft_scheme = "lora"
        cfg.model.peft.restore_from_path = None
        lora = cfg.model.peft.lora_tuning
        lora.update(variant="nemo", target_modules=["attention_qkv"], adapter_dim=int(tcfg.rank),
                    alpha=float(tcfg.resolved_alpha), adapter_dropout=0.0, weight_tying=False)
        lora.layer_selection = None if sorted(factors) == list(range(1, num_layers + 1)) else sorted(factors)
    out.parent.mkdir(parents=True, exist_ok=True)
    # NeMo reads the tokenizer from the restored archive when it saves: the TP1 copy (if any) lives until then.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        with open_dict(cfg):
            cfg.model.restore_from_path = str(_loadable_at_tp1(Path(base), Path(tmp)))
        _, model, _, _ = build(cfg)
        scale = float(tcfg.scale)
        written = set()
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                number = layer.layer_number
                if number not in factors:
                    continue
                lora_module = layer.self_attention.get_adapter_module("lora_kqv_adapter")
                a_l, b_l = factors[number]
                lora_module.linear_in.weight.copy_(a_l.to(torch.float32))
                lora_module.linear_out.weight.copy_(b_l.to(torch.float32) / scale)  # NeMo applies alpha/r itself
                written.add(number)
        if written != set(factors):
            missing = sorted(set(factors) - written)
            raise TiedLoraCheckpointError(f"NeMo's LoRA model has no adapter on layers {missing}")
        model.setup_complete = True  # NeMo's PEFT state: the adapter weights only, in NeMo's per-rank format
        return _save_to(model, out)


def inspect_adapter(adapter: Path) -> dict[str, Any]:
    """Scheme, flags, rank, counts, sizes and per-layer norms of u and v of an adapter archive (no NeMo)."""
    from nemo_tiedlora.functional import parameter_counts, stored_parameter_counts

    archive = load_archive(Path(adapter), finite=False)  # shown as it is; merge, export and loading refuse NaN/Inf
    cfg, shape = archive.config, archive.shape
    sizes = dict(hidden_size=shape["hidden_size"], num_layers=shape["num_layers"], out_features=shape["out_features"])
    raw = sum(t.numel() * t.element_size() for t in archive.tensors.values())
    layers = sorted({int(k.split(".")[1]) for k in archive.tensors if k.startswith("layers.")})
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
        "layer_norms": {n: {"u": float(archive.tensors[f"layers.{n}.u"].norm()),
                            "v": float(archive.tensors[f"layers.{n}.v"].norm())} for n in layers},
    }


def format_inspect(report: dict[str, Any]) -> str:
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
        lines.append(f"  NON-FINITE (NaN/Inf) tensors: {report['non_finite']}: merge, export and loading refuse this file")
    return "\n".join(lines)

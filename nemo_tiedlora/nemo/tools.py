"""Adapter tools on CPU: merge into a base .nemo, export to Hugging Face, inspect (the CLI's implementations).

Merging restores the base once (one copy of its weights in memory), adds s * diag(v_l) B diag(u_l) A to each
adapted layer's linear_qkv weight in place, layer by layer, and saves a standard .nemo through NeMo (distributed
checkpoint format: loadable at any TP/PP). The output is written to a temporary name and renamed at the end.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf, open_dict

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
    return MegatronGPTModel.restore_from(str(base), override_config_path=cfg, trainer=_cpu_trainer())


def merge(*, base: Path, adapter: Path, out: Path, tp: int = 1, pp: int = 1, overwrite: bool = False) -> Path:
    """W_l' = W_l + (alpha/r) diag(v_l) B diag(u_l) A for every adapted layer; a standard .nemo at `out`."""
    from nemo_tiedlora.export import per_layer_lora
    from nemo_tiedlora.nemo.peft import model_shape

    out = Path(out)
    if out.exists() and not overwrite:
        raise TiedLoraCheckpointError(f"{out} exists: choose another --out or pass --overwrite")
    archive = load_archive(Path(adapter))
    check_base_shape(archive.shape, model_shape(base_config(base)))
    model = _restore_base(Path(base))
    factors = per_layer_lora(archive.tensors, archive.config)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            if layer.layer_number in factors:
                a_l, b_l = factors[layer.layer_number]
                weight = layer.self_attention.linear_qkv.weight  # [out, d]
                weight.add_((b_l.to(torch.float32) @ a_l.to(torch.float32)).to(weight.dtype))
    with open_dict(model.cfg):
        model.cfg.tensor_model_parallel_size = tp
        model.cfg.pipeline_model_parallel_size = pp
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial.nemo")
    try:
        model.save_to(str(partial))
        os.replace(partial, out)
    finally:
        Path(partial).unlink(missing_ok=True)
    logger.info("merged %s into %s -> %s", adapter, base, out)
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
        model = _restore_base(Path(base))
        state, llama_cfg = nemo_gpt_to_hf_llama(model.model.state_dict(), model.cfg)
        written["base"] = write_hf_model(base_out, state, llama_cfg, overwrite=overwrite)
    return written


def inspect_adapter(adapter: Path) -> dict[str, Any]:
    """Scheme, flags, rank, counts, sizes and per-layer norms of u and v of an adapter archive (no NeMo)."""
    from nemo_tiedlora.functional import parameter_counts, stored_parameter_counts

    archive = load_archive(Path(adapter))
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
    return "\n".join(lines)

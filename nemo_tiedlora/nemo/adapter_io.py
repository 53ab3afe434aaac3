"""NeMo's save/load flows for Tied-LoRA adapters, in the TP/PP-independent archive of `nemo_tiedlora.checkpoint`.

`install()` routes, for models that carry Tied-LoRA adapters, `model.save_to(path)` (what exp_manager calls to
write the adapter .nemo) to `save_adapter`, and `model.load_adapters(path)` (the finetuning and generation scripts'
`model.peft.restore_from_path`) to `load_adapter` when `path` is such an archive. Other schemes are untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin
from omegaconf import OmegaConf

from nemo_tiedlora.checkpoint import check_base_shape, is_tiedlora_archive, load_archive, save_archive
from nemo_tiedlora.merge import layer_key
from nemo_tiedlora.modules import PARAM_NAMES

logger = logging.getLogger("nemo_tiedlora")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_adapter(model: Any, path: str | Path, *, overwrite: bool = True) -> Path:
    """Gather the adapter state from all ranks (collective) and write the archive on global rank 0."""
    from nemo_tiedlora.nemo.peft import model_shape
    from nemo_tiedlora.nemo.state import gather_adapter_state

    peft_cfg = model._tiedlora_peft_cfg
    tensors = gather_adapter_state(model)
    path = Path(path)
    if _rank() == 0:
        save_archive(
            path,
            config=peft_cfg.tiedlora,
            shape=model_shape(model.cfg),
            tensors=tensors,
            model_config_yaml=OmegaConf.to_yaml(model.cfg),
            overwrite=overwrite,
        )
        logger.info("saved Tied-LoRA adapter (%d tensors) to %s", len(tensors), path)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_adapter(model: Any, path: str | Path) -> None:
    """Add the archive's adapter to `model` (any TP/PP) and load its tensors into this rank's replicas."""
    from nemo_tiedlora.nemo.peft import (
        TiedLoraPEFTConfig,
        iter_layer_adapters,
        iter_shared_adapters,
        model_shape,
    )

    archive = load_archive(Path(path))
    check_base_shape(archive.shape, model_shape(model.cfg))
    if getattr(model, "_tiedlora_peft_cfg", None) is None:
        model.add_adapter(TiedLoraPEFTConfig(model.cfg, tiedlora=archive.config))
    elif model._tiedlora_peft_cfg.tiedlora != archive.config:
        raise RuntimeError(f"the model already carries a different Tied-LoRA adapter than {path}")
    with torch.no_grad():
        for shared in iter_shared_adapters(model):
            for factor in ("A", "B"):
                getattr(shared, PARAM_NAMES[factor]).copy_(archive.tensors[factor])
        for number, adapter in iter_layer_adapters(model):
            for name, param in adapter.named_parameters(recurse=False):
                factor = next(f for f, n in PARAM_NAMES.items() if n == name)
                param.copy_(archive.tensors[layer_key(number, factor)])
    logger.info("loaded Tied-LoRA adapter %s (%s, rank %d)", path, archive.config.preset, archive.config.rank)


def adapter_model_config(path: str | Path) -> Optional[Any]:
    """The NeMo model config stored in an adapter archive (None if it has none)."""
    archive = load_archive(Path(path))
    return OmegaConf.create(archive.model_config_yaml) if archive.model_config_yaml else None


_ORIGINAL_LOAD_ADAPTERS = NLPAdapterModelMixin.load_adapters


def _load_adapters(self, filepath: str, peft_cfgs: Any = None, map_location: Optional[str] = None):
    if str(filepath).endswith(".nemo") and is_tiedlora_archive(Path(filepath)):
        return load_adapter(self, filepath)
    return _ORIGINAL_LOAD_ADAPTERS(self, filepath, peft_cfgs, map_location)


def _save_to(self, save_path: str):
    if getattr(self, "_tiedlora_peft_cfg", None) is not None and getattr(self, "use_peft", False):
        return save_adapter(self, save_path)
    return super(NLPAdapterModelMixin, self).save_to(save_path)


def install() -> None:
    """Route NeMo's adapter save/load to the archive for Tied-LoRA models (idempotent)."""
    if NLPAdapterModelMixin.load_adapters is not _load_adapters:
        NLPAdapterModelMixin.load_adapters = _load_adapters
    if getattr(NLPAdapterModelMixin, "save_to", None) is not _save_to:
        NLPAdapterModelMixin.save_to = _save_to

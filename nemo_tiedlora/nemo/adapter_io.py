"""NeMo's save/load flows for Tied-LoRA adapters (nemo glue layer), in the TP/PP-independent archive of
`nemo_tiedlora.formats.adapter_archive`.

For models that carry Tied-LoRA adapters, `model.save_to(path)` (what exp_manager calls to write the adapter .nemo)
goes to `save_adapter`, and `model.load_adapters(path)` (the finetuning and generation scripts'
`model.peft.restore_from_path`) to `load_adapter` when `path` is such an archive. Other schemes are untouched. The
two replacements are installed through `nemo_tiedlora.nemo.compat` (entries `tiedlora-load-adapters`,
`tiedlora-save-to`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from nemo.collections.nlp.parts.mixins.nlp_adapter_mixins import NLPAdapterModelMixin
from omegaconf import OmegaConf

from nemo_tiedlora.formats.adapter_archive import check_base_shape, is_tiedlora_archive, load_archive, save_archive
from nemo_tiedlora.core.errors import TiedLoraCheckpointError
from nemo_tiedlora.formats.adapter_keys import layer_key
from nemo_tiedlora.core.modules import PARAM_NAMES
from nemo_tiedlora.nemo.compat.patch import replace
from nemo_tiedlora.nemo.peft import TiedLoraPEFTConfig
from nemo_tiedlora.nemo.adapter_state import gather_adapter_state
from nemo_tiedlora.nemo.find_adapters import iter_layer_adapters, iter_shared_adapters
from nemo_tiedlora.core.model_shape import model_shape

logger = logging.getLogger("nemo_tiedlora")

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_adapter(model: Any, path: str | Path, *, overwrite: bool = True) -> Path:
    """Gather the adapter state from all ranks (collective) and write the archive on global rank 0."""
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
    archive = load_archive(Path(path))
    check_base_shape(archive.shape, model_shape(model.cfg))
    if getattr(model, "_tiedlora_peft_cfg", None) is None:
        model.add_adapter(TiedLoraPEFTConfig(model.cfg, tiedlora=archive.config))
    elif model._tiedlora_peft_cfg.tiedlora != archive.config:
        raise TiedLoraCheckpointError(
            f"the model already carries a different Tied-LoRA adapter than {path}: load it into a model without "
            "one (a fresh restore of the base)"
        )
    with torch.no_grad():
        for shared in iter_shared_adapters(model):
            for factor in ("A", "B"):
                getattr(shared, PARAM_NAMES[factor]).copy_(archive.tensors[factor])
        for number, adapter in iter_layer_adapters(model):
            for name, param in adapter.named_parameters(recurse=False):
                factor = next(f for f, n in PARAM_NAMES.items() if n == name)
                param.copy_(archive.tensors[layer_key(number, factor)])
    logger.info("loaded Tied-LoRA adapter %s (%s, rank %d)", path, archive.config.preset, archive.config.rank)


def wrap_load_adapters(original: Callable) -> Callable:
    """NLPAdapterModelMixin.load_adapters that reads a Tied-LoRA archive itself (any other file: NeMo's)."""
    def load_adapters(self, filepath: str, peft_cfgs: Any = None, map_location: Optional[str] = None):
        if str(filepath).endswith(".nemo") and is_tiedlora_archive(Path(filepath)):
            return load_adapter(self, filepath)  # not NeMo's: it reads per-rank adapter state, not this archive
        return original(self, filepath, peft_cfgs, map_location)

    return load_adapters


def wrap_save_to(original: Callable) -> Callable:
    """save_to (what the mixin's class inherits, ModelPT's) that writes the archive for a Tied-LoRA PEFT model."""
    def save_to(self, save_path: str):
        if getattr(self, "_tiedlora_peft_cfg", None) is not None and getattr(self, "use_peft", False):
            return save_adapter(self, save_path)  # not NeMo's: it writes per-rank state, not the archive
        return original(self, save_path)

    return save_to


def install_load_adapters() -> None:
    """Route NLPAdapterModelMixin.load_adapters to `load_adapter` for Tied-LoRA archives (idempotent)."""
    replace(NLPAdapterModelMixin, "load_adapters", wrap_load_adapters)


def install_save_to() -> None:
    """Give NLPAdapterModelMixin a save_to that writes the archive for Tied-LoRA models (idempotent)."""
    replace(NLPAdapterModelMixin, "save_to", wrap_save_to)

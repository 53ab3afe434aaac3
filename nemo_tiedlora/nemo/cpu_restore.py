"""NeMo restores and saves a base GPT model on CPU in this process (nemo glue layer: imports NeMo lazily).

:func:`restore_base` restores a `.nemo` (either kind, ``nemo.base_archive``) with its own one-device CPU trainer,
in fp32, fitting megatron's process-wide batch-size calculator when a model was built here before;
:func:`save_to` / :func:`save_with_layout` save through NeMo into a temporary name renamed at the end;
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_tiedlora.core.fileio import atomic_output
from nemo_tiedlora.formats.reshard import Layout, layout_settings


def cpu_trainer() -> Any:
    """A one-device CPU Lightning trainer (gloo, fp32, no logger or checkpoints) to build or restore a model with."""
    import nemo.collections.nlp.parts.nlp_overrides as nlp_overrides
    from lightning.pytorch import Trainer

    strategy = nlp_overrides.NLPDDPStrategy(
        process_group_backend="gloo", find_unused_parameters=False, no_ddp_communication_hook=True
    )
    return Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        precision=32,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def batch_sizes_in_force() -> Optional[dict[str, int]]:
    """Megatron's process-wide micro-batch calculator refuses a second model with other batch sizes: when one is
    set up (a model was built in this process already), build with its sizes (they do not matter for a tool)."""
    from megatron.core import num_microbatches_calculator as calculator

    if calculator._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
        return None
    return {"global_batch_size": calculator.get_current_global_batch_size(),
            "micro_batch_size": calculator.get_micro_batch_size()}


def restore_base(base: Path, *, cfg: Optional[DictConfig] = None, tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1) -> Any:
    """NeMo's MegatronGPTModel of the base `.nemo` at `base`, restored on CPU in fp32 (`cfg`: its config if read)."""
    from nemo_tiedlora.nemo import setup

    setup()
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    if cfg is None:
        from nemo_tiedlora.nemo.base_archive import base_config  # the archive reader restores through this module

        cfg = base_config(base)
    else:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.tensor_model_parallel_size = tensor_model_parallel_size
        cfg.pipeline_model_parallel_size = pipeline_model_parallel_size
        cfg.use_cpu_initialization = True
        cfg.precision = 32
        cfg.update(batch_sizes_in_force() or {})  # a second model in this process: megatron's calculator is set
    return MegatronGPTModel.restore_from(str(base), override_config_path=cfg, trainer=cpu_trainer())


@contextlib.contextmanager
def _main_hidden_from_spawn() -> Iterator[None]:
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


def save_to(model: Any, out: Path) -> Path:
    """NeMo's save_to of `model` into a temporary name beside `out`, renamed at the end (nothing half-written)."""
    out = Path(out)
    with atomic_output(out, suffix=".partial.nemo") as partial, _main_hidden_from_spawn():
        model.save_to(str(partial))
    return out


def save_with_layout(model: Any, layout: Layout, out: Path) -> Path:
    """NeMo's save_to of a restored model with `layout` (TP, PP, uneven stages) recorded in its config; the
    distributed checkpoint it writes loads at any TP/PP."""
    with open_dict(model.cfg):
        model.cfg.update(layout_settings(layout))
    return save_to(model, Path(out))

"""What NeMo's tuning scripts do, for any PEFT scheme (tiedlora included): the scripts only call these.

`finetune(cfg)`: trainer -> exp_manager -> restore the base .nemo -> add (or load) adapters -> fit -> adapter .nemo.
`evaluate(cfg)`: restore the base -> load the adapter .nemo -> generate on the test set (trainer.test).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

logger = logging.getLogger("nemo_tiedlora")


# the entry scripts' YAML (package data)
TUNING_CONF = Path(__file__).resolve().parents[1] / "apps" / "entry_scripts" / "conf"


def tuning_config(name: str = "finetuning") -> DictConfig:
    """A fresh copy of the YAML an entry script runs with
    (``nemo_tiedlora/apps/entry_scripts/conf/megatron_gpt_<name>_config.yaml``: ``finetuning``, ``generate``,
    ``tiedlora_merge``), for code that runs those steps in-process."""
    path = TUNING_CONF / f"megatron_gpt_{name}_config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the package's data files are missing; reinstall nemo_tiedlora")
    return OmegaConf.load(path)


def _prepare(cfg: DictConfig, *, training: bool = False) -> None:
    """Checks of the inputs (before any relaunch or process group: nemo.preflight); fixes and registration; then
    settings a CPU run needs (NeMo's defaults assume CUDA + apex)."""
    from nemo_tiedlora.nemo import compat, setup
    from nemo_tiedlora.nemo.launch import relaunch_under_torchrun_if_needed
    from nemo_tiedlora.nemo.optimizer_paths import check_optimizer_path
    from nemo_tiedlora.nemo.preflight import check_before_launch, remove_unfinished_checkpoints

    check_before_launch(cfg, training=training)
    check_optimizer_path(cfg, training=training)  # on the user's config, before the CPU rewrites below
    if training:
        remove_unfinished_checkpoints(cfg)
    relaunch_under_torchrun_if_needed(cfg.trainer)
    setup()
    if cfg.model.get("optim", {}).get("name") == "mcore_distributed_optim":
        compat.apply(on_demand=("cpu-distributed-optimizer-type-checks",))
    if cfg.trainer.get("accelerator") != "cpu":
        return
    with open_dict(cfg):
        bf16_o2 = bool(cfg.model.get("megatron_amp_O2", False)) and str(cfg.trainer.get("precision")) in (
            "bf16", "bf16-mixed")
        if not bf16_o2:  # no autocast mixed precision on CPU; O2's bf16 model copy (VPP needs O2) works
            cfg.trainer.precision = 32
        cfg.model.use_cpu_initialization = True
        if cfg.model.get("optim") is not None and cfg.model.optim.get("name") == "fused_adam":
            cfg.model.optim.name = "adam"  # fused_adam is apex/CUDA only
        for split in ("train_ds", "validation_ds", "test_ds"):
            ds = cfg.model.get("data", {}).get(split)
            if ds is not None:
                ds.pin_memory = False


def _build_trainer(cfg: DictConfig, callbacks: Optional[list] = None):
    from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronLMPPTrainerBuilder

    from nemo_tiedlora.nemo import cluster

    trainer = MegatronLMPPTrainerBuilder(cfg).create_trainer(callbacks=callbacks)
    cluster.remember(trainer)  # the process groups are created from the launcher's world the trainer saw
    return trainer


def _peft_config_class(scheme: str):
    from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP

    if scheme not in PEFT_CONFIG_MAP:
        from nemo_tiedlora.core.errors import TiedLoraConfigError

        known = sorted(str(k) for k in PEFT_CONFIG_MAP if k is not None)
        raise TiedLoraConfigError(f"unknown model.peft.peft_scheme={scheme!r}: choose one of {known}")
    return PEFT_CONFIG_MAP[scheme]


def build(cfg: DictConfig, *, callbacks: Optional[list] = None) -> tuple[Any, Any, Any, Any]:
    """trainer, SFT model restored from the base .nemo with adapters added (or loaded), PEFT config, log dir."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel
    from nemo.utils.exp_manager import exp_manager

    _prepare(cfg, training=True)
    trainer = _build_trainer(cfg, callbacks)
    log_dir = exp_manager(trainer, cfg.get("exp_manager", None))
    model_cfg = MegatronGPTSFTModel.merge_cfg_with(cfg.model.restore_from_path, cfg)
    peft_cls = _peft_config_class(cfg.model.peft.peft_scheme)
    # The PEFT config validates before the (slow) restore: bad input fails in seconds, not minutes.
    peft_cfg = peft_cls(model_cfg) if peft_cls is not None else None
    model = MegatronGPTSFTModel.restore_from(cfg.model.restore_from_path, model_cfg, trainer=trainer)
    if cfg.model.peft.get("restore_from_path"):
        model.load_adapters(cfg.model.peft.restore_from_path, peft_cfg)
    elif peft_cfg is not None:
        model.add_adapter(peft_cfg)
    return trainer, model, peft_cfg, log_dir


def finetune(cfg: DictConfig, *, callbacks: Optional[list] = None) -> Optional[Path]:
    """Run NeMo PEFT fine-tuning from a hydra config; return the adapter .nemo written at the end (rank 0)."""
    ended = _TrainEndSeen.make()
    trainer, model, _, log_dir = build(cfg, callbacks=[*(callbacks or []), ended])
    if getattr(trainer, "ckpt_path", None):  # exp_manager found a checkpoint (exp_manager.resume_if_exists=True)
        logger.info("resuming from %s: adapter, optimizer and LR-scheduler state", trainer.ckpt_path)
    trainer.fit(model)
    if not ended.seen and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        _finish_completed_run(trainer, model)
    return _final_nemo(log_dir)


class _TrainEndSeen:
    """A Lightning callback that records whether on_train_end ran."""

    @staticmethod
    def make():
        from lightning.pytorch import Callback

        class TrainEndSeen(Callback):
            seen = False

            def on_train_end(self, trainer, pl_module) -> None:
                self.seen = True

        return TrainEndSeen()


def _finish_completed_run(trainer: Any, model: Any) -> None:
    """A run resumed from its final checkpoint (killed after it, e.g. while the adapter .nemo was written): Lightning
    skips the whole fit loop, on_train_end included, so NeMo's checkpoint callback never writes the end-of-training
    adapter .nemo. Run that end here (restore the best checkpoint if asked, save the .nemo)."""
    from nemo.utils.callbacks import NeMoModelCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, NeMoModelCheckpoint):
            logger.info("the resumed run was already complete (step %d): writing its end-of-training files",
                        trainer.global_step)
            callback.on_train_end(trainer, model)


def _final_nemo(log_dir: Any) -> Optional[Path]:
    """The .nemo exp_manager saves at the end of training (save_nemo_on_train_end), if any."""
    if log_dir is None:
        return None
    checkpoints = Path(log_dir) / "checkpoints"
    candidates = sorted(checkpoints.glob("*.nemo"), key=os.path.getmtime) if checkpoints.is_dir() else []
    return candidates[-1] if candidates else None


def load_for_inference(cfg: DictConfig) -> tuple[Any, Any]:
    """trainer and frozen SFT model: the base .nemo (model.restore_from_path) with the adapter .nemo
    (model.peft.restore_from_path, if any) loaded, as NeMo's megatron_gpt_generate.py builds them."""
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel

    from nemo_tiedlora.formats.adapter_archive import is_tiedlora_archive
    from nemo_tiedlora.formats.bank_entry import is_adapter_set

    _prepare(cfg)
    trainer = _build_trainer(cfg)
    adapter = cfg.model.peft.get("restore_from_path")
    several = is_adapter_set(adapter)
    # A Tied-LoRA archive is TP/PP-independent: take the inference config from the base (NeMo would insist that the
    # adapter's training TP/PP equal the evaluation's).
    tiedlora = bool(adapter) and (several or is_tiedlora_archive(Path(adapter)))
    config_source = cfg.model.restore_from_path if (tiedlora or not adapter) else adapter
    model_cfg = MegatronGPTSFTModel.merge_inference_cfg(config_source, cfg)
    model = MegatronGPTSFTModel.restore_from(cfg.model.restore_from_path, model_cfg, trainer=trainer)
    if several:
        _load_adapter_bank(model, adapter)
    elif adapter:
        model.load_adapters(adapter)
    model.freeze()
    return trainer, model


def _load_adapter_bank(model: Any, adapters: Any) -> None:
    """Several adapters (a folder of adapter .nemo files or a list of them): all resident in one bank, each test
    item generated with the adapter its ``adapter`` field names (none: the base)."""
    from nemo_tiedlora.core.model_shape import model_shape
    from nemo_tiedlora.formats.bank_entry import adapter_files, load_bank
    from nemo_tiedlora.nemo.bank_qkv import attach_bank, select_from_metadata

    bank = load_bank(adapter_files(adapters), model_shape(model.cfg))
    select_from_metadata(model, attach_bank(model, bank))
    logger.info("%d adapters resident (%.1f MB): %s", len(bank), bank.adapter_bytes() / 1e6,
                ", ".join(bank.names[:10]) + (" ..." if len(bank) > 10 else ""))


def evaluate(cfg: DictConfig) -> Any:
    """Generate with a base .nemo (+ adapter .nemo) on model.data.test_ds, as NeMo's megatron_gpt_generate.py."""
    trainer, model = load_for_inference(cfg)
    with open_dict(cfg):
        if not cfg.model.get("use_flash_attention", False):
            cfg.inference.compute_attention_mask = True
    model.set_inference_config(OmegaConf.to_container(cfg.inference, resolve=True))
    return trainer.test(model)

"""Checks an entry script runs before it launches more processes or builds anything.

`check_before_launch(cfg)` reads only small files: the base `.nemo`'s index and `model_config.yaml`, the adapter
archive named by `model.peft.restore_from_path`, and (for training) the JSONL files. It refuses, each with one
`TiedLoraConfigError` / `TiedLoraCheckpointError` / `TiedLoraDataError` naming the file and the cause:
- a base or adapter path that is missing, not a tar archive, or truncated;
- a TP/PP layout the base cannot run (checked here, before the torchrun relaunch and before any process group);
- processes started by SLURM or torchrun that do not match trainer.num_nodes x trainer.devices
  (`nemo_tiedlora.nemo.cluster.check_launch`);
- bad training / validation data (`nemo_tiedlora.formats.sft_jsonl`).
"""

from __future__ import annotations

import glob
import io
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from nemo_tiedlora.formats.adapter_archive import tar_error_text
from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError

logger = logging.getLogger("nemo_tiedlora")

MODEL_CONFIG = "model_config.yaml"


def check_before_launch(cfg: DictConfig, *, training: bool) -> None:
    """Refuse a bad base, adapter, layout, launch or (training) data before anything is launched or built."""
    from nemo_tiedlora.nemo.cluster import check_launch, share_run_folder

    check_launch(cfg.trainer)
    share_run_folder(cfg.get("exp_manager"))
    base = cfg.model.get("restore_from_path")
    base_cfg = read_model_config(Path(base), what="model.restore_from_path") if base else None
    if base_cfg is not None and cfg.model.get("peft", {}).get("peft_scheme") == "tiedlora":
        from nemo_tiedlora.nemo.peft import check_parallel_layout
        from nemo_tiedlora.core.model_shape import model_shape

        check_parallel_layout(cfg.model, model_shape(base_cfg))
    adapter = cfg.model.get("peft", {}).get("restore_from_path")
    from nemo_tiedlora.formats.bank_entry import is_adapter_set

    if is_adapter_set(adapter):
        _check_adapter_set(adapter, training=training)
    elif adapter:
        check_archive(Path(adapter), what="model.peft.restore_from_path")
    if training:
        check_training_data(cfg, base=Path(base) if base else None, base_cfg=base_cfg)


def _check_adapter_set(adapters: Any, *, training: bool) -> None:
    """Several adapters (a folder of adapter .nemo files, or a list): generation only, each a complete archive."""
    from nemo_tiedlora.formats.bank_entry import adapter_files

    if training:
        raise TiedLoraConfigError(
            "model.peft.restore_from_path names several adapters: training resumes one adapter; give one .nemo file")
    for path in adapter_files(adapters).values():
        check_archive(path, what="model.peft.restore_from_path")


UNFINISHED = "-unfinished"  # NeMo's marker next to a checkpoint being written (nemo_model_checkpoint.py)


def remove_unfinished_checkpoints(cfg: DictConfig) -> list[Path]:
    """With exp_manager.resume_if_exists, delete the checkpoints a killed save left unfinished (and their markers).

    NeMo deletes them itself, but only in its checkpoint callback's setup, inside `fit`; its exp_manager looks for
    the checkpoint to resume from before that and refuses to start ("Last checkpoint is unfinished and cannot be used
    to resume the training") when the only `-last` checkpoint is one a kill cut short (a kill during the first
    save). Deleted here first, the run resumes from the newest complete checkpoint, or starts afresh if there is
    none, as `resume_ignore_no_checkpoint` asks. Safe on every rank at once (missing files are skipped)."""
    manager = cfg.get("exp_manager") or {}
    folder = _checkpoint_dir(cfg, manager)
    if not manager.get("resume_if_exists") or folder is None or not folder.is_dir():
        return []
    removed = []
    for marker in folder.glob(f"*{UNFINISHED}"):
        stem = marker.name[: -len(UNFINISHED)]
        for path in [*folder.rglob(f"{glob.escape(stem)}.ckpt"), *folder.rglob(f"{glob.escape(stem)}-EMA.ckpt")]:
            path.unlink(missing_ok=True)
            removed.append(path)
        if (folder / stem).is_dir():  # a distributed checkpoint is a folder
            shutil.rmtree(folder / stem, ignore_errors=True)
            removed.append(folder / stem)
        marker.unlink(missing_ok=True)
    if removed:
        logger.warning("removed checkpoints a killed save left unfinished (resume_if_exists): %s",
                       ", ".join(str(p) for p in removed))
    return removed


def _checkpoint_dir(cfg: DictConfig, manager: Any) -> Optional[Path]:
    """Where exp_manager keeps the checkpoints of a resumable run (no version folder with resume_if_exists)."""
    params = manager.get("checkpoint_callback_params") or {}
    if params.get("dirpath"):
        return Path(params["dirpath"])
    if manager.get("explicit_log_dir"):
        return Path(manager["explicit_log_dir"]) / "checkpoints"
    name = manager.get("name") or cfg.get("name") or "default"
    return Path(manager.get("exp_dir") or Path.cwd() / "nemo_experiments") / name / "checkpoints"


def check_archive(path: Path, *, what: str) -> list[tarfile.TarInfo]:
    """`path` exists and is a complete tar archive (every member's bytes present); its members."""
    if not path.is_file():
        raise TiedLoraCheckpointError(f"{what}={path}: no such file")
    size = path.stat().st_size
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise TiedLoraCheckpointError(
            f"{what}={path} is not a readable .nemo archive ({tar_error_text(error)}): the file is truncated or "
            "corrupt; copy it again or re-export it") from error
    short = [m.name for m in members if m.isfile() and m.offset_data + m.size > size]
    if not members or short:
        raise TiedLoraCheckpointError(
            f"{what}={path} is truncated ({size} bytes; {'no members' if not members else f'{short[0]} is cut off'}): "
            "copy it again or re-export it")
    return members


def read_model_config(path: Path, *, what: str) -> DictConfig:
    """The `model_config.yaml` of a `.nemo` (a complete archive is required)."""
    members = check_archive(path, what=what)
    member = next((m for m in members if m.name.lstrip("./") == MODEL_CONFIG), None)
    if member is None:
        raise TiedLoraCheckpointError(f"{what}={path} has no {MODEL_CONFIG}: it is not a NeMo model archive")
    with tarfile.open(path) as tar:
        return OmegaConf.load(io.StringIO(tar.extractfile(member).read().decode()))


def check_training_data(cfg: DictConfig, *, base: Optional[Path], base_cfg: Optional[DictConfig]) -> None:
    """Every file of model.data.train_ds and validation_ds (nemo_tiedlora.formats.sft_jsonl)."""
    from nemo_tiedlora.formats.sft_jsonl import check_files

    count_tokens = token_counter(base, base_cfg) if base is not None and base_cfg is not None else None
    data = cfg.model.get("data", {})
    for split in ("train_ds", "validation_ds"):
        section = data.get(split)
        if section is None or not section.get("file_names"):
            continue
        spec = data_spec(section, f"model.data.{split}", generation=split != "train_ds")
        check_files(list(section.file_names), spec, count_tokens=count_tokens)


def data_spec(section: Any, name: str, *, generation: bool):
    """The DataSpec of a YAML dataset section (tokens_to_generate only where NeMo generates: validation/test)."""
    from nemo_tiedlora.formats.sft_jsonl import DataSpec

    section = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    return DataSpec(
        max_seq_length=int(section.get("max_seq_length", 2048)),
        prompt_template=str(section.get("prompt_template") or "{input} {output}"),
        label_key=str(section.get("label_key") or "output"),
        tokens_to_generate=int(section.get("tokens_to_generate") or 0) if generation else 0,
        add_bos=bool(section.get("add_bos", False)),
        add_sep=bool(section.get("add_sep", False)),
        add_eos=bool(section.get("add_eos", True)),
        section=name,
    )


def token_counter(base: Path, base_cfg: DictConfig):
    """A token counter from the base's sentencepiece model (None for other tokenizers: words are counted)."""
    tok = base_cfg.get("tokenizer", {})
    model = str(tok.get("model") or "")
    if tok.get("library") != "sentencepiece" or not model.startswith("nemo:"):
        return None
    try:
        import sentencepiece

        with tarfile.open(base) as tar:
            member = next(m for m in tar.getmembers() if m.name.lstrip("./") == model[len("nemo:"):])
            proto = tar.extractfile(member).read()
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except Exception as error:  # noqa: BLE001 - an unusual tokenizer: fall back to the word lower bound
        logger.debug("data check counts words: base tokenizer unavailable (%s)", error)
        return None
    return lambda text: len(processor.encode(text))


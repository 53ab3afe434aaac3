"""The one reader / writer of base GPT `.nemo` archives, on CPU in one process (nemo glue layer: imports NeMo lazily).

NeMo writes two kinds of `.nemo` for Megatron GPT models:

* ``dist``: a distributed checkpoint (``model_weights/`` with ``.distcp`` files). It stores global tensors, so NeMo
  loads it at any TP/PP; NeMo 2.4.1 writes this for every mcore model.
* ``legacy``: one ``torch.save`` state dict per model-parallel rank (``model_weights.ckpt`` at TP1 PP1,
  ``mp_rank_XX/model_weights.ckpt`` at PP1, ``tp_rank_XX_pp_rank_XXX/model_weights.ckpt`` otherwise), written by
  older NeMo releases and by many converted checkpoints. NeMo loads it only at exactly the TP/PP it was saved at.

:func:`read_base` turns either into one TP1/PP1 state dict (a distributed one through NeMo's own restore, a legacy one
from its memory-mapped shards, joined by ``nemo_tiedlora.formats.reshard``); :func:`write_legacy` writes such a state
dict at any TP/PP as a legacy archive and :func:`write_dist` as a distributed one (NeMo restores its TP1 legacy copy and
saves it, ``nemo.cpu_restore``). Every output is checked by ``fileio.check_output`` (one
:class:`~nemo_tiedlora.core.fileio.OutputExistsError`) and written through ``fileio.atomic_output``. Errors: an
unreadable or incomplete archive is a ``TiedLoraCheckpointError``, an impossible layout or unknown format a
``TiedLoraConfigError``.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_tiedlora.formats.adapter_archive import tar_error_text
from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError
from nemo_tiedlora.core.fileio import atomic_output, check_output
from nemo_tiedlora.formats.reshard import (
    VOCAB_KEYS,
    Layout,
    layout_for,
    layout_settings,
    padded_vocab,
    repad,
    shard,
    source_layout,
    unshard,
)
from nemo_tiedlora.nemo.cpu_restore import restore_base, save_with_layout

WEIGHTS = "model_weights.ckpt"
CONFIG = "model_config.yaml"
FORMATS = ("dist", "legacy")
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")


@dataclass
class BaseCheckpoint:
    """A base `.nemo` as one TP1/PP1 state dict, its config and the archive's other files (tokenizer...)."""

    cfg: DictConfig
    state: dict[str, Any]
    format: str  # "dist" | "legacy"
    source: Layout
    artifacts: dict[str, bytes] = field(default_factory=dict)  # archive member name -> bytes (not weights/config)


def check_format(fmt: str) -> str:
    """`fmt` if it is a base format this package writes, else the error naming the choices."""
    if fmt not in FORMATS:
        raise TiedLoraConfigError(f"unknown format {fmt!r}: choose 'dist' or 'legacy'")
    return fmt


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _archive(path: Path) -> Iterator[tarfile.TarFile]:
    """The base archive open for reading; every way it cannot be read is one error naming the file and the fix."""
    if not path.exists():
        raise TiedLoraCheckpointError(f"{path} does not exist")
    try:
        with tarfile.open(path) as tar:
            yield tar
    except (tarfile.TarError, OSError, EOFError) as error:
        raise TiedLoraCheckpointError(f"{path} is not a readable NeMo .nemo archive ({tar_error_text(error)}): it is "
                                      "truncated or corrupt, or not a .nemo at all; check the path or copy the file "
                                      "again") from error


def _member_name(member: tarfile.TarInfo) -> str:
    return member.name.lstrip("./")


def _format_of(names: set[str], path: Path) -> str:
    if any(n.startswith("model_weights/") for n in names):
        return "dist"
    if WEIGHTS in names or any(n.endswith("/" + WEIGHTS) and _RANK_DIR.match(n.split("/")[0]) for n in names):
        return "legacy"
    raise TiedLoraCheckpointError(f"{path} holds neither a distributed checkpoint (model_weights/) nor per-rank "
                                  f"{WEIGHTS} files: it is not a NeMo GPT model archive")


def _read_config(tar: tarfile.TarFile, member: tarfile.TarInfo) -> DictConfig:
    return OmegaConf.load(io.StringIO(tar.extractfile(member).read().decode()))


def _no_config(path: Path) -> TiedLoraCheckpointError:
    return TiedLoraCheckpointError(f"{path} has no {CONFIG}: it is not a NeMo model archive")


def checkpoint_format(path: Path) -> str:
    """``dist`` or ``legacy`` (an error naming the file if it is neither; reads the archive's index only)."""
    path = Path(path)
    with _archive(path) as tar:
        names = {_member_name(m) for m in tar.getmembers()}
    return _format_of(names, path)


def base_config(base: Path) -> DictConfig:
    """The model config stored in a base .nemo (reads the archive index and one small member)."""
    base = Path(base)
    with _archive(base) as tar:
        member = next((m for m in tar.getmembers() if _member_name(m) == CONFIG), None)
        if member is None:
            raise _no_config(base)
        return _read_config(tar, member)


def read_base(path: Path, *, workdir: Optional[Path] = None) -> BaseCheckpoint:
    """Read a base `.nemo` of either format, at any TP/PP, into one TP1/PP1 state dict.

    One pass over the archive reads its config, its other top-level files and (legacy) its per-rank weight files;
    those are memory-mapped, so the TP1 state dict is about one copy of the base.
    """
    path = Path(path)
    work = Path(tempfile.mkdtemp(prefix="tiedlora-convert-", dir=workdir))
    try:
        names: set[str] = set()
        cfg, artifacts = None, {}
        with _archive(path) as tar:
            for member in tar:
                name = _member_name(member)
                names.add(name)
                if not member.isfile():
                    continue
                if name == CONFIG:
                    cfg = _read_config(tar, member)
                elif name.endswith(WEIGHTS):
                    with tar.extractfile(member) as src, open(work / name.replace("/", "__"), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 24)
                elif "/" not in name and not name.endswith(".ckpt"):
                    artifacts[name] = tar.extractfile(member).read()
        kind = _format_of(names, path)
        if cfg is None:
            raise _no_config(path)
        source = source_layout(cfg)
        if kind == "dist":
            state = dict(restore_base(path, cfg=cfg).state_dict())
        else:
            state = unshard(_legacy_shards(path, work, source), cfg, source)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # mmap'd storages stay valid after unlink (POSIX)
    return BaseCheckpoint(cfg, state, kind, source, artifacts)


def _rank_file(layout: Layout, tp_rank: int, pp_rank: int) -> str:
    """The archive member of one rank's state dict in a legacy archive of `layout`."""
    if layout.tp * layout.pp == 1:
        return WEIGHTS
    folder = f"mp_rank_{tp_rank:02d}" if layout.pp == 1 else f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}"
    return f"{folder}/{WEIGHTS}"


def _legacy_shards(path: Path, work: Path, layout: Layout) -> dict[tuple[int, int], dict[str, Any]]:
    shards = {}
    for t in range(layout.tp):
        for p in range(layout.pp):
            name = _rank_file(layout, t, p)
            file = work / name.replace("/", "__")
            if not file.exists():
                raise TiedLoraCheckpointError(
                    f"{path} is missing {name}: its model_config.yaml says TP={layout.tp} PP={layout.pp}, so the "
                    "archive is incomplete or its config does not match its weights")
            try:
                shards[(t, p)] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as error:  # noqa: BLE001 - any failure here means a corrupt shard
                raise TiedLoraCheckpointError(f"cannot read the weights shard {name} of {path} ({error!r}): the "
                                              "archive is truncated or corrupt") from error
    return shards


def original_vocab_size(cfg: Any, artifacts: dict[str, bytes]) -> int:
    """The tokenizer's vocabulary size (NeMo pads it to a multiple of make_vocab_size_divisible_by x TP)."""
    tok = cfg.get("tokenizer", {})
    model = str(tok.get("model") or "")
    if tok.get("library") == "sentencepiece" and model.startswith("nemo:") and model[5:] in artifacts:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        processor.LoadFromSerializedProto(artifacts[model[5:]])
        return int(processor.get_piece_size())
    hf_json = str((tok.get("hf_files") or {}).get("tokenizer_json") or "")  # written by import-hf
    if tok.get("library") == "huggingface" and hf_json.startswith("nemo:") and hf_json[5:] in artifacts:
        from tokenizers import Tokenizer

        return int(Tokenizer.from_str(artifacts[hf_json[5:]].decode()).get_vocab_size(with_added_tokens=True))
    raise TiedLoraCheckpointError(
        f"cannot tell the tokenizer's vocabulary size (tokenizer library {tok.get('library')!r}), which sets the "
        "vocabulary padding at the new TP size: pass --vocab-size")


def _config_with_layout(cfg: Any, layout: Layout) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.update(layout_settings(layout))
    return cfg


def write_legacy(base: BaseCheckpoint, out: Path, layout: Layout, *, vocab_size: Optional[int] = None,
                 overwrite: bool = False) -> Path:
    """Write `base` as a legacy per-rank `.nemo` at `layout` (one rank in memory at a time)."""
    out = check_output(out, overwrite=overwrite)
    vocab = vocab_size or original_vocab_size(base.cfg, base.artifacts)
    rows = padded_vocab(vocab, base.cfg, layout.tp)
    # the vocabulary tensors are re-padded once here, not once per rank
    state = {key: repad(value, rows) if key in VOCAB_KEYS else value for key, value in base.state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        folder = Path(tmp)
        for name, data in base.artifacts.items():
            (folder / name).write_bytes(data)
        OmegaConf.save(_config_with_layout(base.cfg, layout), folder / CONFIG)
        for t in range(layout.tp):
            for p in range(layout.pp):
                target = folder / _rank_file(layout, t, p)
                target.parent.mkdir(exist_ok=True)
                torch.save(shard(state, base.cfg, layout, t, p, vocab_rows=rows), target)
        with atomic_output(out) as partial, tarfile.open(partial, "w:") as tar:
            tar.add(folder, arcname=".")
    return out


def write_dist(base: BaseCheckpoint, out: Path, layout: Layout, *, vocab_size: Optional[int] = None,
               overwrite: bool = False, release: bool = False, dtype: Optional[torch.dtype] = None) -> Path:
    """Write `base` as a distributed-checkpoint `.nemo` (loadable at any TP/PP; `layout` is recorded in its config).

    NeMo writes it: the state goes through a TP1 legacy archive that NeMo restores (strictly) and saves again.
    `release`: empty ``base.state`` once its TP1 copy is on disk (one copy of the weights in memory from then on);
    `dtype`: the dtype NeMo saves the weights in (it restores in fp32 on CPU).
    """
    out = check_output(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # NeMo reads the tokenizer from the restored archive when it saves: the TP1 copy lives until then.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tp1 = write_legacy(base, Path(tmp) / "tp1.nemo", layout_for(base.cfg, 1, 1), vocab_size=vocab_size)
        if release:
            base.state.clear()
        model = restore_base(tp1)
        if dtype is not None and dtype != torch.float32:
            model = model.to(dtype)
            with open_dict(model.cfg):  # the restore on CPU said fp32; the archive's config says what it holds
                model.cfg.precision = {torch.bfloat16: "bf16", torch.float16: 16}[dtype]
        return save_with_layout(model, layout, out)


def write_base(base: BaseCheckpoint, out: Path, layout: Layout, *, fmt: str, vocab_size: Optional[int] = None,
               overwrite: bool = False, dtype: Optional[torch.dtype] = None) -> Path:
    """Write `base` in `fmt` ('dist': :func:`write_dist`, which empties ``base.state`` once its TP1 copy is on disk;
    'legacy': :func:`write_legacy`) at `layout`."""
    if check_format(fmt) == "dist":
        return write_dist(base, out, layout, vocab_size=vocab_size, overwrite=overwrite, release=True, dtype=dtype)
    return write_legacy(base, out, layout, vocab_size=vocab_size, overwrite=overwrite)


def loadable_at_tp1(base: Path, workdir: Path) -> Path:
    """`base` itself if NeMo can restore it at TP1/PP1 (a distributed checkpoint, or legacy saved at TP1/PP1);
    otherwise a TP1 legacy copy of it in `workdir` (a legacy archive loads only at the layout it was saved at)."""
    base = Path(base)
    cfg = base_config(base)
    if checkpoint_format(base) == "dist" or (int(cfg.get("tensor_model_parallel_size", 1)) == 1
                                             and int(cfg.get("pipeline_model_parallel_size", 1)) == 1):
        return base
    source = read_base(base)
    return write_legacy(source, Path(workdir) / "base_tp1.nemo", layout_for(source.cfg, 1, 1))

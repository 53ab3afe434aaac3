"""Convert a base GPT `.nemo` between tensor/pipeline-parallel layouts and checkpoint formats, on CPU, one process.

NeMo writes two kinds of `.nemo` for Megatron GPT models:

* ``dist``: a distributed checkpoint (``model_weights/`` with ``.distcp`` files). It stores global tensors, so NeMo
  loads it at any TP/PP; NeMo 2.4.1 writes this for every mcore model.
* ``legacy``: one ``torch.save`` state dict per model-parallel rank (``model_weights.ckpt`` at TP1 PP1,
  ``mp_rank_XX/model_weights.ckpt`` at PP1, ``tp_rank_XX_pp_rank_XXX/model_weights.ckpt`` otherwise), written by
  older NeMo releases and by many converted checkpoints. NeMo loads it only at exactly the TP/PP it was saved at.

:func:`read_base` turns either into one TP1/PP1 state dict (``model.decoder.layers.<global layer>...``), and
:func:`write_legacy` / :func:`write_dist` write such a state dict at any TP/PP (uneven pipeline stages included).
The resharding rules are Megatron's: column-parallel weights (``linear_qkv``, ``linear_fc1``, embeddings, output
layer) split along dim 0, ``linear_fc1`` of gated MLPs (SwiGLU) per half, row-parallel weights (``linear_proj``,
``linear_fc2``) along dim 1, everything else replicated; the vocabulary is re-padded for the target TP as NeMo pads
it. A key it has no rule for and that differs between TP ranks is an error, never a guess.

Memory: the legacy source shards are memory-mapped and the TP1 state dict is assembled once (about one copy of
the base); a legacy target is written one rank at a time. Every output goes to a temporary file and is renamed
at the end.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_tiedlora.errors import TiedLoraCheckpointError, TiedLoraConfigError

logger = logging.getLogger("nemo_tiedlora")

WEIGHTS = "model_weights.ckpt"
_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")
_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_VOCAB = ("model.embedding.word_embeddings.weight", "model.output_layer.weight")
_LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_in_first_pipeline_stage",
                "num_layers_in_last_pipeline_stage")
_GATED = ("swiglu", "fast-swiglu", "geglu", "fast-geglu", "reglu", "fast-reglu")


@dataclass(frozen=True)
class Layout:
    """A model-parallel layout: TP size, PP size and the number of decoder layers on each pipeline stage."""

    tp: int
    pp: int
    stage_layers: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sum(self.stage_layers[:i]) for i in range(self.pp))


def layout_for(cfg: Any, tp: int, pp: int, *, first_stage_layers: Optional[int] = None,
               last_stage_layers: Optional[int] = None) -> Layout:
    """The layers per stage Megatron uses for `cfg`'s num_layers at (tp, pp); a clear error if they do not divide."""
    num_layers = int(cfg.num_layers)
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"TP={tp} and PP={pp} must both be >= 1")
    for name, size in (("num_attention_heads", cfg.num_attention_heads),
                       ("num_query_groups", cfg.get("num_query_groups") or cfg.num_attention_heads),
                       ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if tp >= 1 and int(size) % tp:
            problems.append(f"{name}={size} is not divisible by TP={tp}")
    stages: list[int] = []
    if pp >= 1:
        first = first_stage_layers if first_stage_layers is not None else cfg.get("num_layers_in_first_pipeline_stage")
        last = last_stage_layers if last_stage_layers is not None else cfg.get("num_layers_in_last_pipeline_stage")
        if pp == 1:
            first = last = None
        fixed = [n for n in (first, last) if n is not None]
        middle_stages = pp - len(fixed)
        rest = num_layers - sum(fixed)
        if any(n < 1 for n in fixed) or rest < 0 or (middle_stages == 0 and rest != 0) or \
                (middle_stages > 0 and (rest % middle_stages or rest == 0)):
            problems.append(f"num_layers={num_layers} cannot be split over PP={pp} stages "
                            f"(first stage {first}, last stage {last}): give a PP that divides the layers, or set "
                            "the first/last stage layer counts so the other stages get equal, non-zero shares")
        else:
            each = rest // middle_stages if middle_stages else 0
            stages = [each] * pp
            if first is not None:
                stages[0] = int(first)
            if last is not None:
                stages[-1] = int(last)
    if problems:
        raise TiedLoraConfigError("impossible layout: " + "; ".join(problems))
    return Layout(tp, pp, tuple(stages))


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BaseCheckpoint:
    """A base `.nemo` as one TP1/PP1 state dict, its config and the archive's other files (tokenizer...)."""

    cfg: DictConfig
    state: dict[str, Any]
    format: str  # "dist" | "legacy"
    source: Layout
    artifacts: dict[str, bytes] = field(default_factory=dict)  # archive member name -> bytes (not weights/config)


def _members(path: Path) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(path) as tar:
            return tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise TiedLoraCheckpointError(f"{path} is not a readable NeMo .nemo archive ({error!r}): it is truncated "
                                      "or corrupt, or not a .nemo at all; check the path or copy the file "
                                      "again") from error


def checkpoint_format(path: Path) -> str:
    """``dist`` or ``legacy`` (an error naming the file if it is neither)."""
    names = {m.name.lstrip("./") for m in _members(Path(path))}
    if any(n.startswith("model_weights/") for n in names):
        return "dist"
    if WEIGHTS in names or any(n.endswith("/" + WEIGHTS) and _RANK_DIR.match(n.split("/")[0]) for n in names):
        return "legacy"
    raise TiedLoraCheckpointError(f"{path} holds neither a distributed checkpoint (model_weights/) nor per-rank "
                                  f"{WEIGHTS} files: it is not a NeMo GPT model archive")


def _config_and_artifacts(path: Path) -> tuple[DictConfig, dict[str, bytes]]:
    artifacts, cfg = {}, None
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name = member.name.lstrip("./")
                if not member.isfile():
                    continue
                if name == "model_config.yaml":
                    cfg = OmegaConf.load(io.StringIO(tar.extractfile(member).read().decode()))
                elif "/" not in name and not name.endswith(".ckpt"):
                    artifacts[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise TiedLoraCheckpointError(f"{path} cannot be read ({error!r}): the archive is truncated or corrupt") from error
    if cfg is None:
        raise TiedLoraCheckpointError(f"{path} has no model_config.yaml: it is not a NeMo model archive")
    return cfg, artifacts


def _load_shard(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means a corrupt shard
        raise TiedLoraCheckpointError(f"cannot read the weights shard {file.name} ({error!r}): the archive is "
                                      "truncated or corrupt") from error


def read_base(path: Path, *, workdir: Optional[Path] = None) -> BaseCheckpoint:
    """Read a base `.nemo` of either format, at any TP/PP, into one TP1/PP1 state dict."""
    path = Path(path)
    if not path.exists():
        raise TiedLoraCheckpointError(f"{path} does not exist")
    kind = checkpoint_format(path)
    cfg, artifacts = _config_and_artifacts(path)
    tp, pp = int(cfg.get("tensor_model_parallel_size", 1)), int(cfg.get("pipeline_model_parallel_size", 1))
    source = layout_for(cfg, tp, pp)
    if kind == "dist":
        from nemo_tiedlora.nemo.tools import _restore_base

        model = _restore_base(path)
        state = {k: v for k, v in model.state_dict().items()}
        return BaseCheckpoint(cfg, state, kind, source, artifacts)
    work = Path(tempfile.mkdtemp(prefix="tiedlora-convert-", dir=workdir))
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name = member.name.lstrip("./")
                if member.isfile() and name.endswith(WEIGHTS):
                    target = work / name.replace("/", "__")
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 24)
        shards = {}
        for t in range(tp):
            for p in range(pp):
                name = WEIGHTS if tp * pp == 1 else (f"mp_rank_{t:02d}__{WEIGHTS}" if pp == 1 else
                                                     f"tp_rank_{t:02d}_pp_rank_{p:03d}__{WEIGHTS}")
                file = work / name
                if not file.exists():
                    raise TiedLoraCheckpointError(
                        f"{path} is missing {name.replace('__', '/')}: its model_config.yaml says TP={tp} PP={pp}, "
                        "so the archive is incomplete or its config does not match its weights")
                shards[(t, p)] = _load_shard(file)
        state = unshard(shards, cfg, source)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # mmap'd storages stay valid after unlink (POSIX)
    return BaseCheckpoint(cfg, state, kind, source, artifacts)


def _local_to_global(key: str, offset: int) -> str:
    match = _LAYER.match(key)
    return f"model.decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}" if match else key


def _global_to_local(key: str, offset: int) -> str:
    match = _LAYER.match(key)
    return f"model.decoder.layers.{int(match.group(1)) - offset}.{match.group(2)}" if match else key


def _rule(key: str) -> str:
    """'column' | 'row' | 'vocab' | 'replicated' for a TP1 key."""
    if key in _VOCAB:
        return "vocab"
    match = _LAYER.match(key)
    suffix = match.group(2) if match else key
    if suffix in _COLUMN:
        return "column"
    if suffix in _ROW:
        return "row"
    return "replicated"


def _gated(cfg: Any) -> bool:
    return str(cfg.get("activation", "gelu")) in _GATED


def _cat_column(parts: list[torch.Tensor], gated: bool) -> torch.Tensor:
    if not gated:
        return torch.cat(parts, dim=0)
    halves = [p.chunk(2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def _split_column(tensor: torch.Tensor, tp: int, rank: int, gated: bool) -> torch.Tensor:
    if not gated:
        return tensor.chunk(tp, dim=0)[rank]
    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)


def unshard(shards: dict[tuple[int, int], dict[str, Any]], cfg: Any, layout: Layout) -> dict[str, Any]:
    """TP1/PP1 state dict from per-rank state dicts {(tp rank, pp rank): state} saved at `layout`."""
    gated = _gated(cfg)
    state: dict[str, Any] = {}
    for p in range(layout.pp):
        offset = layout.offsets[p]
        local = shards[(0, p)]
        for key in local:
            parts = [shards[(t, p)][key] for t in range(layout.tp)]
            global_key = _local_to_global(key, offset)
            if (p == layout.pp - 1 and layout.pp > 1 and key == "model.output_layer.weight"
                    and cfg.get("share_embeddings_and_output_weights", True)):
                continue  # the last stage's copy of the tied embedding
            rule = _rule(global_key)
            if not isinstance(parts[0], torch.Tensor):
                state[global_key] = parts[0]
            elif layout.tp == 1:
                state[global_key] = parts[0]
            elif rule in ("column", "vocab"):
                state[global_key] = _cat_column(parts, gated and global_key.endswith("linear_fc1.weight"))
            elif rule == "row":
                state[global_key] = torch.cat(parts, dim=1)
            else:
                if any(not torch.equal(parts[0], other) for other in parts[1:]):
                    raise TiedLoraCheckpointError(
                        f"{key} differs between tensor-parallel ranks and nemo_tiedlora has no resharding rule for "
                        "it: this converter knows Megatron GPT's linear_qkv/linear_proj/linear_fc1/linear_fc2, "
                        "norms, embeddings and output layer")
                state[global_key] = parts[0]
    layers = sorted({int(_LAYER.match(k).group(1)) for k in state if _LAYER.match(k)})
    if layers != list(range(int(cfg.num_layers))):
        raise TiedLoraCheckpointError(f"the shards hold layers {layers}, expected 0..{int(cfg.num_layers) - 1}: the "
                                      "archive's pipeline split does not match its model_config.yaml "
                                      "(num_layers_in_first/last_pipeline_stage)")
    return state


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------
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


def padded_vocab(vocab: int, cfg: Any, tp: int) -> int:
    multiple = int(cfg.get("make_vocab_size_divisible_by", 128)) * tp
    return int(math.ceil(vocab / multiple) * multiple)


def _repad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows]
    pad = torch.zeros((rows - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


def shard(state: dict[str, Any], cfg: Any, layout: Layout, tp_rank: int, pp_rank: int, *, vocab_rows: int) -> dict:
    """The state dict of one (tp rank, pp rank) of `layout` from a TP1/PP1 state dict (tensors cloned)."""
    gated = _gated(cfg)
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    offset, count = layout.offsets[pp_rank], layout.stage_layers[pp_rank]
    tied = cfg.get("share_embeddings_and_output_weights", True)
    out: dict[str, Any] = {}
    for key, value in state.items():
        match = _LAYER.match(key)
        if match:
            if not offset <= int(match.group(1)) < offset + count:
                continue
        elif key.startswith("model.embedding."):
            if not first:
                continue
        elif key.startswith("model.decoder.final_layernorm") or key.startswith("model.output_layer"):
            if not last:
                continue
        local = _global_to_local(key, offset)
        if not isinstance(value, torch.Tensor):
            out[local] = value
            continue
        rule = _rule(key)
        if rule == "vocab":
            value = _repad(value, vocab_rows).chunk(layout.tp, dim=0)[tp_rank]
        elif rule == "column":
            value = _split_column(value, layout.tp, tp_rank, gated and key.endswith("linear_fc1.weight"))
        elif rule == "row":
            value = value.chunk(layout.tp, dim=1)[tp_rank]
        # torch.save writes a tensor's whole storage: a slice is copied out, a whole tensor is saved as it is
        whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        out[local] = value if whole else value.clone()
    if last and layout.pp > 1 and tied:
        embedding = _repad(state["model.embedding.word_embeddings.weight"], vocab_rows)
        out["model.output_layer.weight"] = embedding.chunk(layout.tp, dim=0)[tp_rank].clone()
    return out


def _updated_cfg(cfg: Any, layout: Layout) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.tensor_model_parallel_size = layout.tp
        cfg.pipeline_model_parallel_size = layout.pp
        stages = layout.stage_layers
        # NeMo splits the layers not on a named first/last stage evenly over the other stages (and cannot name
        # both for PP=2): name only the stage(s) that differ.
        first = last = None
        if len(set(stages)) > 1:
            if len(set(stages[1:])) == 1:
                first = stages[0]
            elif len(set(stages[:-1])) == 1:
                last = stages[-1]
            else:
                first, last = stages[0], stages[-1]
        cfg.num_layers_in_first_pipeline_stage = first
        cfg.num_layers_in_last_pipeline_stage = last
    return cfg


def _tar_folder(folder: Path, out: Path) -> None:
    with tarfile.open(out, "w:") as tar:
        tar.add(folder, arcname=".")


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise TiedLoraCheckpointError(f"{out} exists: choose another output path or pass --overwrite")


def write_legacy(base: BaseCheckpoint, out: Path, layout: Layout, *, vocab_size: Optional[int] = None,
                 overwrite: bool = False) -> Path:
    """Write `base` as a legacy per-rank `.nemo` at `layout` (one rank in memory at a time)."""
    out = Path(out)
    _refuse_existing(out, overwrite)
    vocab = vocab_size or original_vocab_size(base.cfg, base.artifacts)
    rows = padded_vocab(vocab, base.cfg, layout.tp)
    # the vocabulary tensors are re-padded once here, not once per rank
    state = {key: _repad(value, rows) if key in _VOCAB else value for key, value in base.state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        folder = Path(tmp) / "archive"
        folder.mkdir()
        for name, data in base.artifacts.items():
            (folder / name).write_bytes(data)
        OmegaConf.save(_updated_cfg(base.cfg, layout), folder / "model_config.yaml")
        for t in range(layout.tp):
            for p in range(layout.pp):
                if layout.tp * layout.pp == 1:
                    target = folder / WEIGHTS
                else:
                    sub = f"mp_rank_{t:02d}" if layout.pp == 1 else f"tp_rank_{t:02d}_pp_rank_{p:03d}"
                    (folder / sub).mkdir()
                    target = folder / sub / WEIGHTS
                torch.save(shard(state, base.cfg, layout, t, p, vocab_rows=rows), target)
        partial = Path(tmp) / "out.nemo"
        _tar_folder(folder, partial)
        os.replace(partial, out)
    return out


def write_dist(base: BaseCheckpoint, out: Path, layout: Layout, *, vocab_size: Optional[int] = None,
               overwrite: bool = False) -> Path:
    """Write `base` as a distributed-checkpoint `.nemo` (loadable at any TP/PP; `layout` is recorded in its config).

    NeMo writes it: the state goes through a TP1 legacy archive that NeMo restores (strictly) and saves again.
    """
    from nemo_tiedlora.nemo.tools import _restore_base

    out = Path(out)
    _refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # NeMo reads the tokenizer from the restored archive when it saves: the TP1 copy lives until then.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tp1 = write_legacy(base, Path(tmp) / "tp1.nemo", layout_for(base.cfg, 1, 1), vocab_size=vocab_size)
        return save_with_layout(_restore_base(tp1), layout, out)


def save_with_layout(model: Any, layout: Layout, out: Path) -> Path:
    """NeMo's save_to of a restored model with `layout` (TP, PP, uneven stages) recorded in its config; the
    distributed checkpoint it writes loads at any TP/PP. Written to a temporary name, renamed at the end."""
    from nemo_tiedlora.nemo.tools import _save_to

    updated = _updated_cfg(model.cfg, layout)
    with open_dict(model.cfg):
        for key in _LAYOUT_KEYS:
            model.cfg[key] = updated[key]
    return _save_to(model, Path(out))


def convert(src: Path, out: Path, *, tp: int = 1, pp: int = 1, fmt: str = "dist",
            first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None,
            vocab_size: Optional[int] = None, overwrite: bool = False) -> Path:
    """Convert the base `src` to `fmt` ('dist' or 'legacy') at TP=`tp`, PP=`pp`."""
    if fmt not in ("dist", "legacy"):
        raise TiedLoraConfigError(f"unknown format {fmt!r}: choose 'dist' or 'legacy'")
    _refuse_existing(Path(out), overwrite)
    if fmt == "dist" and checkpoint_format(Path(src)) == "dist":
        return _dist_to_dist(Path(src), Path(out), tp=tp, pp=pp, first_stage_layers=first_stage_layers,
                             last_stage_layers=last_stage_layers)
    base = read_base(Path(src))
    layout = layout_for(base.cfg, tp, pp, first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
    writer = write_dist if fmt == "dist" else write_legacy
    written = writer(base, Path(out), layout, vocab_size=vocab_size, overwrite=overwrite)
    logger.info("converted %s (%s, TP%d PP%d) -> %s (%s, TP%d PP%d %s)", src, base.format, base.source.tp,
                base.source.pp, out, fmt, tp, pp, layout.stage_layers)
    return written


def _dist_to_dist(src: Path, out: Path, *, tp: int, pp: int, first_stage_layers: Optional[int],
                  last_stage_layers: Optional[int]) -> Path:
    """A distributed checkpoint already loads at any TP/PP: restore it once and save it with the layout recorded."""
    from nemo_tiedlora.nemo.tools import _restore_base, base_config

    layout = layout_for(base_config(src), tp, pp, first_stage_layers=first_stage_layers,
                        last_stage_layers=last_stage_layers)
    return save_with_layout(_restore_base(src), layout, out)

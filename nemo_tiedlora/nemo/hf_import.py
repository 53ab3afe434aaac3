"""``import-hf``: a Hugging Face Llama-family checkpoint (folder or .gguf) -> a self-contained base ``.nemo``.

The mapping is pure (``nemo_tiedlora.hf_import``, ``nemo_tiedlora.hf_source``); this module assembles the NeMo
config and writes the archive through ``nemo_tiedlora.convert`` (legacy per-rank or NeMo's distributed checkpoint,
any TP/PP, written to a temporary name and renamed). The tokenizer travels inside the archive as NeMo's
``huggingface`` tokenizer: its files are archive artifacts ``tokenizer.hf_files.*`` (``tokenizer.type`` is
``nemo_tiedlora:hf_files``; the compat fix ``hf-tokenizer-in-archive`` lets NeMo read them), so loading needs no
hub access and no path outside the archive.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from nemo_tiedlora.errors import TiedLoraCheckpointError, TiedLoraConfigError

logger = logging.getLogger("nemo_tiedlora")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _artifact_key(filename: str) -> str:
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}_{ext}"  # OmegaConf keys cannot hold '.'; the compat fix maps it back


def tokenizer_config(files: dict[str, bytes], chat_template: Any = None) -> dict[str, Any]:
    """``model.tokenizer`` of an imported archive: NeMo's huggingface tokenizer over the archive's files."""
    from nemo_tiedlora.nemo.compat import HF_TOKENIZER_IN_ARCHIVE

    return {
        "library": "huggingface",
        "type": HF_TOKENIZER_IN_ARCHIVE,
        "model": None,
        "vocab_file": None,
        "merge_file": None,
        "delimiter": None,
        "use_fast": True,
        "hf_files": {_artifact_key(name): f"nemo:{name}" for name in sorted(files)},
        **({"chat_template": chat_template} if isinstance(chat_template, str) else {}),
    }


def nemo_config(model_keys: dict[str, Any], tokenizer: dict[str, Any], *, divisor: int, dtype: str) -> Any:
    """The full ``model_config.yaml``: the CPU-safe runtime settings of the embedded base, the imported
    architecture, the tokenizer and the vocabulary divisor (TP1/PP1; the writer records the target layout)."""
    from nemo_tiedlora.demo.base_model import BaseSpec, base_model_config

    cfg = OmegaConf.to_container(base_model_config(Path("unused"), BaseSpec()))
    cfg.update(model_keys)
    cfg.update({
        "micro_batch_size": 1,
        "global_batch_size": 1,
        "tokenizer": tokenizer,
        "make_vocab_size_divisible_by": divisor,
        "precision": 32 if dtype == "fp32" else "bf16",
        "data": {**cfg["data"], "seq_length": model_keys["encoder_seq_length"]},
    })
    return OmegaConf.create(cfg)


def import_hf(source: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, fmt: str = "dist",
              dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Convert the HF checkpoint folder or ``.gguf`` at ``source`` into a base ``.nemo`` at ``out``."""
    from nemo_tiedlora.convert import BaseCheckpoint, layout_for, padded_vocab, save_with_layout, write_legacy
    from nemo_tiedlora.hf_import import nemo_model_config, nemo_state_dict, vocab_divisor
    from nemo_tiedlora.hf_source import open_source, tokenizer_files
    from nemo_tiedlora.nemo.tools import _restore_base

    out = Path(out)
    if fmt not in ("dist", "legacy"):
        raise TiedLoraConfigError(f"unknown format {fmt!r}: choose 'dist' or 'legacy'")
    if dtype not in DTYPES:
        raise TiedLoraConfigError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if out.exists() and not overwrite:
        raise TiedLoraCheckpointError(f"{out} exists: choose another --out or pass --overwrite")
    src = open_source(source)
    model_keys = nemo_model_config(src.config)  # refuses unsupported families / settings before any weight is read
    files = tokenizer_files(src.tokenizer)
    state = nemo_state_dict(src.config, src.names, src.get, dtype=DTYPES[dtype])
    rows = int(state["model.embedding.word_embeddings.weight"].shape[0])
    vocab = len(src.tokenizer)
    cfg = nemo_config(model_keys, tokenizer_config(files, getattr(src.tokenizer, "chat_template", None)),
                      divisor=vocab_divisor(vocab, rows), dtype=dtype)
    layout = layout_for(cfg, tp, pp)  # refuse an impossible layout before writing
    if padded_vocab(vocab, cfg, tp) != rows:
        raise TiedLoraConfigError(
            f"at TP={tp} NeMo pads the {vocab}-token vocabulary to {padded_vocab(vocab, cfg, tp)} rows but the "
            f"checkpoint has {rows}: import at --tp 1 (a distributed checkpoint still loads at any TP that divides "
            f"{rows // int(cfg.make_vocab_size_divisible_by)})")
    base = BaseCheckpoint(cfg, state, "legacy", layout_for(cfg, 1, 1), dict(files))
    if fmt == "legacy":
        written = write_legacy(base, out, layout, vocab_size=vocab, overwrite=overwrite)
    else:  # NeMo writes the distributed checkpoint from a TP1 legacy copy it restores (kept until it has saved)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            tp1 = write_legacy(base, Path(tmp) / "tp1.nemo", layout_for(cfg, 1, 1), vocab_size=vocab)
            del base, state, src  # one copy of the weights at a time: the restored model's
            model = _restore_base(tp1)
            if dtype != "fp32":
                model = model.to(DTYPES[dtype])  # NeMo restores in fp32 on CPU; the archive keeps the chosen dtype
            written = save_with_layout(model, layout, out)
    logger.info("imported %s -> %s (%s, TP%d PP%d, %s)", source, out, fmt, tp, pp, dtype)
    return written

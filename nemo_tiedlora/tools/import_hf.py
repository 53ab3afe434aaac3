"""``import-hf``: a Hugging Face Llama-family checkpoint (folder or .gguf) -> a self-contained base ``.nemo``
(tools layer).

The checkpoint is read by ``nemo_tiedlora.formats.hf.source`` and mapped by ``nemo_tiedlora.formats.hf.llama_to_nemo``
(both pure), its NeMo config assembled by ``nemo.hf_base_config`` (tokenizer inside the archive) and the archive written
by ``nemo.base_archive``: legacy per-rank, or NeMo's distributed checkpoint, at any TP/PP, through a temporary name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.core.fileio import check_output
from nemo_tiedlora.formats.hf.llama_to_nemo import nemo_model_config, nemo_state_dict, vocab_divisor
from nemo_tiedlora.formats.hf.source import open_source, tokenizer_files
from nemo_tiedlora.nemo.base_archive import BaseCheckpoint, check_format, write_base
from nemo_tiedlora.nemo.hf_base_config import nemo_config, tokenizer_config
from nemo_tiedlora.formats.reshard import layout_for, padded_vocab

logger = logging.getLogger("nemo_tiedlora")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def import_hf(source: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, fmt: str = "dist",
              dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Convert the HF checkpoint folder or ``.gguf`` at ``source`` into a base ``.nemo`` at ``out``."""
    fmt = check_format(fmt)
    if dtype not in DTYPES:
        raise TiedLoraConfigError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out = check_output(out, overwrite=overwrite)
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
    del state, src  # one copy of the weights at a time: the dist writer empties base.state once its TP1 copy is on disk
    # dist: NeMo writes the distributed checkpoint from a TP1 legacy copy it restores, in the chosen dtype
    written = write_base(base, out, layout, fmt=fmt, vocab_size=vocab, overwrite=overwrite, dtype=DTYPES[dtype])
    logger.info("imported %s -> %s (%s, TP%d PP%d, %s)", source, out, fmt, tp, pp, dtype)
    return written

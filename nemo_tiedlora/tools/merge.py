"""``merge``: an adapter into its base, a standard `.nemo` (tools layer; CPU, one process).

W_l' = W_l + (alpha/r) diag(v_l) B diag(u_l) A for every adapted layer (``nemo_tiedlora.merge``). The adapter
archive is read and validated once (``checkpoint.load_archive``). A distributed-checkpoint base merged into a
distributed-checkpoint output is restored once (one copy of its weights in memory), updated in place layer by
layer and saved by NeMo (loadable at any TP/PP). Legacy per-rank bases (any TP/PP) and legacy outputs go through
the TP1 state dict of ``nemo.base_io.read_base`` (memory-mapped shards, one output rank at a time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from nemo_tiedlora.checkpoint import check_base_shape, load_archive
from nemo_tiedlora.fileio import check_output
from nemo_tiedlora.merge import merge_into_layers, merge_into_state, per_layer_lora
from nemo_tiedlora.nemo import base_io
from nemo_tiedlora.reshard import layout_for
from nemo_tiedlora.shape import model_shape

logger = logging.getLogger("nemo_tiedlora")


def merge(*, base: Path, adapter: Path, out: Path, tp: int = 1, pp: int = 1, fmt: str = "dist",
          first_stage_layers: Optional[int] = None, vocab_size: Optional[int] = None,
          overwrite: bool = False) -> Path:
    """W_l' = W_l + (alpha/r) diag(v_l) B diag(u_l) A for every adapted layer; a standard .nemo at `out`.

    `base` may be a distributed-checkpoint or a legacy per-rank .nemo saved at any TP/PP. The output is written in
    `fmt`: 'dist' (loadable at any TP/PP; `tp`/`pp` are recorded in its config) or 'legacy' (one state dict per
    rank of the TP=`tp`, PP=`pp` layout, uneven first stage via `first_stage_layers`).
    """
    base, fmt = Path(base), base_io.check_format(fmt)
    out = check_output(out, overwrite=overwrite)
    archive = load_archive(Path(adapter))  # read and validated once: keys, shapes, finite values
    cfg = base_io.base_config(base)
    check_base_shape(archive.shape, model_shape(cfg))
    layout = layout_for(cfg, tp, pp, first_stage_layers=first_stage_layers)  # refuse impossible layouts up front
    factors = per_layer_lora(archive.tensors, archive.config, check=False)
    if fmt == "dist" and base_io.checkpoint_format(base) == "dist":
        model = base_io.restore_base(base, cfg=cfg)  # one copy of the base: add in place layer by layer, NeMo saves
        merge_into_layers(model.model.decoder.layers, factors)
        base_io.save_with_layout(model, layout, out)
    else:
        source = base_io.read_base(base)
        merge_into_state(source.state, factors)
        base_io.write_base(source, out, layout, fmt=fmt, vocab_size=vocab_size, overwrite=overwrite)
    logger.info("merged %s into %s -> %s (%s, TP%d PP%d)", adapter, base, out, fmt, tp, pp)
    return out

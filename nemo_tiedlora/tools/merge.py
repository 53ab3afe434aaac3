"""``merge``: an adapter into its base, a standard `.nemo` (tools layer; CPU, one process).

W_l' = W_l + (alpha/r) diag(v_l) B diag(u_l) A for every adapted layer (``nemo_tiedlora.formats.merge_delta``). The
adapter archive is read and validated once (``formats.adapter_archive.load_archive``). A distributed-checkpoint base
merged into a distributed-checkpoint output is restored once (one copy of its weights in memory), updated in place layer
by layer and saved by NeMo (loadable at any TP/PP). Legacy per-rank bases (any TP/PP) and legacy outputs go through the
TP1 state dict of ``nemo.base_archive.read_base`` (memory-mapped shards, one output rank at a time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from nemo_tiedlora.formats.adapter_archive import check_base_shape, load_archive
from nemo_tiedlora.core.fileio import check_output
from nemo_tiedlora.formats.merge_delta import merge_into_layers, merge_into_state, per_layer_lora
from nemo_tiedlora.nemo import base_archive, cpu_restore
from nemo_tiedlora.formats.reshard import layout_for
from nemo_tiedlora.core.model_shape import model_shape

logger = logging.getLogger("nemo_tiedlora")


def merge(*, base: Path, adapter: Path, out: Path, tp: int = 1, pp: int = 1, fmt: str = "dist",
          first_stage_layers: Optional[int] = None, vocab_size: Optional[int] = None,
          overwrite: bool = False) -> Path:
    """W_l' = W_l + (alpha/r) diag(v_l) B diag(u_l) A for every adapted layer; a standard .nemo at `out`.

    `base` may be a distributed-checkpoint or a legacy per-rank .nemo saved at any TP/PP. The output is written in
    `fmt`: 'dist' (loadable at any TP/PP; `tp`/`pp` are recorded in its config) or 'legacy' (one state dict per
    rank of the TP=`tp`, PP=`pp` layout, uneven first stage via `first_stage_layers`).
    """
    base, fmt = Path(base), base_archive.check_format(fmt)
    out = check_output(out, overwrite=overwrite)
    archive = load_archive(Path(adapter))  # read and validated once: keys, shapes, finite values
    cfg = base_archive.base_config(base)
    check_base_shape(archive.shape, model_shape(cfg))
    layout = layout_for(cfg, tp, pp, first_stage_layers=first_stage_layers)  # refuse impossible layouts up front
    factors = per_layer_lora(archive.tensors, archive.config, check=False)
    if fmt == "dist" and base_archive.checkpoint_format(base) == "dist":
        model = cpu_restore.restore_base(base, cfg=cfg)  # one copy of the base: add in place layer by layer, NeMo saves
        merge_into_layers(model.model.decoder.layers, factors)
        cpu_restore.save_with_layout(model, layout, out)
    else:
        source = base_archive.read_base(base)
        merge_into_state(source.state, factors)
        base_archive.write_base(source, out, layout, fmt=fmt, vocab_size=vocab_size, overwrite=overwrite)
    logger.info("merged %s into %s -> %s (%s, TP%d PP%d)", adapter, base, out, fmt, tp, pp)
    return out

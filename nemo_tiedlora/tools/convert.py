"""``convert``: a base GPT `.nemo` to another TP/PP layout or checkpoint format, on CPU, one process (tools layer).

Either format at any TP/PP is read into one TP1/PP1 state dict (``nemo.base_archive.read_base``) and written as a
distributed checkpoint (loads at any TP/PP, the layout recorded in its config) or as legacy per-rank state dicts of the
target layout (``nemo_tiedlora.formats.reshard`` holds the split rules). A distributed source into a distributed output
is restored once and saved again by NeMo with the new layout recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from nemo_tiedlora.core.fileio import check_output
from nemo_tiedlora.nemo import base_archive, cpu_restore
from nemo_tiedlora.formats.reshard import layout_for

logger = logging.getLogger("nemo_tiedlora")


def convert(src: Path, out: Path, *, tp: int = 1, pp: int = 1, fmt: str = "dist",
            first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None,
            vocab_size: Optional[int] = None, overwrite: bool = False) -> Path:
    """Convert the base `src` to `fmt` ('dist' or 'legacy') at TP=`tp`, PP=`pp`."""
    src, fmt = Path(src), base_archive.check_format(fmt)
    out = check_output(out, overwrite=overwrite)
    if fmt == "dist" and base_archive.checkpoint_format(src) == "dist":
        # a distributed checkpoint already loads at any TP/PP: restore it once, save it with the layout recorded
        cfg = base_archive.base_config(src)
        layout = layout_for(cfg, tp, pp, first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
        return cpu_restore.save_with_layout(cpu_restore.restore_base(src, cfg=cfg), layout, out)
    base = base_archive.read_base(src)
    layout = layout_for(base.cfg, tp, pp, first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
    source_format, source = base.format, base.source
    written = base_archive.write_base(base, out, layout, fmt=fmt, vocab_size=vocab_size, overwrite=overwrite)
    logger.info("converted %s (%s, TP%d PP%d) -> %s (%s, TP%d PP%d %s)", src, source_format, source.tp, source.pp,
                out, fmt, tp, pp, layout.stage_layers)
    return written

"""Diagnostic launcher: run a NeMo entry script with the reference composition of the adapter update in place of the
fused one (applications layer; for measurements only, not a user option).

    python -m nemo_tiedlora.apps.demo.reference_update SCRIPT [hydra overrides ...]

Every Tied-LoRA layer then computes its update with :func:`nemo_tiedlora.core.functional.tied_lora_update` (plain torch
ops, autograd's own backward) instead of :func:`nemo_tiedlora.core.autograd.fused_tied_lora_update`. The two are equal
within float rounding; running the same recipe both ways shows how much a result depends on rounding. Dropout is applied
with the layer's own keep mask; tensor-parallel regions are refused (the demo runs on one process).
"""

from __future__ import annotations

import runpy
import sys
from typing import Callable, Optional

from torch import Tensor

__all__ = ["reference_update", "main"]


def reference_update(
    x: Tensor, a: Tensor, b: Tensor, u: Tensor, v: Tensor, scale: float, *,
    keep_mask: Optional[Tensor] = None, keep_prob: float = 1.0,
    region: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """:func:`fused_tied_lora_update`'s signature, computed by the reference composition."""
    from nemo_tiedlora.core.functional import tied_lora_update

    if region is not None:
        raise RuntimeError("the reference update runs on one process only: use tensor_model_parallel_size=1")
    dropout = None if keep_mask is None else (lambda t: t * keep_mask / keep_prob)
    return tied_lora_update(x, a, b, u, v, scale, dropout=dropout)


def main(argv: list[str] | None = None) -> None:
    """Swap the update in the module that calls it, then run SCRIPT as ``__main__`` with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m nemo_tiedlora.apps.demo.reference_update SCRIPT [overrides ...]")
    import nemo_tiedlora.core.modules as modules

    modules.fused_tied_lora_update = reference_update
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()

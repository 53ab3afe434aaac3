"""What the adapter's extra gradient reductions (``nemo.grad_sync``) cost on this rank: a counter for benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReductionStats:
    """What the adapter's extra gradient reductions cost on this rank (for benchmarks; reset freely).

    ``calls`` and ``bytes`` are always counted. ``seconds`` only when ``timed`` is set: each reduction is then
    bracketed by a device synchronize (CUDA tensors), so it measures the collective itself rather than the time to
    queue it (or the backward still running ahead of it); that costs two host syncs per reduction, so it is off in
    training and on in benchmarks."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    timed: bool = False


STATS = ReductionStats()

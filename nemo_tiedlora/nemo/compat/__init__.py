"""Runtime replacements of NeMo 2.4.1 / megatron-core 0.13.1 / torch functions (nemo glue layer).

Site-packages are never edited. Every replacement nemo_tiedlora makes at run time is one `Patch` in
`table.PATCHES`: a ``fix`` for an upstream defect (named with the upstream file it lives in) or a ``hook`` through
which Tied-LoRA plugs into NeMo; each with its target(s), its scope (when it is in force, e.g. "process-wide,
CPU-only runs") and a ``needed()`` test of the upstream condition, so a fix is installed only where its defect is
present; where ``needed()`` cannot read the upstream it inspects, `CompatUnknownUpstream` is raised (no
fix is installed blind). Every replacement of an existing upstream attribute goes through `patch.replace`.
Areas (the fixes' modules):

- ``environment``: NeMo's 1.x NLP collection outside NVIDIA's PyTorch container (no apex, no TransformerEngine,
  no ``NVIDIA_PYTORCH_VERSION``). Applies on CPU and GPU machines alike; inside the container none is needed.
- ``mcore``: NeMo 2.4.1 against megatron-core 0.13 (both on GPU and CPU).
- ``lightning`` / ``nemo`` (`training_state`): NeMo 2.4.1's resume and PEFT-checkpoint bookkeeping (everywhere).
- ``cpu``: CUDA-only calls on a machine without a CUDA device; ``needed()`` is false wherever
  ``torch.cuda.is_available()``, so the GPU path stays untouched by CPU-only fixes.
- ``tiedlora``: our hooks (`injection`, `grad_hooks`, `adapter_io`, `logs`); other models pass through them.

``apply()`` is idempotent and returns the patches in force; ``python -m nemo_tiedlora compat`` prints `describe()`.
"""

from __future__ import annotations

import logging

from nemo_tiedlora.nemo.compat.patch import FIX, HOOK, CompatUnknownUpstream, Patch, evaluate
from nemo_tiedlora.nemo.compat.table import PATCHES

__all__ = ["FIX", "HOOK", "PATCHES", "CompatUnknownUpstream", "Patch", "applied", "apply", "describe", "needed"]

logger = logging.getLogger(__name__)

_APPLIED: dict[str, Patch] = {}
_NEEDED: dict[str, bool] = {}  # needed() as first evaluated (a fix can make its own condition disappear)
_APPLYING: list[bool] = []  # apply() in progress (its installs import NeMo, which can call apply() again)


def needed(patch: Patch) -> bool:
    """Whether `patch`'s upstream condition holds here (evaluated once per process); `CompatUnknownUpstream`
    when its ``needed()`` cannot read the upstream it inspects."""
    if patch.name not in _NEEDED:
        _NEEDED[patch.name] = evaluate(patch)
    return _NEEDED[patch.name]


def apply(*, on_demand: tuple[str, ...] = ()) -> list[Patch]:
    """Install every patch whose condition holds here (idempotent), plus the named on-demand ones; return the
    patches in force."""
    unknown = set(on_demand) - {patch.name for patch in PATCHES if patch.on_demand}
    if unknown:
        raise ValueError(f"unknown on-demand patches {sorted(unknown)}: choose among "
                         f"{sorted(patch.name for patch in PATCHES if patch.on_demand)}")
    if _APPLYING:
        return list(_APPLIED.values())  # the outer apply() goes on with the rest
    _APPLYING.append(True)
    try:
        for patch in PATCHES:
            if patch.name in _APPLIED or (patch.on_demand and patch.name not in on_demand):
                continue
            if needed(patch):
                patch.install()
                _APPLIED[patch.name] = patch
                logger.debug("nemo_tiedlora compat: installed %s (%s)", patch.name, patch.reason)
    finally:
        _APPLYING.clear()
    return list(_APPLIED.values())


def applied() -> list[Patch]:
    """The patches installed in this process so far."""
    return list(_APPLIED.values())


def describe() -> str:
    """Plain text: every patch with its kind, scope, target(s), whether it is needed / installed here, and why."""
    lines = [f"{len(PATCHES)} runtime replacements of NeMo / megatron-core / torch functions "
             f"({sum(p.kind == FIX for p in PATCHES)} fixes of upstream defects, "
             f"{sum(p.kind == HOOK for p in PATCHES)} hooks of Tied-LoRA)", ""]
    for patch in PATCHES:
        if patch.name in _NEEDED:
            is_needed = "yes" if _NEEDED[patch.name] else "no"
        else:
            try:
                is_needed = "yes" if needed(patch) else "no"
            except Exception as error:  # noqa: BLE001 - a listing must not fail on one probe
                is_needed = f"unknown ({type(error).__name__}: {error})"
        installed = "yes" if patch.name in _APPLIED else ("on demand" if patch.on_demand else "no")
        lines += [
            f"{patch.name}  [{patch.kind}, {patch.area}]  needed here: {is_needed}  installed: {installed}",
            f"    scope:  {patch.scope}",
            *(f"    target: {target}" for target in patch.target),
            f"    reason: {patch.reason}",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"

"""What one runtime replacement of a NeMo / megatron-core / torch function is (nemo glue layer): `Patch`.

Every entry of `nemo_tiedlora.nemo.compat.table.PATCHES` is a `Patch` built with keywords. Two kinds:

- ``fix``: works around an upstream defect, named with the upstream file it lives in; ``needed()`` tests the
  upstream behaviour, signature or environment that makes the fix necessary (false: the fix is not installed).
- ``hook``: how Tied-LoRA plugs into NeMo (no defect); ``needed()`` checks that the hooked function exists.

Helpers shared by the fixes' ``needed()`` tests live here too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable

FIX = "fix"
HOOK = "hook"

# When (in which processes and for how long) a patch is in force.
ALWAYS = "process-wide, wherever the upstream condition holds"
CPU_ONLY = "process-wide, CPU-only runs (no CUDA device)"
CPU_DIST_OPT_CALLS = ("on demand (optim.name=mcore_distributed_optim on CPU); torch.Tensor.type is rebound only "
                      "during megatron's optimizer constructors and gradient clipping")
TIEDLORA_ONLY = "process-wide; acts on Tied-LoRA models only (every other model passes through unchanged)"
IMPORT_HF_ONLY = "process-wide; acts on .nemo archives written by import-hf only (other tokenizers unchanged)"
LOGGING_ONLY = "process-wide; changes logging only"
ENVIRONMENT = "process environment (os.environ), set once"

AREAS = ("environment", "mcore", "lightning", "nemo", "cpu", "tiedlora")


@dataclass(frozen=True, kw_only=True)
class Patch:
    """One runtime replacement of an upstream function (or attribute)."""

    name: str
    target: tuple[str, ...]  # what is replaced: "module:qualname" (module.attr), one entry per replaced name
    kind: str  # FIX | HOOK
    area: str  # one of AREAS: the upstream component (or "tiedlora" for our hooks)
    scope: str  # when it is in force (ALWAYS, CPU_ONLY, TIEDLORA_ONLY, ...)
    reason: str  # fix: the upstream defect with its file; hook: what Tied-LoRA needs from the hooked function
    needed: Callable[[], bool]
    install: Callable[[], None]
    on_demand: bool = False  # installed by apply(on_demand=(name,)) for the runs that need it, not by apply()

    def __post_init__(self) -> None:
        if self.kind not in (FIX, HOOK):
            raise ValueError(f"{self.name}: kind must be {FIX!r} or {HOOK!r}, not {self.kind!r}")
        if self.area not in AREAS:
            raise ValueError(f"{self.name}: area must be one of {AREAS}, not {self.area!r}")
        if not self.target or any(":" not in target for target in self.target):
            raise ValueError(f"{self.name}: every target is 'module:qualname', got {self.target!r}")


def lazy(path: str) -> Callable[[], Any]:
    """A callable for "module:function", imported only when called (the table imports no NeMo by itself)."""
    module_name, _, function = path.partition(":")

    def call() -> Any:
        return getattr(importlib.import_module(module_name), function)()

    call.__qualname__ = f"lazy({path})"
    return call


def resolve(target: str) -> Any:
    """The object a "module:qualname" target names (AttributeError / ImportError when it does not exist)."""
    module_name, _, qualname = target.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def exists(*targets: str) -> Callable[[], bool]:
    """``needed()`` of a hook: every hooked function exists upstream."""
    def check() -> bool:
        try:
            return all(callable(resolve(target)) for target in targets)
        except (ImportError, AttributeError):
            return False

    return check


ORIGINAL = "_nemo_tiedlora_original"  # set on each of our wrappers: the function it replaced (not ``__wrapped__``,
# which would change what inspect.signature reports to upstream code)


HOOK_MARK = "_nemo_tiedlora"  # set on each Tied-LoRA hook wrapper (idempotent installs)


def marked(wrapper: Callable, replaced: Callable) -> Callable:
    """`wrapper` tagged as our hook around `replaced` (see `original`)."""
    setattr(wrapper, HOOK_MARK, True)
    setattr(wrapper, ORIGINAL, replaced)
    return wrapper


def wrap_once(owner: Any, attr: str, wrap: Callable[[Callable], Callable]) -> None:
    """``owner.attr = wrap(owner.attr)`` unless it is already one of our hooks."""
    current = getattr(owner, attr)
    if not getattr(current, HOOK_MARK, False):
        setattr(owner, attr, wrap(current))


def original(function: Any) -> Any:
    """The upstream function behind our wrappers, to test upstream behaviour after install."""
    while True:
        behind = getattr(function, ORIGINAL, None) or getattr(function, "__wrapped__", None)
        if behind is None:
            return function
        function = behind


def source(function: Any) -> str:
    """The upstream source of `function` ('' when it cannot be read, e.g. a bytecode-only install)."""
    try:
        return inspect.getsource(original(function))
    except (OSError, TypeError):
        return ""


def have_module(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

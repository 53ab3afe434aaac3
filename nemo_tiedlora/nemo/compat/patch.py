"""What one runtime replacement of a NeMo / megatron-core / torch function is (nemo glue layer): `Patch`.

Every entry of `nemo_tiedlora.nemo.compat.table.PATCHES` is a `Patch` built with keywords. Two kinds:

- ``fix``: works around an upstream defect, named with the upstream file it lives in; ``needed()`` tests the
  upstream behaviour, signature or environment that makes the fix necessary (false: the fix is not installed).
- ``hook``: how Tied-LoRA plugs into NeMo (no defect); ``needed()`` checks that the hooked function exists.

Every replacement of an existing upstream attribute goes through `replace` (records the original, installs once,
`undo` reverts). A fix's ``needed()`` that cannot read the upstream it inspects raises `CompatUnknownUpstream`
(never installs blind); `evaluate` is how ``needed()`` is called. Helpers shared by the ``needed()`` tests live here
too.
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


def owner_and_name(target: str) -> tuple[Any, str]:
    """The object that holds a "module:qualname" target, and the target's attribute name on it."""
    module_name, _, qualname = target.partition(":")
    path, _, attr = qualname.rpartition(".")
    owner: Any = importlib.import_module(module_name)
    for part in filter(None, path.split(".")):
        owner = getattr(owner, part)
    return owner, attr


def exists(*targets: str) -> Callable[[], bool]:
    """``needed()`` of a hook: every hooked function exists upstream."""
    def check() -> bool:
        try:
            return all(callable(resolve(target)) for target in targets)
        except (ImportError, AttributeError):
            return False

    return check


ORIGINAL = "_nemo_tiedlora_original"  # set on each of our replacement functions: what it replaced (not
# ``__wrapped__``, which would change what inspect.signature reports to upstream code)
MARK = "_nemo_tiedlora_fix"  # set on each of our replacement functions (see `is_replacement`)


@dataclass(frozen=True)
class _Replaced:
    replacement: Any
    own: Any  # the owner's own entry before (vars(owner)[attr]); _ABSENT when it had none


_ABSENT = object()
_REPLACED: dict[tuple[Any, str], _Replaced] = {}  # (owner, attr) -> what `replace` put there


def _next_in_mro(owner: type, attr: str) -> Callable:
    """A method that calls what `attr` is after `owner` in the instance's MRO (`owner` defines no `attr`)."""
    def inherited(self, *args, **kwargs):
        return getattr(super(owner, self), attr)(*args, **kwargs)

    inherited.__name__ = attr
    inherited.__qualname__ = f"super({owner.__qualname__}).{attr}"
    return inherited


def replace(owner: Any, attr: str, make: Callable[[Any], Any]) -> Any:
    """Set ``owner.attr = make(original)`` once and return what is in force (installing twice is a no-op).

    `original` is what ``owner.attr`` was: the replacement chains to it where the upstream code still has to run.
    A class that does not define `attr` itself (a mixin) gets, as `original`, a method calling the next definition
    in the instance's MRO (what ran before). A replacement function is tagged with `MARK` and `ORIGINAL` (so
    `original` and `is_replacement` see through it); other objects (torch's tensor classes) are recorded only
    here. `undo` puts the owner's own entry back.
    """
    done = _REPLACED.get((owner, attr))
    if done is not None and vars(owner).get(attr, _ABSENT) is done.replacement:
        return done.replacement
    own = vars(owner).get(attr, _ABSENT)
    if own is _ABSENT and isinstance(owner, type):
        before = _next_in_mro(owner, attr)
    else:
        before = getattr(owner, attr)  # AttributeError: nothing to replace
    replacement = make(before)
    if inspect.isfunction(replacement):
        setattr(replacement, MARK, True)
        setattr(replacement, ORIGINAL, before)
    _REPLACED[(owner, attr)] = _Replaced(replacement, own)
    setattr(owner, attr, replacement)
    return replacement


def replaced(owner: Any, attr: str) -> bool:
    """Whether ``owner.attr`` is what `replace` put there."""
    done = _REPLACED.get((owner, attr))
    return done is not None and vars(owner).get(attr, _ABSENT) is done.replacement


def undo(owner: Any, attr: str) -> None:
    """Put back the owner's own ``attr`` that `replace` replaced (or remove ours where it had none)."""
    done = _REPLACED.pop((owner, attr), None)
    if done is None or vars(owner).get(attr, _ABSENT) is not done.replacement:
        return
    if done.own is _ABSENT:
        delattr(owner, attr)
    else:
        setattr(owner, attr, done.own)


def upstream_own(owner: type, attr: str) -> Any:
    """The class's own upstream definition of `attr` (behind our replacement); None where it defines none."""
    done = _REPLACED.get((owner, attr))
    own = vars(owner).get(attr, _ABSENT)
    if done is not None and own is done.replacement:
        own = done.own
    return None if own is _ABSENT else own


def is_replacement(function: Any) -> bool:
    """Whether `function` is one of our replacement functions."""
    return bool(getattr(function, MARK, False))


def original(function: Any) -> Any:
    """The upstream function behind our replacements, to test upstream behaviour after install."""
    while True:
        behind = getattr(function, ORIGINAL, None) or getattr(function, "__wrapped__", None)
        if behind is None:
            return function
        function = behind


class CompatUnknownUpstream(RuntimeError):
    """A fix's ``needed()`` cannot tell whether the installed NeMo / megatron-core has the defect it fixes.

    Raised instead of installing the fix blind; the message names the patch, what could not be read and the
    installed versions.
    """

    def __init__(self, what: str, patch: str = "") -> None:
        self.what, self.patch = what, patch
        super().__init__(
            f"compat patch {patch or '?'}: cannot tell whether its upstream defect is present: {what} (installed: "
            f"{installed_versions()}; nemo_tiedlora's fixes are written for nemo_toolkit 2.4.1, megatron-core "
            f"0.13.1): install those versions, or check this patch against the installed code and update its "
            f"needed() in nemo_tiedlora/nemo/compat/")


def installed_versions() -> str:
    """'nemo_toolkit X, megatron-core Y' as installed here."""
    import importlib.metadata

    versions = []
    for dist in ("nemo_toolkit", "megatron-core"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    return ", ".join(versions)


def evaluate(patch: Patch) -> bool:
    """``patch.needed()``; an upstream it cannot read, or missing what it inspects, raises
    `CompatUnknownUpstream` naming the patch (hooks' `exists` answer False for a missing target instead)."""
    try:
        return bool(patch.needed())
    except CompatUnknownUpstream as error:
        if error.patch:
            raise
        raise CompatUnknownUpstream(error.what, patch.name) from error
    except (ImportError, AttributeError) as error:
        raise CompatUnknownUpstream(f"{type(error).__name__}: {error}", patch.name) from error


def source(function: Any) -> str:
    """The upstream source of `function` (behind our replacements); `CompatUnknownUpstream` when it cannot be
    read (e.g. a bytecode-only install)."""
    upstream = original(function)
    try:
        return inspect.getsource(upstream)
    except (OSError, TypeError) as error:
        name = f"{getattr(upstream, '__module__', '?')}.{getattr(upstream, '__qualname__', upstream)!s}"
        raise CompatUnknownUpstream(f"cannot read the source of {name} ({error})") from error


def have_module(name: str) -> bool:
    """Whether `name` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

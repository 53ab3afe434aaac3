"""Register the `tiedlora` PEFT scheme with NeMo as soon as NeMo's PEFT modules exist (nemo glue layer; it imports no
NeMo itself).

Importing `nemo_tiedlora` must be enough to make `model.peft.peft_scheme=tiedlora` work, and
``from nemo.collections.nlp.parts.peft_config import PEFT_CONFIG_MAP`` must then hold ``tiedlora``; yet the
pure-torch core must not pay NeMo's ~10 s import. So an import hook runs, right after each of two NeMo modules
finishes importing (or at once if it already has):

- ``nemo.collections.nlp.parts.peft_config`` (``PEFT_CONFIG_MAP``): the map entry (`nemo_tiedlora.nemo.peft`);
- ``nemo.collections.nlp.parts.mixins.nlp_adapter_mixins`` (the last module of NeMo's PEFT chain, imported by
  every NeMo model): the whole `nemo_tiedlora.nemo.setup()` (compatibility fixes, Tied-LoRA's hooks, the entry).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Callable

PEFT_CONFIG = "nemo.collections.nlp.parts.peft_config"
ADAPTER_MIXINS = "nemo.collections.nlp.parts.mixins.nlp_adapter_mixins"


def _register_scheme() -> None:
    from nemo_tiedlora.nemo.peft import register

    register()


def _setup() -> None:
    from nemo_tiedlora.nemo import setup

    setup()  # returns at once when setup() itself is importing NeMo (it registers when that import is done)


_ACTIONS: dict[str, Callable[[], None]] = {PEFT_CONFIG: _register_scheme, ADAPTER_MIXINS: _setup}


class _LoaderWithHook(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, action: Callable[[], None]) -> None:
        self._loader = loader
        self._action = action

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._action()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        action = _ACTIONS.get(fullname)
        if action is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderWithHook(spec.loader, action)
        return spec


def install() -> None:
    """Register now for what NeMo has already imported, else once it is imported (idempotent)."""
    if ADAPTER_MIXINS in sys.modules:
        _setup()
    elif PEFT_CONFIG in sys.modules:
        _register_scheme()
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())

"""Register the `tiedlora` PEFT scheme with NeMo as soon as NeMo's adapter mixins exist.

Importing `nemo_tiedlora` must be enough to make `model.peft.peft_scheme=tiedlora` work (issue: "registered by the
package itself"), yet the pure-torch core must not pay NeMo's ~10 s import. So the registration runs right after
`nemo.collections.nlp.parts.mixins.nlp_adapter_mixins` finishes importing (the last module of NeMo's PEFT chain:
`PEFT_CONFIG_MAP` and `NLPAdapterModelMixin` are complete then), or at once if it already has.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TRIGGER = "nemo.collections.nlp.parts.mixins.nlp_adapter_mixins"


def _register() -> None:
    if "nemo_tiedlora.nemo.peft" in sys.modules:
        return  # nemo_tiedlora.nemo.setup() is importing NeMo itself and registers when that import is done
    from nemo_tiedlora.nemo import setup

    setup()


class _LoaderWithHook(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderWithHook(spec.loader)
        return spec


def install() -> None:
    """Register now if NeMo's adapter mixins are loaded, else once they are (idempotent)."""
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())

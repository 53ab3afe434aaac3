"""Everything that imports NeMo: compatibility fixes, the `tiedlora` PEFT scheme, model hooks.

`setup()` applies the compatibility fixes this machine needs and registers the scheme; importing
`nemo_tiedlora` already arranges the registration for whenever NeMo's adapter mixins are imported.
"""

from __future__ import annotations


def setup() -> list:
    """Apply the needed compatibility fixes and register `tiedlora` with NeMo; return the fixes in force."""
    from nemo_tiedlora.nemo import compat, logs

    logs.install()
    fixes = compat.apply()
    from nemo_tiedlora.nemo.peft import register

    register()
    return fixes

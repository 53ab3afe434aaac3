"""The NeMo glue layer: everything that imports NeMo or megatron-core.

It sits above the pure-torch core and formats and below the tools. Modules, by job:

- `peft`: registration, the `tiedlora` PEFT config class and its ``PEFT_CONFIG_MAP`` entry;
- `adapters`: Tied-LoRA presented as NeMo adapter modules; `find_adapters`: finding them in a model;
- `injection`: wrapping ``linear_qkv`` in front of NeMo's ``add_adapter``; `grad_hooks`: the adapter's gradient
  sums in NeMo's step; `grad_sync` / `replica_check`: those sums and the bitwise check of the replicas;
  `adapter_io` / `adapter_state` / `summary`: save, load, gather and count the adapter;
- `compat`: THE table of every runtime replacement of a NeMo / megatron-core / torch function (fixes and the
  hooks above), `launch`: process groups and relaunch, `logs`: what the user reads.

`setup()` installs the patches this machine needs and registers the scheme; importing `nemo_tiedlora` already
arranges both for whenever NeMo's PEFT modules are imported (`nemo_tiedlora._autoregister`).
"""

from __future__ import annotations

_RUNNING: list[bool] = []  # setup() in progress: its own NeMo imports must not start it again


def setup() -> list:
    """Install the needed patches (compatibility fixes and Tied-LoRA's hooks) and register `tiedlora` with NeMo;
    return the patches in force (idempotent)."""
    from nemo_tiedlora.nemo import compat

    if _RUNNING:
        return compat.applied()
    _RUNNING.append(True)
    try:
        from nemo_tiedlora.nemo import logs

        logs.install()
        patches = compat.apply()
        from nemo_tiedlora.nemo.peft import register

        register()
        return patches
    finally:
        _RUNNING.clear()

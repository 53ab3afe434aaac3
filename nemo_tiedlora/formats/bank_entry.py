"""An adapter's logical state as an entry of ``core.bank.AdapterBank`` (formats layer: pure torch).

Tied presets keep their one ``A`` and ``B`` and give per-layer ``u`` and ``s * v`` (zeros for the layers the adapter
does not adapt); the untied ``lora`` preset gives its per-layer ``diag(u_l) A_l`` and ``s diag(v_l) B_l``
(``merge_delta.per_layer_lora``). Keys and their checks: ``formats.adapter_keys``, ``merge_delta``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from nemo_tiedlora.core.bank import BankAdapter
from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.formats.adapter_archive import AdapterArchive
from nemo_tiedlora.formats.adapter_keys import layer_key
from nemo_tiedlora.formats.merge_delta import per_layer_lora


def bank_adapter(state: Mapping[str, Tensor], cfg: TiedLoraConfig, *, num_layers: int) -> BankAdapter:
    """The bank entry of the logical adapter `state` trained with `cfg` for a base of `num_layers` layers."""
    # every key and shape checked, and the per-layer factors of an untied adapter, in float32
    factors = per_layer_lora({key: value.float() for key, value in state.items()}, cfg)
    beyond = sorted(n for n in factors if n > num_layers)
    if beyond:
        raise TiedLoraConfigError(f"the adapter adapts layers {beyond} but the base has {num_layers} layers: serve it "
                                  "with the base it was trained on")
    family = cfg.preset or ("tied" if cfg.flags.tied else "untied")
    if cfg.flags.tied:
        a, b = state["A"].float(), state["B"].float()  # [r, d], [out, r]
        u = torch.zeros(num_layers, a.shape[0])
        v = torch.zeros(num_layers, b.shape[0])
        for n in factors:
            u[n - 1] = state[layer_key(n, "u")].float()
            v[n - 1] = cfg.scale * state[layer_key(n, "v")].float()
        return BankAdapter(a=a, b=b, u=u, v=v, family=family)
    some_a, some_b = next(iter(factors.values()))
    a = torch.zeros(num_layers, *some_a.shape)
    b = torch.zeros(num_layers, *some_b.shape)
    for n, (a_l, b_l) in factors.items():
        a[n - 1], b[n - 1] = a_l, b_l
    return BankAdapter(a=a, b=b, u=None, v=None, family=family)


def archive_bank_adapter(archive: AdapterArchive) -> BankAdapter:
    """The bank entry of a loaded adapter archive (its tensors were validated against its config and shape)."""
    return bank_adapter(archive.tensors, archive.config, num_layers=int(archive.shape["num_layers"]))

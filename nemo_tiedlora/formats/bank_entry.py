"""Adapter archives as entries of ``core.bank.AdapterBank`` (formats layer: pure torch): one state, or a folder or
list of ``.nemo`` archives loaded into a bank for one base.

Tied presets keep their one ``A`` and ``B`` and give per-layer ``u`` and ``s * v`` (zeros for the layers the adapter
does not adapt); the untied ``lora`` preset gives its per-layer ``diag(u_l) A_l`` and ``s diag(v_l) B_l``
(``merge_delta.per_layer_lora``). Keys and their checks: ``formats.adapter_keys``, ``merge_delta``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from nemo_tiedlora.core.bank import AdapterBank, BankAdapter, BankShape
from nemo_tiedlora.core.config import TiedLoraConfig
from nemo_tiedlora.core.errors import TiedLoraCheckpointError, TiedLoraConfigError
from nemo_tiedlora.formats.adapter_archive import AdapterArchive, check_base_shape, load_archive
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


def is_adapter_set(value: Any) -> bool:
    """Whether `value` (``model.peft.restore_from_path``) names several adapters: a folder or a list of files."""
    return bool(value) and (not isinstance(value, (str, Path)) or Path(value).is_dir())


def adapter_files(spec: str | Path | Sequence[str | Path]) -> dict[str, Path]:
    """``{name: path}`` of the adapter archives `spec` names: a folder (its ``*.nemo`` files), one file or a list of
    files; the name of each is its file name without ``.nemo``. Two files with one name are refused."""
    paths: list[Path] = []
    for item in ([spec] if isinstance(spec, (str, Path)) else list(spec)):
        item = Path(item)
        if item.is_dir():
            found = sorted(item.glob("*.nemo"))
            if not found:
                raise TiedLoraConfigError(f"no adapter .nemo files in {item}: point at a folder of adapter archives")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise TiedLoraConfigError(f"adapter {item} does not exist: give adapter .nemo files or a folder of them")
    named: dict[str, Path] = {}
    for path in paths:
        name = path.name[: -len(".nemo")] if path.name.endswith(".nemo") else path.name
        if name in named:
            raise TiedLoraConfigError(f"two adapters are named {name!r} ({named[name]}, {path}): rename one file")
        named[name] = path
    return named


def load_bank(files: Mapping[str, Path], base_shape: Mapping[str, int], *, max_rank: Optional[int] = None,
              dtype: torch.dtype = torch.float32, progress: Optional[Callable[[str], None]] = None) -> AdapterBank:
    """An AdapterBank for the base of `base_shape` holding every archive of `files` (validated, shape-checked);
    `max_rank` defaults to the highest rank among them (then every archive is read before the bank is built; with
    `max_rank` given they stream in one at a time). `progress(name)` is called after each adapter is in."""
    shape = BankShape(int(base_shape["hidden_size"]), int(base_shape["num_layers"]), int(base_shape["out_features"]))
    read = {name: read_for_base(name, path, base_shape) for name, path in files.items()} if max_rank is None else None
    rank = max_rank or max((archive.config.rank for archive in read.values()), default=8)
    bank = AdapterBank(shape, max_rank=rank, capacity=max(len(files), 1), dtype=dtype)
    for name, path in files.items():
        archive = read.pop(name) if read is not None else read_for_base(name, path, base_shape)
        bank.add(name, archive_bank_adapter(archive))
        if progress is not None:
            progress(name)
    return bank


def read_for_base(name: str, path: Path, base_shape: Mapping[str, int]) -> AdapterArchive:
    """The archive at `path`, validated, refused (naming `name` and the file) if made for another base shape."""
    archive = load_archive(path)
    try:
        check_base_shape(archive.shape, base_shape)
    except TiedLoraCheckpointError as error:
        raise TiedLoraCheckpointError(f"adapter {name!r} ({path}): {error}") from None
    return archive

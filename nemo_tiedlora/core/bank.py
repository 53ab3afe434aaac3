"""Many adapters of one base, resident together, and the update of a batch that mixes them (pure torch).

Every adapter of the family is, per layer l, ``z = W_l x + v'_l * (B_l (u_l * (A_l x)))`` with the scale folded
into ``v'_l = s * v_l``. A tied adapter (every preset but ``lora``) has one ``A [r, d]`` and ``B [out, r]`` for all
layers; an untied one (``lora``) has its own per layer. The bank stacks them by kind:

- tied slots: ``A [K, R, d]``, ``B [K, out, R]``, ``u [K, L, R]``, ``v' [K, L, out]``;
- untied slots (allocated when the first such adapter arrives): ``A [K', L, R, d]``, ``B [K', L, out, R]``, with
  ``u`` and ``s * v`` folded into them (``functional.per_layer_lora_factors``).

``R`` is the bank's ``max_rank``: an adapter of a lower rank is stored zero-padded, which leaves its update exactly
as it was (the padded rows of A and columns of B contribute zeros), so ranks and presets mix in one bank. A layer an
adapter does not adapt (``layer_selection``) has ``u = v' = 0`` there. Slots are preallocated (``capacity``, doubled
when full); adding or removing an adapter writes or clears one slot, the others stay where they are.

For a batch, :meth:`AdapterBank.gather` takes one adapter name per sequence (None: the plain base) and gathers the
tied ``A`` and ``B`` once (``[n, R, d]``, ``[n, out, R]``), shared by every layer of that forward; per layer only
``u_l``, ``v'_l`` are gathered (``[n, R]``, ``[n, out]``). :meth:`BankBatch.update` is then two batched matmuls for
the whole batch, whatever the mix, with no Python loop over adapters. Rows on untied adapters take a second pair of
batched matmuls with their per-layer factors; it is skipped when no row uses one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nemo_tiedlora.core.errors import TiedLoraConfigError


@dataclass(frozen=True)
class BankShape:
    """The base an adapter bank serves: hidden size ``d``, ``L`` layers, QKV output width ``out``."""

    hidden_size: int
    num_layers: int
    out_features: int

    def text(self) -> str:
        return f"hidden_size={self.hidden_size}, num_layers={self.num_layers}, qkv out={self.out_features}"


@dataclass
class BankAdapter:
    """One adapter's factors as the bank stores them (full size, unpadded, scale folded into ``v``).

    Tied: ``a [r, d]``, ``b [out, r]``, ``u [L, r]``, ``v [L, out]`` (``s * v_l``; zero rows for layers it does not
    adapt). Untied: ``a [L, r, d]``, ``b [L, out, r]`` (``diag(u_l) A_l`` and ``s * diag(v_l) B_l``), ``u``/``v``
    None. ``family`` names the preset family for messages (e.g. ``tl6``)."""

    a: Tensor
    b: Tensor
    u: Optional[Tensor]
    v: Optional[Tensor]
    family: str = "tied"

    @property
    def tied(self) -> bool:
        return self.u is not None

    @property
    def rank(self) -> int:
        return int(self.a.shape[-2])

    def shape(self) -> BankShape:
        return BankShape(int(self.a.shape[-1]), int(self.u.shape[0] if self.tied else self.a.shape[0]),
                         int(self.b.shape[-2]))

    def numel(self) -> int:
        """How many numbers the adapter's own factors hold."""
        return sum(t.numel() for t in (self.a, self.b, self.u, self.v) if t is not None)


class AdapterBank:
    """K adapters of one base (see the module docstring), addressed by name."""

    def __init__(self, shape: BankShape, *, max_rank: int, capacity: int = 8, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> None:
        if max_rank < 1 or capacity < 1:
            raise TiedLoraConfigError(f"max_rank and capacity must be positive, got {max_rank}, {capacity}")
        self.shape, self.max_rank, self.dtype = shape, int(max_rank), dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        d, layers, out, rank = shape.hidden_size, shape.num_layers, shape.out_features, self.max_rank
        zeros = lambda *size: torch.zeros(*size, dtype=dtype, device=self.device)  # noqa: E731
        self._zeros = zeros
        self.tied_a, self.tied_b = zeros(capacity, rank, d), zeros(capacity, out, rank)
        self.tied_u, self.tied_v = zeros(capacity, layers, rank), zeros(capacity, layers, out)
        self.untied_a: Optional[Tensor] = None  # [K', L, R, d], allocated with the first untied adapter
        self.untied_b: Optional[Tensor] = None  # [K', L, out, R]
        self._slots: dict[str, tuple[bool, int]] = {}  # name -> (tied?, slot)
        self._free: dict[bool, list[int]] = {True: list(range(capacity)), False: []}
        self._bytes: dict[str, int] = {}

    # ---- membership -------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def adapter_bytes(self, name: Optional[str] = None) -> int:
        """Bytes of one adapter's own factors at the bank's dtype (unpadded), or of all resident adapters."""
        return self._bytes[name] if name is not None else sum(self._bytes.values())

    def check(self, name: str, adapter: BankAdapter) -> None:
        """Raise TiedLoraConfigError, naming the adapter and the reason, if `adapter` cannot join this bank."""
        if not name or not isinstance(name, str):
            raise TiedLoraConfigError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._slots:
            raise TiedLoraConfigError(f"adapter {name!r} is already loaded: unload it first or use another name")
        if adapter.shape() != self.shape:
            raise TiedLoraConfigError(
                f"adapter {name!r} was trained for another base ({adapter.shape().text()}); this server's base has "
                f"{self.shape.text()}: serve it with the base it was trained on")
        if adapter.rank > self.max_rank:
            raise TiedLoraConfigError(
                f"adapter {name!r} has rank {adapter.rank}, above the bank's max rank {self.max_rank}: raise "
                f"--max-lora-rank to at least {adapter.rank}")

    def add(self, name: str, adapter: BankAdapter) -> None:
        """Store `adapter` under `name` in a free slot (growing the bank when full)."""
        self.check(name, adapter)
        slot = self._take_slot(adapter.tied)
        r = adapter.rank
        cast = lambda t: t.to(device=self.device, dtype=self.dtype)  # noqa: E731
        if adapter.tied:
            self.tied_a[slot].zero_()[:r] = cast(adapter.a)
            self.tied_b[slot].zero_()[:, :r] = cast(adapter.b)
            self.tied_u[slot].zero_()[:, :r] = cast(adapter.u)
            self.tied_v[slot] = cast(adapter.v)
        else:
            self.untied_a[slot].zero_()[:, :r] = cast(adapter.a)
            self.untied_b[slot].zero_()[:, :, :r] = cast(adapter.b)
        self._slots[name] = (adapter.tied, slot)
        self._bytes[name] = adapter.numel() * self.tied_a.element_size()

    def remove(self, name: str) -> None:
        """Drop adapter `name`; its slot is zeroed and reused by the next add."""
        if name not in self._slots:
            raise KeyError(name)
        tied, slot = self._slots.pop(name)
        del self._bytes[name]
        for tensor in ((self.tied_a, self.tied_b, self.tied_u, self.tied_v) if tied
                       else (self.untied_a, self.untied_b)):
            tensor[slot].zero_()
        self._free[tied].append(slot)

    def _take_slot(self, tied: bool) -> int:
        if not self._free[tied]:
            self._grow(tied)
        return self._free[tied].pop(0)

    def _grow(self, tied: bool) -> None:
        """Double the slots of one kind (the resident adapters keep their slots)."""
        d, layers, out, rank = self.shape.hidden_size, self.shape.num_layers, self.shape.out_features, self.max_rank
        if tied:
            old = self.tied_a.shape[0]
            grow = lambda t: torch.cat([t, torch.zeros_like(t)])  # noqa: E731
            self.tied_a, self.tied_b = grow(self.tied_a), grow(self.tied_b)
            self.tied_u, self.tied_v = grow(self.tied_u), grow(self.tied_v)
        else:
            old = 0 if self.untied_a is None else self.untied_a.shape[0]
            new = max(old, 1)
            extra_a, extra_b = self._zeros(new, layers, rank, d), self._zeros(new, layers, out, rank)
            self.untied_a = extra_a if self.untied_a is None else torch.cat([self.untied_a, extra_a])
            self.untied_b = extra_b if self.untied_b is None else torch.cat([self.untied_b, extra_b])
        self._free[tied].extend(range(old, (self.tied_a if tied else self.untied_a).shape[0]))

    # ---- a batch ------------------------------------------------------------------------------------------------
    def gather(self, names: Sequence[Optional[str]], *, out_rows: Optional[slice] = None) -> BankBatch:
        """The factors of a batch whose sequence i uses adapter ``names[i]`` (None: the base alone). `out_rows`:
        only these rows of the output (a tensor-parallel rank's partition of the fused QKV output)."""
        unknown = sorted({name for name in names if name is not None and name not in self._slots})
        if unknown:
            raise KeyError(unknown[0])
        tied_rows = [self._slots[name][1] if name is not None and self._slots[name][0] else -1 for name in names]
        untied_rows = [self._slots[name][1] if name is not None and not self._slots[name][0] else -1 for name in names]
        return BankBatch(self, _rows(tied_rows, self.device), _rows(untied_rows, self.device),
                         out_rows=out_rows or slice(None), rows=len(names))


def _rows(slots: list[int], device: torch.device) -> Optional[tuple[Tensor, Tensor]]:
    """(slot index clamped to 0, keep mask [n, 1, 1]) for the rows using a slot of one kind; None when none does."""
    if all(slot < 0 for slot in slots):
        return None
    index = torch.tensor(slots, dtype=torch.long, device=device)
    return index.clamp(min=0), (index >= 0).view(-1, 1, 1)


class BankBatch:
    """The gathered factors of one batch; :meth:`update` computes the adapters' contribution for any layer."""

    def __init__(self, bank: AdapterBank, tied: Optional[tuple[Tensor, Tensor]],
                 untied: Optional[tuple[Tensor, Tensor]], *, out_rows: slice, rows: int) -> None:
        self.bank, self._tied, self._untied, self.out_rows, self.rows = bank, tied, untied, out_rows, rows
        self.out_features = len(range(bank.shape.out_features)[out_rows])
        if tied is not None:
            index, keep = tied
            self.a = bank.tied_a.index_select(0, index)  # [n, R, d]: once per forward, every layer reuses it
            # [n, out, R] (this rank's rows); zero for the rows of the batch not on a tied adapter
            self.b = bank.tied_b[:, out_rows].index_select(0, index) * keep

    def update(self, x: Tensor, layer: int, *, batch_dim: int = 0) -> Tensor:
        """The adapters' contribution for input ``x`` of 1-based `layer`: ``[..., out]`` shaped like ``x`` but for
        its last dimension, sequence i of the batch (``x``'s dimension `batch_dim`) through its own adapter."""
        rows = x.movedim(batch_dim, 0)
        n = rows.shape[0]
        flat = rows.reshape(n, -1, rows.shape[-1]).to(self.bank.dtype)  # [n, t, d]
        out = flat.new_zeros(n, flat.shape[1], self.out_features)
        if self._tied is not None:
            index, _ = self._tied
            u = self.bank.tied_u[:, layer - 1].index_select(0, index)  # [n, R]
            v = self.bank.tied_v[:, layer - 1, self.out_rows].index_select(0, index)  # [n, out]
            g = torch.bmm(flat, self.a.transpose(1, 2)) * u.unsqueeze(1)  # [n, t, R]
            out = torch.bmm(g, self.b.transpose(1, 2)) * v.unsqueeze(1)  # [n, t, out]
        if self._untied is not None:
            index, keep = self._untied
            a = self.bank.untied_a[:, layer - 1].index_select(0, index)  # [n, R, d]
            b = self.bank.untied_b[:, layer - 1, self.out_rows].index_select(0, index) * keep  # [n, out, R]
            out = torch.baddbmm(out, torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return out.reshape(*rows.shape[:-1], -1).movedim(0, batch_dim).to(x.dtype)

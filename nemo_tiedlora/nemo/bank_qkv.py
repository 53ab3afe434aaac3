"""Many adapters in one NeMo GPT model for inference (nemo glue layer): the adapter bank behind every `linear_qkv`.

:func:`attach_bank` wraps `linear_qkv` of every decoder layer on this rank in a :class:`BankQKV` that adds the
update of the batch in progress (``core.bank``: each sequence through its own adapter, or none). Which adapter each
sequence uses is set for the duration of a forward or a whole generation by :meth:`BankContext.batch`; NeMo's test
loop sets it from the test JSONL's per-item ``adapter`` field (:func:`select_from_metadata`). Every tensor-parallel
rank holds the whole bank and computes its own rows of the fused QKV output from its (full) input, so no collective
is added; sequence parallelism is refused (it shards the input over the sequence). Inference only: nothing here
trains or saves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import nn

from nemo_tiedlora.core.bank import AdapterBank, BankBatch
from nemo_tiedlora.core.errors import TiedLoraConfigError
from nemo_tiedlora.nemo.adapters import ask_for_normalized_input, tensor_parallel_rows
from nemo_tiedlora.nemo.find_adapters import model_chunks

ADAPTER_FIELD = "adapter"  # the test JSONL's per-item adapter name (absent or null: the base alone)


class BankContext:
    """The bank of a model and the batch its layers are computing now."""

    def __init__(self, bank: AdapterBank, out_rows: Optional[slice]) -> None:
        self.bank, self.out_rows = bank, out_rows
        self.current: Optional[BankBatch] = None

    @contextlib.contextmanager
    def batch(self, names: Sequence[Optional[str]]) -> Iterator[None]:
        """Sequence i of every forward inside this context uses adapter ``names[i]`` (None: the base)."""
        unknown = sorted({name for name in names if name is not None and name not in self.bank})
        if unknown:
            raise TiedLoraConfigError(
                f"unknown adapter {unknown[0]!r}: the loaded adapters are {sorted(self.bank.names)[:20]}; name one of "
                f"them in the item's '{ADAPTER_FIELD}' field or leave it out for the base")
        previous, self.current = self.current, self.bank.gather(list(names), out_rows=self.out_rows)
        try:
            yield
        finally:
            self.current = previous


class BankQKV(nn.Module):
    """`linear_qkv` plus the bank's update for the current batch: returns `(out + update, bias)` like the base."""

    def __init__(self, base: nn.Module, *, layer_number: int, context: BankContext) -> None:
        super().__init__()
        self.base = base
        self.layer_number = layer_number
        self._context = (context,)  # outside the module registry: the bank is not part of the model's state
        self.te_fused_norm = ask_for_normalized_input(base)  # TE: the normalized input is what A reads

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        result, bias = self.base(hidden_states, *args, **kwargs)
        out, normalized = result if self.te_fused_norm else (result, hidden_states)
        batch = self._context[0].current
        if batch is None:
            return out, bias
        if normalized.shape[1] != batch.rows:
            raise TiedLoraConfigError(
                f"the forward carries {normalized.shape[1]} sequences but {batch.rows} adapter names were set: with "
                "several adapters, run each batch in one micro-batch (test_ds.micro_batch_size = global_batch_size "
                "/ data-parallel size)")
        return out + batch.update(normalized, self.layer_number, batch_dim=1).to(out.dtype), bias


def attach_bank(model: Any, bank: AdapterBank) -> BankContext:
    """Wrap `linear_qkv` of every decoder layer of `model` (a restored NeMo GPT model) around `bank`."""
    cfg = model.cfg
    if cfg.get("sequence_parallel", False):
        raise TiedLoraConfigError("several adapters in one model need model.sequence_parallel=False (inference "
                                  "shards nothing over the sequence): set model.sequence_parallel=False")
    tp = int(cfg.get("tensor_model_parallel_size", 1))
    context = BankContext(bank, tensor_parallel_rows(bank.shape.out_features, tp))
    for chunk in model_chunks(model):
        for layer in chunk.decoder.layers:
            attention = layer.self_attention
            if not isinstance(attention.linear_qkv, BankQKV):
                attention.linear_qkv = BankQKV(attention.linear_qkv, layer_number=layer.layer_number, context=context)
    return context


def select_from_metadata(model: Any, context: BankContext) -> None:
    """NeMo's test step runs each batch (loss and generation) with the adapters its items name in their
    ``adapter`` field (NeMo's SFT dataset keeps an item's extra fields as the batch's ``metadata``)."""
    step = model.inference_step_validation_call

    def inference_step_validation_call(batch, *args, **kwargs):
        names = [meta.get(ADAPTER_FIELD) or None for meta in batch.get("metadata") or [{}] * len(batch["tokens"])]
        with context.batch(names):
            return step(batch, *args, **kwargs)

    model.inference_step_validation_call = inference_step_validation_call

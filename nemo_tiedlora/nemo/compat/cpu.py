"""Fixes for CUDA-only calls in NeMo and megatron-core on a machine without a CUDA device (nemo glue layer;
declared in `table.PATCHES`). Their ``needed()`` is false wherever ``torch.cuda.is_available()``: the GPU path is
untouched by them.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch

from nemo_tiedlora.nemo.compat.patch import owner_and_name, replace, replaced, source, undo


def no_cuda() -> bool:
    return not torch.cuda.is_available()


def _instead(owner, attr: str, value) -> None:
    """``owner.attr = value`` through `replace`; the CUDA original is never called (there is no CUDA device)."""
    replace(owner, attr, lambda _cuda_only: value)


def cpu_device() -> None:
    """Process-wide, CPU-only runs: CUDA device calls become CPU no-ops (``Tensor.cuda()`` returns the tensor)."""
    _instead(torch.cuda, "current_device", lambda: torch.device("cpu"))
    _instead(torch.cuda, "synchronize", lambda *a, **k: None)
    _instead(torch.cuda, "empty_cache", lambda *a, **k: None)
    _instead(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _instead(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    for name in ("LongTensor", "FloatTensor", "IntTensor", "HalfTensor", "BFloat16Tensor", "ByteTensor", "BoolTensor"):
        _instead(torch.cuda, name, getattr(torch, name))


def cpu_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _instead(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _instead(torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
    _instead(torch.cuda, "manual_seed", lambda seed: None)
    _instead(torch.cuda, "manual_seed_all", lambda seed: None)
    _instead(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _instead(mrandom, "_set_cuda_rng_state", lambda new_state, *a, **k: torch.set_rng_state(new_state))


class _CudaLiteralsToCpu(types.ModuleType):
    """Stands in for ``torch`` inside one upstream module: every name is the module's own ``torch``'s, except that
    factory calls with device="cuda" get the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "ones_like", "empty_like")

    def __init__(self, upstream: types.ModuleType) -> None:
        super().__init__("torch")
        self._upstream = upstream

    def __getattr__(self, name: str):
        value = getattr(self.__dict__["_upstream"], name)
        if name not in self._FACTORIES:
            return value

        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if (isinstance(device, str) and device.startswith("cuda")) or (
                isinstance(device, torch.device) and device.type == "cuda"
            ):
                kwargs["device"] = "cpu"
            return value(*args, **kwargs)

        return factory


CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # forward_backward_*: torch.zeros([], device="cuda")
    "megatron.core.transformer.utils",  # get_default_causal_mask: torch.ones(sq, sq, device="cuda")
    "megatron.core.tensor_parallel.data",  # broadcast_data: torch.empty(..., device="cuda")
    "megatron.core.optimizer.clip_grads",  # get_grad_norm_fp32: torch.tensor(..., device="cuda")
    "megatron.core.optimizer.optimizer",  # found-inf buffers: torch.tensor(..., device="cuda")
    "megatron.core.utils",  # device-side helpers: torch.tensor(..., device="cuda")
    "nemo.collections.nlp.modules.common.megatron.clip_grads",  # clip_grad_norm_fp32: torch.zeros(1, device="cuda")
)


def cpu_device_literals() -> None:
    import importlib

    for name in CUDA_LITERAL_MODULES:
        replace(importlib.import_module(name), "torch", _CudaLiteralsToCpu)


def cpu_cp_stream() -> None:
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    # the original is not called: it only creates the CUDA stream TransformerEngine's context parallelism uses
    replace(MegatronBaseModel, "setup_transformer_engine_cp_groups", lambda _upstream: lambda self: None)


def cp_groups_need_a_cuda_stream() -> bool:
    """No CUDA here, and setup_transformer_engine_cp_groups creates a torch.cuda.Stream (megatron_base_model.py)."""
    if not no_cuda():
        return False
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    return "torch.cuda.Stream(" in source(MegatronBaseModel.setup_transformer_engine_cp_groups)


@contextlib.contextmanager
def cuda_tensor_type_names() -> Iterator[None]:
    """While inside: a CPU tensor's ``type()`` reads 'torch.cuda.FloatTensor' & co (what megatron's optimizer
    checks accept). Restored on exit; nested use is a no-op."""
    if replaced(torch.Tensor, "type"):
        yield
        return

    def make(upstream):
        def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
            if dtype is None and not kwargs and not self.is_cuda:
                return upstream(self).replace("torch.", "torch.cuda.", 1)
            return upstream(self, dtype, non_blocking, **kwargs)

        return tensor_type

    replace(torch.Tensor, "type", make)
    try:
        yield
    finally:
        undo(torch.Tensor, "type")


# The calls in which megatron-core accepts a parameter only if type() names a CUDA tensor: the optimizers'
# constructors (distrib_optimizer.py _build_model_and_main_param_groups / __init__, optimizer.py
# Float16OptimizerWithFloat16Params.__init__) and clip_grads.py clip_grad_by_total_norm_fp32 (also imported by
# name into optimizer.py).
TYPE_CHECKING_CALLS = (
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
    "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
    "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
)


def _with_cuda_type_names(function):
    def call(*args, **kwargs):
        with cuda_tensor_type_names():
            return function(*args, **kwargs)

    call.__name__, call.__qualname__, call.__doc__ = function.__name__, function.__qualname__, function.__doc__
    return call


def cpu_tensor_type_in_optimizer_calls() -> None:
    """Wrap each of TYPE_CHECKING_CALLS in `cuda_tensor_type_names` (idempotent)."""
    for target in TYPE_CHECKING_CALLS:
        replace(*owner_and_name(target), _with_cuda_type_names)


def optimizer_checks_cuda_type_names() -> bool:
    """No CUDA here, and megatron's distributed optimizer compares param.type() with 'torch.cuda.*Tensor'."""
    if not no_cuda():
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return "'torch.cuda.FloatTensor'" in source(DistributedOptimizer._build_model_and_main_param_groups)

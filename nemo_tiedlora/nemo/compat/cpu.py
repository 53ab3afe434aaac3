"""Fixes for CUDA-only calls in NeMo and megatron-core on a machine without a CUDA device (nemo glue layer;
declared in `table.PATCHES`). Their ``needed()`` is false wherever ``torch.cuda.is_available()``: the GPU path is
untouched by them.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch

from nemo_tiedlora.nemo.compat.patch import ORIGINAL, source


def no_cuda() -> bool:
    return not torch.cuda.is_available()


def cpu_device() -> None:
    """Process-wide, CPU-only runs: CUDA device calls become CPU no-ops (``Tensor.cuda()`` returns the tensor)."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    for name in ("LongTensor", "FloatTensor", "IntTensor", "HalfTensor", "BFloat16Tensor", "ByteTensor", "BoolTensor"):
        setattr(torch.cuda, name, getattr(torch, name))


def cpu_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)


class _CudaLiteralsToCpu(types.ModuleType):
    """Stands in for ``torch`` inside one upstream module: factory calls with device="cuda" get the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "ones_like", "empty_like")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        value = getattr(torch, name)
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
        module = importlib.import_module(name)
        if not isinstance(module.torch, _CudaLiteralsToCpu):
            module.torch = _CudaLiteralsToCpu()


def cpu_cp_stream() -> None:
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    MegatronBaseModel.setup_transformer_engine_cp_groups = lambda self: None


def cp_groups_need_a_cuda_stream() -> bool:
    """No CUDA here, and setup_transformer_engine_cp_groups creates a torch.cuda.Stream (megatron_base_model.py)."""
    if not no_cuda():
        return False
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    text = source(MegatronBaseModel.setup_transformer_engine_cp_groups)
    return not text or "torch.cuda.Stream(" in text


@contextlib.contextmanager
def cuda_tensor_type_names() -> Iterator[None]:
    """While inside: a CPU tensor's ``type()`` reads 'torch.cuda.FloatTensor' & co (what megatron's optimizer
    checks accept). Restored on exit; nested use is a no-op."""
    upstream = torch.Tensor.type
    if getattr(upstream, "_nemo_tiedlora_fix", False):
        yield
        return

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and not self.is_cuda:
            return upstream(self).replace("torch.", "torch.cuda.", 1)
        return upstream(self, dtype, non_blocking, **kwargs)

    tensor_type._nemo_tiedlora_fix = True
    torch.Tensor.type = tensor_type
    try:
        yield
    finally:
        torch.Tensor.type = upstream


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

    call._nemo_tiedlora_fix = True
    setattr(call, ORIGINAL, function)
    call.__name__, call.__qualname__, call.__doc__ = function.__name__, function.__qualname__, function.__doc__
    return call


def cpu_tensor_type_in_optimizer_calls() -> None:
    """Wrap each of TYPE_CHECKING_CALLS in `cuda_tensor_type_names` (idempotent)."""
    import importlib

    for target in TYPE_CHECKING_CALLS:
        module_name, _, qualname = target.partition(":")
        owner = importlib.import_module(module_name)
        *path, attr = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        function = getattr(owner, attr)
        if not getattr(function, "_nemo_tiedlora_fix", False):
            setattr(owner, attr, _with_cuda_type_names(function))


def optimizer_checks_cuda_type_names() -> bool:
    """No CUDA here, and megatron's distributed optimizer compares param.type() with 'torch.cuda.*Tensor'."""
    if not no_cuda():
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    text = source(DistributedOptimizer._build_model_and_main_param_groups)
    return not text or "'torch.cuda.FloatTensor'" in text

"""What a piece of code makes the host wait for, counted on any device: reads of tensor values on the host (each one
a device sync on CUDA) and collectives.

`DeviceTraffic` is a context manager that enters a torch function mode and a torch dispatch mode (both stock torch;
nothing of the code under test is patched) and records:
- host reads: the Python-level reads of a tensor's value (`item`, `tolist`, `numpy`, `bool()`, `int()`,
  `float()`, ...) and the operators whose result the host must wait for (`aten._local_scalar_dense` below them, or
  called directly; `aten.equal` and `aten.is_nonzero`, which return a Python bool; `aten.nonzero`,
  `aten.masked_select` and `unique`, whose output size depends on the values; copies from a non-CPU device to the
  CPU) plus explicit `torch.cuda.synchronize` calls. A Python-level read counts once, not again for the
  `_local_scalar_dense` it runs;
- collectives: every operator of the `c10d` namespace (all-reduce, all-gather, broadcast, ... as issued to the
  process group, whatever Python function issued it).

On CPU nothing is waited for, but the same calls would each block the host on CUDA, so the counts are what a GPU
run pays (`torch.cuda.set_sync_debug_mode` can confirm them there).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_PYTHON_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__"}
_ATEN_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "_unique", "_unique2",
               "unique_dim", "unique_consecutive"}
_COPIES = {"_to_copy", "copy_"}


class _PythonReads(TorchFunctionMode):
    def __init__(self, traffic: "DeviceTraffic") -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in _PYTHON_READS or self.traffic.inside_read:
            return func(*args, **(kwargs or {}))
        self.traffic.host_reads.append(name)
        self.traffic.inside_read = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.traffic.inside_read = False


def _leaves_device(func, args, kwargs) -> bool:
    """A copy whose source is on an accelerator and whose result is on the CPU."""
    source = args[1] if func.__name__.startswith("copy_") else args[0]
    if not isinstance(source, torch.Tensor) or source.device.type == "cpu":
        return False
    if func.__name__.startswith("copy_"):
        return args[0].device.type == "cpu"
    device = (kwargs or {}).get("device")
    return device is not None and torch.device(device).type == "cpu"


class _OperatorTraffic(TorchDispatchMode):
    def __init__(self, traffic: "DeviceTraffic") -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if func.namespace == "c10d":
            self.traffic.collectives.append(name)
        elif not self.traffic.inside_read and (
                name in _ATEN_READS or (name in _COPIES and _leaves_device(func, args, kwargs))):
            self.traffic.host_reads.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class DeviceTraffic:
    """`with DeviceTraffic() as traffic: ...` then `traffic.host_reads`, `traffic.collectives` (names, in order)."""

    def __init__(self) -> None:
        self.host_reads: list[str] = []
        self.collectives: list[str] = []
        self.inside_read = False
        self._modes = (_PythonReads(self), _OperatorTraffic(self))
        self._synchronize = None

    def __enter__(self) -> "DeviceTraffic":
        for mode in self._modes:
            mode.__enter__()
        self._synchronize = torch.cuda.synchronize

        def synchronize(*args, **kwargs):
            self.host_reads.append("torch.cuda.synchronize")
            return self._synchronize(*args, **kwargs)

        torch.cuda.synchronize = synchronize
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize = self._synchronize
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

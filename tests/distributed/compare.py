"""The equivalence check between a parallel run and the TP1/PP1 reference (used by the CPU tests and the GPU script)."""

from __future__ import annotations

import torch


def _close(actual, expected, *, rtol: float, atol: float, what: str) -> None:
    # msg as a callable keeps torch's report (how many elements, the largest differences) and names the tensor
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda report: f"{what}: {report}")


def assert_equivalent(run: dict, reference: dict, *, check_grad_norm: bool = True, rtol: float = 1e-5,
                      atol: float | None = None, loss_rtol: float | None = None,
                      atol_of_max: float | None = None) -> None:
    """Same per-step losses (loss_rtol, default rtol), same gradient norms, same final adapter tensors by logical key.

    Tensors: rtol, plus atol (default rtol / 10) or, with ``atol_of_max``, an atol of that fraction of the reference
    tensor's largest magnitude (a tolerance in units of the tensor's own precision, for low-precision weights).
    The reference must have trained: some adapter tensor moved away from its initial value.
    """
    assert len(run["losses"]) == len(reference["losses"]) >= 5
    loss_rtol = rtol if loss_rtol is None else loss_rtol
    _close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=loss_rtol, atol=0.0,
           what="per-step losses")
    if check_grad_norm:
        _close(torch.tensor(run["grad_norms"]), torch.tensor(reference["grad_norms"]), rtol=rtol, atol=0.0,
               what="gradient norms")
    assert sorted(run["state"]) == sorted(reference["state"])
    for key, tensor in reference["state"].items():
        if atol_of_max is not None:
            tensor_atol = atol_of_max * float(tensor.float().abs().max())
        else:
            tensor_atol = rtol / 10 if atol is None else atol
        _close(run["state"][key], tensor, rtol=rtol, atol=tensor_atol, what=f"adapter tensor {key}")
    assert run["replicas_checked"] > 0
    initial = reference.get("initial")
    if initial is not None:
        moved = [key for key, tensor in reference["state"].items() if not torch.equal(tensor, initial[key])]
        assert moved, "the reference run did not change any adapter tensor: nothing was compared"


if __name__ == "__main__":
    import sys

    reference = torch.load(sys.argv[1])
    for path in sys.argv[2:]:
        assert_equivalent(torch.load(path), reference, rtol=float(__import__("os").environ.get("RTOL", "1e-5")))
        print(f"{path}: equivalent to {sys.argv[1]}")

"""The equivalence check between a parallel run and the TP1/PP1 reference (used by the CPU tests and the GPU script)."""

from __future__ import annotations

import torch


def assert_equivalent(run: dict, reference: dict, *, check_grad_norm: bool = True, rtol: float = 1e-5,
                      atol: float | None = None) -> None:
    """Same per-step losses (rtol), same gradient norms, same final adapter tensors by logical key (rtol, atol;
    atol defaults to rtol / 10)."""
    assert len(run["losses"]) == len(reference["losses"]) >= 5
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=rtol, atol=0)
    if check_grad_norm:
        torch.testing.assert_close(torch.tensor(run["grad_norms"]), torch.tensor(reference["grad_norms"]),
                                   rtol=rtol, atol=0)
    assert sorted(run["state"]) == sorted(reference["state"])
    for key, tensor in reference["state"].items():
        torch.testing.assert_close(run["state"][key], tensor, rtol=rtol, atol=rtol / 10 if atol is None else atol,
                                   msg=key)
    assert run["replicas_checked"] > 0
    assert reference["state"]["B"].abs().sum() > 0  # tl6 trained B away from its zero init


if __name__ == "__main__":
    import sys

    reference = torch.load(sys.argv[1])
    for path in sys.argv[2:]:
        assert_equivalent(torch.load(path), reference, rtol=float(__import__("os").environ.get("RTOL", "1e-5")))
        print(f"{path}: equivalent to {sys.argv[1]}")

"""The demo's diagnostic launcher: the reference composition in place of the fused update."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nemo_tiedlora.apps.demo.reference_update import reference_update
from nemo_tiedlora.core.autograd import fused_tied_lora_update


def _factors(seed: int = 0, d: int = 12, out: int = 20, r: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, d, generator=g, dtype=torch.float64)
    a, b = torch.randn(r, d, generator=g, dtype=torch.float64), torch.randn(out, r, generator=g, dtype=torch.float64)
    u, v = torch.randn(r, generator=g, dtype=torch.float64), torch.randn(out, generator=g, dtype=torch.float64)
    return x, a, b, u, v


def test_reference_update_is_the_plain_formula_with_the_layers_keep_mask():
    """s * v * (B (u * (A (x * mask / keep)))) written out with matmuls, and the fused function on the same mask."""
    x, a, b, u, v = _factors()
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    expected = 0.5 * v * ((u * ((x * mask / 0.7) @ a.T)) @ b.T)
    got = reference_update(x, a, b, u, v, 0.5, keep_mask=mask, keep_prob=0.7)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, fused_tied_lora_update(x, a, b, u, v, 0.5, keep_mask=mask, keep_prob=0.7))
    torch.testing.assert_close(reference_update(x, a, b, u, v, 2.0), 2.0 * v * ((u * (x @ a.T)) @ b.T))


def test_reference_update_refuses_a_tensor_parallel_region():
    x, a, b, u, v = _factors()
    with pytest.raises(RuntimeError, match="one process"):
        reference_update(x, a, b, u, v, 1.0, region=lambda g: g)


def test_launcher_runs_the_script_as_main_with_the_reference_update_in_modules(tmp_path):
    """The script sees its own arguments and, in nemo_tiedlora.core.modules, the reference function."""
    script = tmp_path / "entry.py"
    script.write_text("import sys\nimport nemo_tiedlora.core.autograd as f\nimport nemo_tiedlora.core.modules as m\n"
                      "print(__name__, m.fused_tied_lora_update is f.fused_tied_lora_update, "
                      "m.fused_tied_lora_update.__name__, sys.argv[1:])\n")
    command = [sys.executable, "-m", "nemo_tiedlora.apps.demo.reference_update", str(script), "a=1", "b=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "__main__ False reference_update ['a=1', 'b=2']"

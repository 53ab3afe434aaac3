"""The embedded demo end to end, as a user runs it: the default recipe learns its task."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_default_demo_recipe_learns_the_task_the_base_cannot_do(default_demo):
    """`python -m nemo_tiedlora demo --no-compare` (default preset, rank, steps, rate and seed; its own base built
    from scratch in a fresh folder): the base answers at most 10% of the test split, the adapted model at least 90%,
    scored by the demo's exact match on the predictions NeMo's generate script wrote."""
    work, result = default_demo  # tests/integration/conftest.py: the command, run once per session
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["preset"] == "tl6" and summary["rank"] == 8
    assert list(summary["presets"]) == ["tl6"], "--no-compare trains the preset only"
    assert summary["base_exact_match"] <= 0.10, summary
    assert summary["adapted_exact_match"] >= 0.90, summary
    assert "tl6" in result.stdout and "lora" not in result.stdout.split("preset   trainable")[-1]

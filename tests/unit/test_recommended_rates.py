"""The learning rates we recommend per preset are the ones the tuned SmolLM2 study measured best.

Reference: the committed study results (``benchmarks/results/study_smollm2_tuned_cpu/*/results.csv``), read here
with the csv module: a preset's best rate is the one with the highest first-seed metric at that rank (on a tie, the
lower best validation loss: vera scored 70.14 at both 0.16 and 0.5 on extraction, with 0.091 against 0.094).
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest

from nemo_tiedlora.apps import cli
from nemo_tiedlora.apps.demo import real
from nemo_tiedlora.apps.demo.run import DemoSettings

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "study_smollm2_tuned_cpu"


def _best_rates(task: str, rank: int) -> dict[str, float]:
    by_preset: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    with open(STUDY / task / "results.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["status"] == "ok" and int(row["rank"]) == rank and row["seed_rerun"] == "false":
                by_preset[row["preset"]].append((float(row["metric"]), -float(row["best_val_loss"]), float(row["lr"])))
    return {preset: max(runs)[2] for preset, runs in by_preset.items()}


def test_demo_rates_are_the_best_rates_of_the_extraction_study_at_rank_8():
    """The demo (--base smollm2) trains on the extraction task at rank 8: its rate per preset is the study's best."""
    best = _best_rates("extraction", 8)
    assert set(best) == {"lora", "vera", "tl5", "tl6"}
    assert real.RECOMMENDED_LR == pytest.approx(best)


@pytest.mark.parametrize("preset", ["lora", "vera", "tl5", "tl6"])
def test_demo_smollm2_without_lr_trains_at_the_presets_study_rate(preset, monkeypatch):
    """`demo --base smollm2 --preset P` hands the demo P's best extraction rate; an explicit --lr wins."""
    seen: list[DemoSettings] = []
    monkeypatch.setattr(real, "main", lambda *, work, settings: seen.append(settings))
    assert cli.main(["demo", "--base", "smollm2", "--preset", preset]) == 0
    assert cli.main(["demo", "--base", "smollm2", "--preset", preset, "--lr", "0.003"]) == 0
    assert seen[0].lr == pytest.approx(_best_rates("extraction", 8)[preset]) and seen[0].preset == preset
    assert seen[1].lr == 0.003


def test_embedded_demo_keeps_its_own_rate(monkeypatch):
    """The embedded demo's tiny base is not SmolLM2: without --lr it trains at DemoSettings' rate."""
    from nemo_tiedlora.apps.demo import run

    seen: list[DemoSettings] = []
    monkeypatch.setattr(run, "main", lambda *, work, settings: seen.append(settings))
    assert cli.main(["demo", "--preset", "vera", "--no-compare"]) == 0
    assert seen[0].lr == DemoSettings().lr

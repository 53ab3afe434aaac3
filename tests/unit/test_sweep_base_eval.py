"""``evaluate_base``: the sweep scores the base model alone once per study (``base.json``), reuses it while the
study's fingerprint holds, records nothing when it fails (the runs go on), and the report prints it per task.

The runners are fakes (the real ones run NeMo's entry scripts; tests/integration/test_sweep.py runs them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from sweep_fakes import fake_context, study_config

from nemo_tiedlora.apps.study.report import build_report
from nemo_tiedlora.apps.study.report_rows import ReportError
from nemo_tiedlora.apps.study.sweep import BASE_FILE, RunSpec, SweepConfigError, parse_config, run_sweep


def _config(tmp_path: Path, **changes):
    return parse_config(study_config(tmp_path, {"presets": ["lora", "tl6"], "lrs": [1.0e-2]}, changes))


def _runner(spec: RunSpec, ctx) -> dict:
    return {"metric": 80.0 if spec.preset == "lora" else 70.0, "steps_run": 8, "early_stopped": False,
            "best_val_loss": 1.0}


def _base_runner(metric: float, calls: list):
    def run(ctx) -> dict:
        calls.append(ctx.fingerprint)
        return {"metric": metric, "metric_name": "exact match", "scores": {}}
    return run


def test_base_is_measured_once_and_reused_while_the_fingerprint_holds(tmp_path, capsys):
    cfg = _config(tmp_path, evaluate_base=True)
    ctx = fake_context(cfg, tmp_path / "out")
    calls: list = []
    run_sweep(cfg, runner=_runner, base_runner=_base_runner(12.5, calls), context=ctx)
    run_sweep(cfg, runner=_runner, base_runner=_base_runner(99.0, calls), context=ctx)
    assert calls == ["fp"]  # the second sweep read base.json
    record = json.loads((ctx.out / BASE_FILE).read_text())
    assert record["metric"] == 12.5 and record["task"] == "extraction" and record["fingerprint"] == "fp"
    assert "base model without an adapter: exact match 12.50" in capsys.readouterr().out

    changed = dataclasses.replace(ctx, fingerprint="fp2")  # other data, base or settings: measured again
    run_sweep(cfg, runner=_runner, base_runner=_base_runner(7.0, calls), context=changed)
    assert calls == ["fp", "fp2"] and json.loads((ctx.out / BASE_FILE).read_text())["metric"] == 7.0


def test_without_evaluate_base_the_base_is_not_run(tmp_path):
    cfg = _config(tmp_path)
    assert cfg.evaluate_base is False
    calls: list = []
    run_sweep(cfg, runner=_runner, base_runner=_base_runner(1.0, calls), context=fake_context(cfg, tmp_path / "out"))
    assert calls == [] and not (tmp_path / "out" / BASE_FILE).exists()


def test_a_failed_base_evaluation_is_named_not_recorded_and_the_runs_go_on(tmp_path, capsys):
    cfg = _config(tmp_path, evaluate_base=True)

    def broken(ctx):
        raise RuntimeError("megatron_gpt_generate.py exited with 1")

    rows = run_sweep(cfg, runner=_runner, base_runner=broken, context=fake_context(cfg, tmp_path / "out"))
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert not (tmp_path / "out" / BASE_FILE).exists()
    assert "base model without an adapter: failed: megatron_gpt_generate.py exited with 1" in capsys.readouterr().err


def test_evaluate_base_must_be_a_boolean(tmp_path):
    with pytest.raises(SweepConfigError, match=r"evaluate_base 'yes': true .* or false"):
        _config(tmp_path, evaluate_base="yes")


def test_report_prints_the_base_metric_of_each_task_and_names_a_corrupt_base_file(tmp_path):
    cfg = _config(tmp_path, evaluate_base=True)
    out = tmp_path / "out"
    run_sweep(cfg, runner=_runner, base_runner=_base_runner(3.25, []), context=fake_context(cfg, out))
    table = build_report([out / "results.csv"], tmp_path / "report")["table.md"].read_text()
    section = table[table.index("## extraction"):]
    assert "The base model without an adapter: 3.25." in section.split("Learning rate of each cell")[0]

    (out / BASE_FILE).write_text("{not json")
    with pytest.raises(ReportError, match=r"base\.json: not a base-model result .*run the sweep again"):
        build_report([out / "results.csv"], tmp_path / "report")

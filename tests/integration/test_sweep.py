"""``python -m nemo_tiedlora sweep`` for real: lora + tl6 on the tiny base and the SQuAD sample through NeMo's entry
scripts (fine-tune with early stopping, generate, score), then ``report`` reads the results file; a second sweep
with the same config resumes and runs nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from nemo_tiedlora.apps.cli import main as cli_main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_STEPS, VAL_EVERY, RANK, LR = 8, 2, 2, 1.0e-2


def _closed_form(spec, preset: str, rank: int) -> int:
    """Trainable parameters worked out here from the base's shape (GQA fused QKV width)."""
    d, layers = spec.hidden_size, spec.num_layers
    head = d // spec.num_attention_heads
    out = spec.num_attention_heads * head + 2 * spec.num_query_groups * head
    if preset == "lora":  # A [r, d] and B [out, r] per layer
        return layers * (rank * d + out * rank)
    if preset == "tl6":  # one shared A and B, u [r] and v [out] per layer
        return rank * d + out * rank + layers * (rank + out)
    raise ValueError(preset)


def test_sweep_runs_stops_early_and_reports(tiny, tmp_path, capsys):
    base, _, spec = tiny
    out = tmp_path / "sweep"
    config = tmp_path / "study.yaml"
    config.write_text(
        "task: squad\n"
        "data: sample\n"
        f"base: {base}\n"
        f"output: {out}\n"
        "presets: [lora, tl6]\n"
        f"ranks: [{RANK}]\n"
        f"lrs: [{LR!r}]\n"
        f"training: {{max_steps: {MAX_STEPS}, val_check_interval: {VAL_EVERY}, global_batch_size: 4, "
        "micro_batch_size: 4, max_seq_length: 160}\n"
        # no later validation can beat the first by 1e9: the second validation (step 4) stops training
        "early_stopping: {enabled: true, monitor: validation_loss, patience: 1, min_delta: 1.0e9}\n"
        "generation: {tokens_to_generate: 4, batch_size: 8}\n"
    )
    assert cli_main(["sweep", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "% best lora" in printed and f"results: {out / 'results.csv'}" in printed  # the summary table

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["task"], r["preset"], r["rank"], float(r["lr"])) for r in rows] == [
        ("squad", "lora", str(RANK), LR), ("squad", "tl6", str(RANK), LR)]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    lora, tl6 = (_closed_form(spec, preset, RANK) for preset in ("lora", "tl6"))
    assert [int(r["trainable_params"]) for r in rows] == [lora, tl6]
    assert float(rows[0]["percent_of_best_lora"]) == pytest.approx(100.0)
    assert float(rows[1]["percent_of_best_lora"]) == pytest.approx(100.0 * tl6 / lora)
    for row in rows:
        assert 0.0 <= float(row["metric"]) <= 100.0 and row["metric_name"] == "exact match"
        # stopped at the second validation, before max_steps
        assert int(row["steps_run"]) == 2 * VAL_EVERY < MAX_STEPS
        assert row["early_stopped"] == "true"
        assert "Signaling Trainer to stop" in Path(row["finetune_log"]).read_text()
        assert float(row["best_val_loss"]) > 0
        assert Path(row["adapter"]).is_file() and row["adapter"].endswith(".nemo")
        assert Path(row["generate_log"]).is_file()
    json_rows = json.loads((out / "results.json").read_text())
    assert [r["trainable_params"] for r in json_rows] == [lora, tl6]
    assert [r["early_stopped"] for r in json_rows] == [True, True]

    report = tmp_path / "report"
    assert cli_main(["report", str(out / "results.csv"), "--out", str(report)]) == 0
    table = (report / "table.md").read_text()
    assert "| lora |" in table and "| tl6 |" in table and f"({100.0 * tl6 / lora:.3g}%)" in table
    assert (report / "metric_vs_rank.png").stat().st_size > 0

    # same config again: both runs are recorded ok, nothing runs and the file keeps its rows
    before = (out / "results.csv").read_text()
    assert cli_main(["sweep", "--config", str(config)]) == 0
    assert "resuming: 2 of 2" in capsys.readouterr().out
    assert (out / "results.csv").read_text() == before


def _two_step_study(tmp_path: Path, base: Path, fields: str, *, max_seq_length: int) -> tuple[Path, Path]:
    """A study config (``fields`` plus tl6 at rank 2, 2 steps, the task's sample, no early stopping) and its output."""
    out, config = tmp_path / "sweep", tmp_path / "study.yaml"
    config.write_text(
        f"{fields}data: sample\nbase: {base}\noutput: {out}\npresets: [tl6]\nranks: [2]\n"
        "training: {max_steps: 2, val_check_interval: 2, global_batch_size: 4, micro_batch_size: 4, "
        f"max_seq_length: {max_seq_length}}}\n"
        "early_stopping: {enabled: false}\n"
        "generation: {tokens_to_generate: 4, batch_size: 8}\n"
    )
    return config, out


def test_hellaswag_sweep_is_scored_by_log_likelihood(tiny, tmp_path):
    """Multiple choice goes through the log-likelihood scorer: the row carries raw and per-character accuracy over
    every test item, and the metric is the per-character one."""
    from nemo_tiedlora.apps.study.tasks import TASKS

    config, out = _two_step_study(tmp_path, tiny[0], "task: hellaswag\nlrs: [1.0e-2]\n", max_seq_length=128)
    assert cli_main(["sweep", "--config", str(config)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok"]
    scores = json.loads(next((out / "predictions").glob("*.loglik.json")).read_text())
    assert rows[0]["metric"] == pytest.approx(scores["accuracy_norm"])
    sample = TASKS["hellaswag"].write_sample(tmp_path / "same-sample")  # the sample is generated deterministically
    assert scores["count"] == len(TASKS["hellaswag"].load(sample, "test")) > 0


def test_base_evaluation_answers_as_an_adapter_that_has_not_moved(tiny, tmp_path):
    """``evaluate_base: true`` scores the base model alone. Reference: tl6 trained at lr 1e-30 starts with B = 0 and
    moves by ~1e-30, below float32's resolution of the base's activations, so it must answer every test prompt
    exactly as the base model does and get the same metric; ``report`` prints that metric under the task."""
    config, out = _two_step_study(tmp_path, tiny[0], "task: squad\nlrs: [1.0e-30]\nevaluate_base: true\n",
                                  max_seq_length=160)
    assert cli_main(["sweep", "--config", str(config)]) == 0
    (row,) = json.loads((out / "results.json").read_text())
    record = json.loads((out / "base.json").read_text())
    assert row["status"] == "ok" and record["task"] == "squad"

    def preds(pattern: str) -> list[str]:
        (path,) = (out / "predictions").glob(pattern)
        return [json.loads(line)["pred"] for line in path.read_text().splitlines()]

    base_preds, tuned_preds = preds("squad_base_*.jsonl"), preds(f"{row['run']}_*.jsonl")
    assert len(base_preds) > 0 and base_preds == tuned_preds
    assert record["metric"] == pytest.approx(row["metric"])

    report = tmp_path / "report"
    assert cli_main(["report", str(out / "results.csv"), "--out", str(report)]) == 0
    assert f"The base model without an adapter: {record['metric']:.2f}." in (report / "table.md").read_text()

"""``python -m nemo_tiedlora report``: table numbers equal the inputs, % of best LoRA, the plots, bad input."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from nemo_tiedlora.apps.study.report import (
    REQUIRED_COLUMNS,
    ReportError,
    add_percent_of_best_lora,
    add_report_parser,
    best_runs,
    build_report,
    read_results,
)

COLUMNS = ("task", "preset", "rank", "lr", "metric", "trainable_params", "status")
# The best LoRA run of squad is r=2 at lr 1e-3 (82.5, 1000 parameters): every % below is relative to it.
RUNS: tuple[tuple[object, ...], ...] = (
    ("squad", "lora", 2, 1e-4, 80.0, 1000, "ok"),
    ("squad", "lora", 2, 1e-3, 82.5, 1000, "ok"),
    ("squad", "lora", 8, 1e-4, 81.0, 4000, "ok"),
    ("squad", "lora", 8, 1e-3, 79.0, 4000, "ok"),
    ("squad", "tl6", 2, 1e-4, 83.0, 150, "ok"),
    ("squad", "tl6", 2, 1e-3, 70.0, 150, "ok"),
    ("squad", "tl6", 8, 1e-4, 80.0, 600, "ok"),
    ("squad", "tl6", 8, 1e-3, 80.5, 600, "ok"),
    ("squad", "vera", 2, 1e-4, 75.0, 300, "done"),
    ("squad", "vera", 8, 1e-4, "", 310, "failed"),
    ("gsm8k", "tl6", 2, 1e-4, 31.0, 300, "ok"),
    ("gsm8k", "lora", 2, 1e-4, 30.0, 2000, "ok"),
)


def _write_csv(path: Path, rows: tuple[tuple[object, ...], ...] = RUNS, columns: tuple[str, ...] = COLUMNS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def _table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """preset -> cells of the first table after the heading that starts with ``heading``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("| ") and not line.startswith("| preset"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("report")
    return build_report(_write_csv(folder / "results.csv"), folder / "out")


def test_table_cells_are_the_best_lr_metric_and_percent(report: dict[str, Path]) -> None:
    table = report["table.md"].read_text(encoding="utf-8")
    rows = _table_rows(table, "## squad")
    assert list(rows) == ["lora", "vera", "tl6"]  # LoRA first, then the paper's order
    assert rows["lora"] == ["82.50 (100%)", "**81.00** (400%)"]  # r=8 column: LoRA 81.0 beats TL6 80.5
    assert rows["tl6"] == ["**83.00** (15%)", "80.50 (60%)"]
    assert rows["vera"] == ["75.00 (30%)", "–"]  # the failed r=8 run is left out
    learning_rates = _table_rows(table.split("## squad", 1)[1].split("Learning rate of each cell:", 1)[1], "")
    assert learning_rates["lora"] == ["1e-3", "1e-4"] and learning_rates["tl6"] == ["1e-4", "1e-3"]
    assert _table_rows(table, "## gsm8k")["tl6"] == ["**31.00** (15%)"]
    assert "- squad vera r=8 lr=1e-4: failed" in table
    assert "exact match (higher is better)" in table


def test_the_three_plots_are_pngs(report: dict[str, Path]) -> None:
    assert sorted(report) == ["metric_vs_lr.png", "metric_vs_params.png", "metric_vs_rank.png", "table.md"]
    for name in ("metric_vs_rank.png", "metric_vs_params.png", "metric_vs_lr.png"):
        assert report[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(report[name]).shape
        assert width > 1000 and height > 500
    assert sorted(p.name for p in report["table.md"].parent.iterdir()) == sorted(report), "no temporary files"


def test_percent_of_best_lora_computed_and_kept(tmp_path: Path) -> None:
    runs = add_percent_of_best_lora(read_results(_write_csv(tmp_path / "r.csv")))
    percent = {(r.task, r.preset, r.rank, r.lr): r.percent_of_best_lora for r in runs}
    assert percent["squad", "lora", 8, 1e-4] == pytest.approx(400.0)
    assert percent["squad", "tl6", 8, 1e-3] == pytest.approx(60.0)
    assert percent["gsm8k", "tl6", 2, 1e-4] == pytest.approx(15.0)
    given = [(*row, 12.5 if row[1] == "tl6" else "") for row in RUNS]
    path = _write_csv(tmp_path / "g.csv", given, (*COLUMNS, "percent_of_best_lora"))
    kept = add_percent_of_best_lora(read_results(path))
    assert {r.percent_of_best_lora for r in kept if r.preset == "tl6"} == {12.5}
    assert {r.percent_of_best_lora for r in kept if r.preset == "lora" and r.task == "squad"} == {100.0, 400.0}


def test_no_lora_run_leaves_percent_unknown(tmp_path: Path) -> None:
    rows = tuple(row for row in RUNS if row[1] != "lora")
    runs = add_percent_of_best_lora(read_results(_write_csv(tmp_path / "r.csv", rows)))
    assert all(run.percent_of_best_lora is None for run in runs)
    best = best_runs(runs)
    assert best["squad", "tl6", 2].metric == 83.0 and best["squad", "tl6", 8].lr == 1e-3


def test_json_list_input_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps([dict(zip(COLUMNS, row)) for row in RUNS]), encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(results), "--out", str(tmp_path / "out")])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out.split()
    names = ("table.md", "metric_vs_rank.png", "metric_vs_params.png", "metric_vs_lr.png")
    assert printed == [str(tmp_path / "out" / name) for name in names]
    assert "**83.00** (15%)" in (tmp_path / "out" / "table.md").read_text(encoding="utf-8")
    args = parser.parse_args(["report", str(tmp_path / "absent.csv")])
    assert args.handler(args) == 2
    assert "absent.csv: no such results file" in capsys.readouterr().err


def test_missing_columns_are_all_listed(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", (("squad", "lora", "0.5"),), ("task", "preset", "accuracy"))
    with pytest.raises(ReportError) as raised:
        read_results(path)
    assert "missing column(s) rank, lr, metric, trainable_params, status" in str(raised.value)
    assert str(path) in str(raised.value) and ", ".join(REQUIRED_COLUMNS) in str(raised.value)


@pytest.mark.parametrize(("text", "expected"), [("", "the file is empty"), ("  \n", "the file is empty")])
def test_empty_file(text: str, expected: str, tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text(text, encoding="utf-8")
    with pytest.raises(ReportError, match=expected):
        read_results(tmp_path / "r.csv")


def test_header_only_and_no_finished_run(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"no runs in the file \(only a header\?\)"):
        read_results(_write_csv(tmp_path / "h.csv", ()))
    failed = (("squad", "lora", 2, 1e-4, "", 10, "failed"),)
    with pytest.raises(ReportError, match="no finished run"):
        build_report(_write_csv(tmp_path / "f.csv", failed), tmp_path / "out")


def test_non_numeric_values_of_finished_runs_are_listed(tmp_path: Path) -> None:
    rows = (
        ("squad", "lora", 2, 1e-4, "n/a", 1000, "ok"),
        ("squad", "lora", 8, 1e-4, "high", 4000, "failed"),  # not finished: its metric is not read
        ("squad", "tl6", "eight", 1e-4, 80.0, 600, "ok"),
        ("squad", "tl6", 2, 1e-4, "nan", 150, "ok"),
    )
    with pytest.raises(ReportError) as raised:
        read_results(_write_csv(tmp_path / "r.csv", rows))
    message = str(raised.value)
    assert "row 1: metric 'n/a' is not a number" in message
    assert "row 3: rank 'eight' is not a number" in message
    assert "row 4: metric 'nan' is not a number" in message
    assert "row 2" not in message

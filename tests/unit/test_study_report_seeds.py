"""``python -m nemo_tiedlora report`` on a study with seeds: mean ± std over seeds, the per-rank spread table, the
headline (TL6 within 2 points of LoRA or not), the edge flag, several results files, error bars, the learning-rate
plot and tick labels that do not overlap.

Every expected number is computed by hand from the literal metrics below (``statistics`` as the reference for the
sample standard deviation).
"""

from __future__ import annotations

import argparse
import math
import statistics
from itertools import combinations
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from test_study_report import _table_rows, _write_csv

from nemo_tiedlora.apps.study import report as report_module
from nemo_tiedlora.apps.study.plots import (
    BestRate,
    LrPanel,
    Panel,
    metric_vs_lr_figure,
    metric_vs_params_figure,
    metric_vs_rank_figure,
)
from nemo_tiedlora.apps.study.report import (
    add_percent_of_best_lora,
    add_report_parser,
    best_runs,
    build_report,
    headlines,
    rate_edges,
    read_results,
    spread,
)

COLUMNS = ("task", "preset", "rank", "lr", "seed", "seed_rerun", "metric", "trainable_params", "status",
           "best_val_loss")
LORA8, TL6_8, VERA8, LORA32, TL6_32 = 368640, 41328, 29040, 1474560, 150000

# arithmetic, rank 8: LoRA best at 4e-3 (inside its rates), seeds 62.5, 61.0, 64.0; TL6 best at 1.6e-2, the highest
# of its two rates, seeds 61.5, 59.5, 63.5. TL6 is 1.00 point behind: within 2 points.
ARITHMETIC = (
    ("arithmetic", "lora", 8, 1e-3, 1234, "false", 50.0, LORA8, "ok", 0.5),
    ("arithmetic", "lora", 8, 4e-3, 1234, "false", 62.5, LORA8, "ok", 0.3),
    ("arithmetic", "lora", 8, 1.6e-2, 1234, "false", 55.0, LORA8, "ok", 0.4),
    ("arithmetic", "tl6", 8, 4e-3, 1234, "false", 55.0, TL6_8, "ok", 0.6),
    ("arithmetic", "tl6", 8, 1.6e-2, 1234, "false", 61.5, TL6_8, "ok", 0.4),
    ("arithmetic", "lora", 8, 4e-3, 4321, "true", 61.0, LORA8, "ok", 0.3),
    ("arithmetic", "lora", 8, 4e-3, 99, "true", 64.0, LORA8, "ok", 0.3),
    ("arithmetic", "tl6", 8, 1.6e-2, 4321, "true", 59.5, TL6_8, "ok", 0.4),
    ("arithmetic", "tl6", 8, 1.6e-2, 99, "true", 63.5, TL6_8, "ok", 0.4),
)
# extraction, rank 8: LoRA best at 8e-3 (inside), seeds 97, 99, 98; TL6 best at 2e-3, the lowest of its rates
# (a failed run at 3.2e-2 still counts as tried), seeds 85, 89, 87: 11.00 points behind. VeRA: one seed only.
# Rank 32 is a follow-up at one rate: LoRA 98, 100, 99; TL6 96, 98, 97: exactly 2.00 points behind (within).
EXTRACTION = (
    ("extraction", "lora", 8, 2e-3, 1234, "false", 90.0, LORA8, "ok", 0.2),
    ("extraction", "lora", 8, 8e-3, 1234, "false", 97.0, LORA8, "ok", 0.1),
    ("extraction", "lora", 8, 3.2e-2, 1234, "false", 80.0, LORA8, "ok", 0.3),
    ("extraction", "tl6", 8, 2e-3, 1234, "false", 85.0, TL6_8, "ok", 0.2),
    ("extraction", "tl6", 8, 8e-3, 1234, "false", 70.0, TL6_8, "ok", 0.3),
    ("extraction", "tl6", 8, 3.2e-2, 1234, "false", "", TL6_8, "failed: diverged", ""),
    ("extraction", "vera", 8, 2e-3, 1234, "false", 0.0, VERA8, "ok", 1.9),
    ("extraction", "vera", 8, 8e-3, 1234, "false", 5.0, VERA8, "ok", 1.6),
    ("extraction", "lora", 8, 8e-3, 4321, "true", 99.0, LORA8, "ok", 0.1),
    ("extraction", "lora", 8, 8e-3, 99, "true", 98.0, LORA8, "ok", 0.1),
    ("extraction", "tl6", 8, 2e-3, 4321, "true", 89.0, TL6_8, "ok", 0.2),
    ("extraction", "tl6", 8, 2e-3, 99, "true", 87.0, TL6_8, "ok", 0.2),
    ("extraction", "lora", 32, 8e-3, 1234, "false", 98.0, LORA32, "ok", 0.1),
    ("extraction", "lora", 32, 8e-3, 4321, "true", 100.0, LORA32, "ok", 0.1),
    ("extraction", "lora", 32, 8e-3, 99, "true", 99.0, LORA32, "ok", 0.1),
    ("extraction", "tl6", 32, 2e-3, 1234, "false", 96.0, TL6_32, "ok", 0.2),
    ("extraction", "tl6", 32, 2e-3, 4321, "true", 98.0, TL6_32, "ok", 0.2),
    ("extraction", "tl6", 32, 2e-3, 99, "true", 97.0, TL6_32, "ok", 0.2),
)


def _write(path: Path, rows: tuple[tuple[object, ...], ...]) -> Path:
    return _write_csv(path, rows, COLUMNS)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("results")
    return _write(folder / "arithmetic.csv", ARITHMETIC), _write(folder / "extraction.csv", EXTRACTION)


@pytest.fixture(scope="module")
def table(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("report")
    return build_report(list(files), out)["table.md"].read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def runs(files: tuple[Path, Path]) -> list[report_module.Run]:
    return add_percent_of_best_lora([run for path in files for run in read_results(path)])


def test_spread_is_the_hand_computed_mean_std_min_max(runs: list[report_module.Run]) -> None:
    best = best_runs(runs)
    cases = {("arithmetic", "lora", 8): [62.5, 61.0, 64.0], ("arithmetic", "tl6", 8): [61.5, 59.5, 63.5],
             ("extraction", "tl6", 8): [85.0, 89.0, 87.0], ("extraction", "lora", 32): [98.0, 100.0, 99.0]}
    for key, values in cases.items():
        cell = spread(best[key])
        assert cell.seeds == 3 and cell.low == min(values) and cell.high == max(values)
        assert cell.mean == pytest.approx(statistics.mean(values))
        assert cell.std == pytest.approx(statistics.stdev(values))
    assert spread(best["arithmetic", "lora", 8]).std == pytest.approx(1.5)  # sqrt((0 + 1.5² + 1.5²) / 2)
    assert spread(best["arithmetic", "tl6", 8]).std == pytest.approx(2.0)  # sqrt((0 + 2² + 2²) / 2)
    single = spread(best["extraction", "vera", 8])
    assert (single.seeds, single.mean, single.std, single.low, single.high) == (1, 5.0, None, 5.0, 5.0)


def test_metric_cells_show_mean_plus_minus_std_only_with_two_or_more_seeds(table: str) -> None:
    assert _table_rows(table, "## arithmetic")["tl6"] == ["61.50 ± 2.00 (11.2%)"]  # 41328 / 368640
    assert _table_rows(table, "## arithmetic")["lora"] == ["**62.50** ± 1.50 (100%)"]
    extraction = _table_rows(table, "## extraction")
    # % of the task's best LoRA run (r=32, seed 4321, 100.0, 1474560 parameters), as before
    assert extraction["vera"] == ["5.00 (1.97%)", "–"]
    assert extraction["lora"] == ["**98.00** ± 1.00 (25%)", "**99.00** ± 1.00 (100%)"]


def test_per_rank_spread_table_lists_each_preset(table: str) -> None:
    rank8 = _table_rows(table, "### extraction, rank 8:")
    assert rank8["lora"] == ["8e-3", "3", "98.00", "1.00", "97.00", "99.00", "368,640", "100%"]
    assert rank8["tl6"] == ["2e-3 (best at the edge of the rates tried: the lowest)", "3", "87.00", "2.00",
                            "85.00", "89.00", "41,328", "11.2%"]
    assert rank8["vera"] == ["8e-3 (best at the edge of the rates tried: the highest)", "1", "5.00", "–", "5.00",
                             "5.00", "29,040", "7.88%"]  # 29040 / 368640
    rank32 = _table_rows(table, "### extraction, rank 32:")
    assert rank32["tl6"] == ["2e-3", "3", "97.00", "1.00", "96.00", "98.00", "150,000", "10.2%"]  # / 1474560
    assert "| preset | lr | seeds | mean | std | min | max | trainable params | % of LoRA r=32 params |" in table
    assert _table_rows(table, "### arithmetic, rank 8:")["tl6"][0] == "1.6e-2 (best at the edge of the rates tried: " \
        "the highest)"


def test_headline_within_and_not_within(table: str) -> None:
    within = ("- **arithmetic, rank 8: tl6 is within 2 points of LoRA: 61.50 ± 2.0 against 62.50 ± 1.5 (gap 1.00 "
              "points), with 11.2% of its trainable parameters (41,328 against 368,640), 3 seeds each; best at the "
              "edge of the rates tried: tl6 (1.6e-2, the highest rate).**")
    not_within = ("- **extraction, rank 8: tl6 is not within 2 points of LoRA: 87.00 ± 2.0 against 98.00 ± 1.0 "
                  "(gap 11.00 points), with 11.2% of its trainable parameters (41,328 against 368,640), 3 seeds "
                  "each; best at the edge of the rates tried: tl6 (2e-3, the lowest rate).**")
    exactly_two = ("- **extraction, rank 32: tl6 is within 2 points of LoRA: 97.00 ± 1.0 against 99.00 ± 1.0 (gap "
                   "2.00 points), with 10.2% of its trainable parameters (150,000 against 1,474,560), 3 seeds each.**")
    over_ranks = ("- **extraction, best of each over ranks 8, 32: tl6 (rank 32) is within 2 points of LoRA (rank 32): "
                  "97.00 ± 1.0 against 99.00 ± 1.0 (gap 2.00 points), with 10.2% of its trainable parameters (150,000 "
                  "against 1,474,560), 3 seeds each.**")
    lines = table.splitlines()
    # tasks in the registry's order (extraction before arithmetic), ranks ascending, then the best over ranks; all
    # before the task tables
    assert [line for line in lines if line.startswith("- **")] == [not_within, exactly_two, over_ranks, within]
    assert lines.index(within) < lines.index(next(line for line in lines if line.startswith("## extraction")))


def test_headline_with_tl6_ahead_and_unequal_seeds(tmp_path: Path) -> None:
    runs = read_results(_write(tmp_path / "r.csv", (
        ("arithmetic", "lora", 8, 1e-3, 1234, "false", 40.0, LORA8, "ok", 0.5),
        ("arithmetic", "tl6", 8, 1e-3, 1234, "false", 45.0, TL6_8, "ok", 0.5),
        ("arithmetic", "tl6", 8, 1e-3, 4321, "true", 47.0, TL6_8, "ok", 0.5),
    )))
    (sentence,) = headlines(best_runs(runs))
    assert sentence == ("**arithmetic, rank 8: tl6 is within 2 points of LoRA: 46.00 ± 1.4 against 40.00 (tl6 ahead "
                        "by 6.00 points), with 11.2% of its trainable parameters (41,328 against 368,640), 2 seeds "
                        "for tl6 and 1 seed for LoRA.**")  # stdev(45, 47) = sqrt(2) = 1.41


def test_headline_over_ranks_pairs_each_presets_best_mean_whatever_its_rank(tmp_path: Path) -> None:
    """LoRA is best at rank 8 (90 against 80 at rank 32), TL6 at rank 32 (89 against 70 at rank 8): the sentence
    over ranks compares TL6 at 32 with LoRA at 8, and TL6's parameters with LoRA's at rank 8."""
    runs = read_results(_write(tmp_path / "r.csv", (
        ("extraction", "lora", 8, 1e-3, 1234, "false", 90.0, LORA8, "ok", 0.5),
        ("extraction", "lora", 32, 1e-3, 1234, "false", 80.0, LORA32, "ok", 0.5),
        ("extraction", "tl6", 8, 1e-3, 1234, "false", 70.0, TL6_8, "ok", 0.5),
        ("extraction", "tl6", 32, 1e-3, 1234, "false", 89.0, TL6_32, "ok", 0.5),
    )))
    sentences = headlines(best_runs(runs))
    assert len(sentences) == 3
    assert sentences[2] == ("**extraction, best of each over ranks 8, 32: tl6 (rank 32) is within 2 points of LoRA "
                            "(rank 8): 89.00 against 90.00 (gap 1.00 points), with 40.7% of its trainable parameters "
                            "(150,000 against 368,640), 1 seed each.**")  # 150000 / 368640 = 40.69%


def test_rate_edges_flag_only_the_lowest_or_highest_of_two_or_more_rates(runs: list[report_module.Run]) -> None:
    edges = rate_edges(runs, best_runs(runs))
    assert edges == {("arithmetic", "tl6", 8): "highest", ("extraction", "tl6", 8): "lowest",
                     ("extraction", "vera", 8): "highest"}
    # arithmetic lora 8 (4e-3 inside 1e-3..1.6e-2), extraction lora 8 (8e-3 inside), rank 32 (one rate): no flag
    shrunk = [run for run in runs if not (run.task == "extraction" and run.preset == "tl6" and run.rank == 8
                                         and run.lr == 8e-3)]
    assert rate_edges(shrunk, best_runs(shrunk))["extraction", "tl6", 8] == "lowest"  # 2e-3 vs failed 3.2e-2
    only_failed_above = [run for run in shrunk if not (run.task == "extraction" and run.preset == "tl6"
                                                       and run.rank == 8 and run.lr == 3.2e-2)]
    assert ("extraction", "tl6", 8) not in rate_edges(only_failed_above, best_runs(only_failed_above))


def test_several_results_files_on_the_command_line(files: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *map(str, files), "--out", str(tmp_path / "both")])
    assert args.handler(args) == 0
    names = ("table.md", "metric_vs_rank.png", "metric_vs_params.png", "metric_vs_lr.png")
    assert capsys.readouterr().out.split() == [str(tmp_path / "both" / name) for name in names]
    text = (tmp_path / "both" / "table.md").read_text(encoding="utf-8")
    assert "## arithmetic (" in text and "## extraction (" in text
    assert "- extraction tl6 r=8 lr=3.2e-2: failed: diverged" in text
    args = parser.parse_args(["report", *map(str, files)])
    assert args.handler(args) == 2
    assert "2 results files: give --out DIR" in capsys.readouterr().err
    args = parser.parse_args(["report", str(files[0])])  # one file: 'report' next to it, as before
    assert args.handler(args) == 0
    assert (files[0].parent / "report" / "metric_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert "## extraction" not in (files[0].parent / "report" / "table.md").read_text(encoding="utf-8")


def _bars(figure: Figure) -> list[list[tuple[float, float, float]]]:
    """Per axes, the error bars drawn: (x, low, high) of each vertical segment, rounded to 6 decimals."""
    out = []
    for ax in figure.axes:
        segments = []
        for container in ax.containers:
            for collection in container.lines[2]:
                segments += [tuple(round(float(v), 6) for v in (seg[0][0], seg[0][1], seg[1][1]))
                             for seg in collection.get_segments()]
        out.append(sorted(segments))
    return out


def test_rank_and_params_plots_have_std_error_bars_where_two_or_more_seeds(runs: list[report_module.Run]) -> None:
    best = best_runs(runs)
    panels = report_module._panels(best, metric_names={"arithmetic": "accuracy", "extraction": "exact match"})
    assert [panel.title.split(" ")[0] for panel in panels] == ["extraction", "arithmetic"]  # the registry's order
    assert panels[0].errors["tl6"] == pytest.approx({8: statistics.stdev([85, 89, 87]),
                                                     32: statistics.stdev([96, 98, 97])})
    assert panels[0].errors["vera"] == {}  # one seed: no error bar
    # the rank plot sets presets a little apart around a rank: its x is the rank within a tenth of an octave
    rank_bars = [sorted((2 ** round(math.log2(x)), low, high) for x, low, high in bars)
                 for bars in _bars(metric_vs_rank_figure(panels))]
    assert rank_bars[1] == sorted([(8, 62.5 - 1.5, 62.5 + 1.5), (8, 61.5 - 2.0, 61.5 + 2.0)])
    assert rank_bars[0] == sorted([(8, 97.0, 99.0), (8, 85.0, 89.0), (32, 98.0, 100.0),
                                   (32, 96.0, 98.0)])  # lora and tl6 at 8 and 32, ± 1 std
    assert all(abs(math.log2(x) - round(math.log2(x))) <= 0.1 for bars in _bars(metric_vs_rank_figure(panels))
               for x, _, _ in bars)
    params_bars = _bars(metric_vs_params_figure(panels))
    assert params_bars[0] == sorted([(LORA8, 97.0, 99.0), (TL6_8, 85.0, 89.0),
                                                   (LORA32, 98.0, 100.0), (TL6_32, 96.0, 98.0)])


def test_lr_plot_panels_mark_the_chosen_rate_with_mean_and_std(runs: list[report_module.Run]) -> None:
    best = best_runs(runs)
    rows = report_module._lr_panels(runs, best, rate_edges(runs, best),
                                    metric_names={"arithmetic": "accuracy", "extraction": "exact match"})
    assert [[panel.title for panel in row] for row in rows] == [
        ["extraction: lora", "extraction: vera", "extraction: tl6"], ["arithmetic: lora", "arithmetic: tl6"]]
    tl6 = rows[1][1]
    assert tl6.curves == {8: [(4e-3, 55.0), (1.6e-2, 61.5)]}  # the grid seed's runs only
    assert tl6.best == {8: BestRate(lr=1.6e-2, mean=61.5, std=pytest.approx(2.0), seeds=3, edge="highest")}
    assert set(rows[0][2].curves) == {8}  # rank 32 is a follow-up at one rate, not a grid rank
    figure = metric_vs_lr_figure(rows)  # 2 rows x 3 columns; arithmetic's tl6 is the fifth axes
    assert _bars(figure)[4] == [(1.6e-2, 59.5, 63.5)]
    assert any("best at the edge of the rates tried (highest)" in text.get_text() for text in figure.axes[4].texts)
    assert not figure.axes[3].texts  # arithmetic's lora: 4e-3 lies inside its rates


# ------------------------------------------------------------------------------------------------ tick labels


def _visible_x_labels(ax) -> list[Text]:
    """The x tick labels drawn inside the axis' view (major and minor), with text."""
    lo, hi = sorted(ax.xaxis.get_view_interval())
    labels = []
    for locs, ticks in ((ax.xaxis.get_majorticklocs(), ax.xaxis.get_major_ticks),
                        (ax.xaxis.get_minorticklocs(), ax.xaxis.get_minor_ticks)):
        for loc, tick in zip(locs, ticks(len(locs))):
            if lo <= loc <= hi and tick.label1.get_visible() and tick.label1.get_text():
                labels.append(tick.label1)
    return labels


def _overlaps(figure: Figure) -> list[tuple[str, str]]:
    """Pairs of visible x tick labels of one axes whose rendered extents overlap."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    pairs = []
    for ax in figure.axes:
        if not ax.axison:
            continue
        labels = _visible_x_labels(ax)
        assert len(labels) >= 2, f"{ax.get_title()}: fewer than two labelled x ticks"
        extents = [(label.get_text(), label.get_window_extent(renderer)) for label in labels]
        pairs += [(a, b) for (a, one), (b, two) in combinations(extents, 2) if one.overlaps(two)]
    return pairs


PARAMS = {"lora": {8: (LORA8, 98.0)}, "vera": {8: (VERA8, 5.0)}, "tl5": {8: (12288, 90.6)}, "tl6": {8: (TL6_8, 90.6)}}


@pytest.mark.parametrize("series", [
    PARAMS,  # 12,288 .. 368,640: the matplotlib default labels 3x10^4 over 4x10^4 here
    {"tl5": {8: (12288, 90.6)}, "tl6": {8: (TL6_8, 90.6)}, "vera": {8: (VERA8, 5.0)}},  # under half a decade
    {"lora": {2: (92160, 50.0), 8: (LORA8, 60.0), 32: (LORA32, 70.0)}, "tl6": {2: (3000, 40.0), 8: (TL6_8, 55.0)}},
])
def test_params_axis_tick_labels_do_not_overlap(series) -> None:
    figure = metric_vs_params_figure([Panel("extraction", "exact match", series),
                                      Panel("arithmetic", "accuracy", series)])
    assert _overlaps(figure) == []


@pytest.mark.parametrize("rates", [
    (5e-4, 2e-3, 8e-3),
    (5e-4, 2e-3, 8e-3, 3.2e-2, 1.28e-1),
    (1e-3, 1.25e-3, 1.5e-3, 2e-3, 2.5e-3, 3e-3, 4e-3),  # denser than the labels fit
    (2.5e-3, 3.2e-3),
])
def test_lr_axis_tick_labels_do_not_overlap(rates) -> None:
    curve = [(lr, 50.0 + index) for index, lr in enumerate(rates)]
    best = BestRate(lr=rates[-1], mean=52.0, std=1.0, seeds=3, edge="highest")
    row = [LrPanel(f"task: {preset}", "accuracy", preset, {8: curve, 32: curve}, {8: best})
           for preset in ("lora", "vera", "tl5", "tl6")]
    assert _overlaps(metric_vs_lr_figure([row, row])) == []

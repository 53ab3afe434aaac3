"""The study protocol's sweep features: a learning-rate grid per preset, rates added beyond the grid's edge while a
preset's best rate is at the edge (and a failed study when the limit leaves it there), presets at other ranks
tuned around their best rate and rerun there with every seed, generated sample sizes, a fingerprint that survives a rebuilt named base, and the
generated multi-step ``arithmetic`` task.

The runner is a fake whose metric is a known function of the rate (the real one runs NeMo's entry scripts), so the
rates the sweep must choose are known in advance.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from sweep_fakes import fake_context, study_config

from nemo_tiedlora.apps.study import sweep
from nemo_tiedlora.apps.study.sweep import RunSpec, SweepConfigError, SweepContext, parse_config, run_sweep
from nemo_tiedlora.apps.study.sweep_results import edge_extensions, fingerprint
from nemo_tiedlora.apps.study.tasks import TASKS, prepare
from nemo_tiedlora.apps.study.tasks.base import Example
from nemo_tiedlora.apps.study.tasks.gsm8k import gold_number

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **changes) -> dict:
    return study_config(tmp_path, {"presets": ["lora", "vera"], "lrs": {"lora": [1.0e-3, 1.0e-2], "vera": [1.0e-2, 1.0e-1]}}, changes)


def _context(cfg, out: Path) -> SweepContext:
    return fake_context(cfg, out)


def _peaked(peaks: dict[str, float], *, fail_above: float = math.inf):
    """A fake runner: metric 90 - 10 * |log10(lr / peak)| per preset (the best rate is the peak), seeds shift it by
    -1 per seed index; a rate above ``fail_above`` fails (a diverged run)."""
    calls: list[RunSpec] = []

    def run(spec: RunSpec, ctx: SweepContext) -> dict:
        calls.append(spec)
        if spec.lr > fail_above:
            raise RuntimeError("loss is nan")
        metric = 90.0 - 10.0 * abs(math.log10(spec.lr / peaks[spec.preset])) - (0 if spec.seed is None else 1)
        return {"metric": metric, "steps_run": 8, "early_stopped": False, "best_val_loss": 1.0}

    return run, calls


# ------------------------------------------------------------------------------------------ rates per preset


def test_each_preset_runs_its_own_rates(tmp_path):
    cfg = parse_config(_config(tmp_path))
    assert cfg.rates("lora") == (1e-3, 1e-2) and cfg.rates("vera") == (1e-2, 1e-1)
    assert [(s.preset, s.lr) for s in sweep.expand_grid(cfg)] == [
        ("lora", 1e-3), ("lora", 1e-2), ("vera", 1e-2), ("vera", 1e-1)]
    shared = parse_config(_config(tmp_path, lrs=[1e-3, 1e-2]))
    assert shared.rates("lora") == shared.rates("vera") == (1e-3, 1e-2)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"lrs": {"lora": [1e-3]}}, r"lrs.vera is missing: give every preset its rates"),
        ({"lrs": {"lora": [1e-3], "vera": [1e-2], "tl6": [1e-2]}}, r"lrs.tl6: not among presets"),
        ({"lrs": {"lora": [1e-3], "vera": [0]}}, r"lrs.vera \[0\]: every learning rate must be a number > 0"),
        ({"lrs": {"lora": [], "vera": [1e-2]}}, r"lrs.lora \[\]: give a non-empty list"),
        ({"extend_edges": -1}, r"extend_edges -1: .*an integer >= 0"),
        ({"best_lr_at_ranks": {"ranks": [32], "presets": ["tl6"]}}, r"best_lr_at_ranks.presets .*lora, vera"),
        ({"best_lr_at_ranks": {"ranks": [8], "presets": ["lora"]}}, r"best_lr_at_ranks.ranks \[8\]: already grid"),
        ({"best_lr_at_ranks": {"rank": [32]}}, r"best_lr_at_ranks .*give a mapping with ranks"),
        ({"best_lr_at_ranks": {"ranks": [32], "presets": ["lora"], "steps": [0, 0]}},
         r"best_lr_at_ranks.steps \[0, 0\]: a non-empty list of distinct integers"),
        ({"best_lr_at_ranks": {"ranks": [32], "presets": ["lora"], "steps": [-0.5]}}, r"best_lr_at_ranks.steps"),
        ({"task": "gsm8k", "sample_sizes": {"test": 9}}, r"sample_sizes: task 'gsm8k' has a fixed generated sample"),
        ({"sample_sizes": {"dev": 9}}, r"sample_sizes .*a mapping of train, validation, test to item counts"),
        ({"sample_sizes": {"test": 0}}, r"sample_sizes .*item counts >= 1"),
    ],
)
def test_bad_study_fields_are_named(tmp_path, changes, expected):
    with pytest.raises(SweepConfigError, match=expected):
        parse_config(_config(tmp_path, **changes))


# ------------------------------------------------------------------------------------------ beyond the edge


def test_rates_are_added_beyond_the_edge_until_the_best_is_inside(tmp_path):
    """lora peaks at 1e-1 (above its grid 1e-3, 1e-2), vera at 1e-3 (below its grid 1e-2, 1e-1): the sweep goes up
    for lora (1e-1, then 1, which is worse: the best 1e-1 is inside) and down for vera (1e-3, then 1e-4)."""
    cfg = parse_config(_config(tmp_path, extend_edges=3))
    run, calls = _peaked({"lora": 1e-1, "vera": 1e-3})
    rows = run_sweep(cfg, runner=run, context=_context(cfg, tmp_path / "out"))
    assert [(s.preset, s.lr) for s in calls] == [
        ("lora", 1e-3), ("lora", 1e-2), ("vera", 1e-2), ("vera", 1e-1),  # the grid
        ("lora", 1e-1), ("vera", 1e-3),                                   # first round beyond the edges
        ("lora", 1.0), ("vera", 1e-4)]                                    # second: both now have the best inside
    assert edge_extensions(cfg, rows) == ([], [])
    assert [(r["preset"], r["lr"]) for r in rows] == [
        ("lora", 1e-3), ("lora", 1e-2), ("lora", 1e-1), ("lora", 1.0),
        ("vera", 1e-4), ("vera", 1e-3), ("vera", 1e-2), ("vera", 1e-1)]
    again, _ = edge_extensions(cfg, rows)
    assert again == []


def test_a_diverged_rate_bounds_the_range(tmp_path):
    """The next rate above lora's grid fails (NaN loss): the grid's top is then inside what was tried."""
    cfg = parse_config(_config(tmp_path, presets=["lora"], lrs=[1e-3, 1e-2], extend_edges=2))
    run, calls = _peaked({"lora": 1.0}, fail_above=2e-2)
    rows = run_sweep(cfg, runner=run, context=_context(cfg, tmp_path / "out"))
    assert [s.lr for s in calls] == [1e-3, 1e-2, 1e-1]
    assert rows[-1]["status"].startswith("failed") and edge_extensions(cfg, rows) == ([], [])


def test_best_still_at_the_edge_after_the_limit_fails_the_study(tmp_path, monkeypatch, capsys):
    cfg = parse_config(_config(tmp_path, presets=["lora"], lrs=[1e-3, 1e-2], extend_edges=1))
    run, calls = _peaked({"lora": 10.0})
    rows = run_sweep(cfg, runner=run, context=_context(cfg, tmp_path / "out"))
    assert [s.lr for s in calls] == [1e-3, 1e-2, 1e-1]
    extra, at_edge = edge_extensions(cfg, rows)
    assert extra == [] and len(at_edge) == 1
    assert re.fullmatch(r"lora r8: best at lr 0\.1, the highest rate tried \(1 added beyond the grid, "
                        r"extend_edges 1\); widen its lrs", at_edge[0])
    assert "best at the edge: lora r8: best at lr 0.1" in capsys.readouterr().out
    # the command exits 1 and says what to do, although every run is ok
    config = tmp_path / "study.yaml"
    config.write_text(json.dumps(_config(tmp_path, presets=["lora"], lrs=[1e-3, 1e-2], extend_edges=1)))
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, verbose=False: rows)
    assert _cli(["sweep", "--config", str(config)]) == 1
    assert "widen lrs or raise extend_edges" in capsys.readouterr().err


def _cli(argv: list[str]) -> int:
    from nemo_tiedlora.apps.cli import main

    return main(argv)


def test_no_extension_when_extend_edges_is_zero(tmp_path):
    cfg = parse_config(_config(tmp_path, presets=["lora"], lrs=[1e-3, 1e-2]))
    run, calls = _peaked({"lora": 1.0})
    rows = run_sweep(cfg, runner=run, context=_context(cfg, tmp_path / "out"))
    assert len(calls) == 2 and "0 added beyond the grid" in edge_extensions(cfg, rows)[1][0]


# ------------------------------------------------------------------------------------------ seeds and ranks


def test_presets_rerun_at_other_ranks_at_their_best_rate_with_every_seed(tmp_path):
    cfg = parse_config(_config(tmp_path, rerun_best_seeds=[4321, 99], extend_edges=2,
                               lrs={"lora": [1e-3, 1e-2, 1e-1], "vera": [1e-2, 1e-1]},
                               best_lr_at_ranks={"ranks": [32], "presets": ["lora"]}))
    run, calls = _peaked({"lora": 1e-2, "vera": 1e-2})
    rows = run_sweep(cfg, runner=run, context=_context(cfg, tmp_path / "out"))
    after_grid = [(s.preset, s.rank, s.lr, s.seed) for s in calls][5:]
    assert after_grid == [
        ("vera", 8, 1e-3, None),                                        # vera's best 1e-2 was the grid's lowest
        ("lora", 8, 1e-2, 4321), ("lora", 8, 1e-2, 99), ("vera", 8, 1e-2, 4321), ("vera", 8, 1e-2, 99),
        ("lora", 32, 1e-2, None), ("lora", 32, 1e-2, 4321), ("lora", 32, 1e-2, 99)]
    r32 = [r for r in rows if r["rank"] == 32]
    assert [r["seed"] for r in r32] == [1234, 4321, 99] and r32[0]["seed_rerun"] is False
    assert r32[0]["trainable_params"] == 4 * next(r for r in rows if r["rank"] == 8)["trainable_params"]
    assert sweep.rerun_count(cfg) == 2 * 2 + 1 * 3
    again: list[RunSpec] = []
    run_again, again = _peaked({"lora": 1e-2, "vera": 1e-2})
    run_sweep(cfg, runner=run_again, context=_context(cfg, tmp_path / "out"))
    assert again == []  # every stage resumes from results.json


def test_other_ranks_try_steps_below_the_best_rate_extend_at_the_edge_then_rerun_the_best(tmp_path):
    """lora peaks at 1e-2 at rank 8 and at 1e-4 at rank 32 (the metric falls by 10 per decade from the peak): rank 32
    tries the rank-8 best and one grid step (x10) below it, goes down while its best is the lowest rate tried, and
    reruns the rate where it peaks with every seed."""
    cfg = parse_config(_config(tmp_path, presets=["lora"], lrs=[1e-3, 1e-2, 1e-1], extend_edges=2,
                               rerun_best_seeds=[4321],
                               best_lr_at_ranks={"ranks": [32], "presets": ["lora"], "steps": [-1, 0]}))
    calls: list[RunSpec] = []

    def run(spec: RunSpec, ctx: SweepContext) -> dict:
        calls.append(spec)
        peak = 1e-2 if spec.rank == 8 else 1e-4
        return {"metric": 90.0 - 10.0 * abs(math.log10(spec.lr / peak)), "steps_run": 8, "early_stopped": False,
                "best_val_loss": 1.0}

    rows = run_sweep(cfg, runner=run, context=_context(cfg, tmp_path / "out"))
    assert [(s.rank, s.lr, s.seed) for s in calls][3:] == [
        (8, 1e-2, 4321),                       # the rank-8 best with the other seed
        (32, 1e-3, None), (32, 1e-2, None),    # rank 32: one step below the rank-8 best, and that rate
        (32, 1e-4, None), (32, 1e-5, None),    # 1e-3 was the lowest tried: down until the best is inside
        (32, 1e-4, 4321)]                      # the rank-32 best with the other seed
    assert edge_extensions(cfg, rows) == ([], [])
    run_again_calls: list[RunSpec] = []
    rerun, run_again_calls = _peaked({"lora": 1e-2})
    run_sweep(cfg, runner=rerun, context=_context(cfg, tmp_path / "out"))
    assert run_again_calls == []  # every stage resumes from results.json


def test_rank_steps_run_out_of_extensions_and_name_the_edge(tmp_path):
    """With extend_edges 1 the rank-32 best (peak 1e-5) stays at the lowest rate tried: the study names it."""
    cfg = parse_config(_config(tmp_path, presets=["lora"], lrs=[1e-3, 1e-2, 1e-1], extend_edges=1,
                               best_lr_at_ranks={"ranks": [32], "presets": ["lora"], "steps": [-1, 0]}))

    def run(spec: RunSpec, ctx: SweepContext) -> dict:
        peak = 1e-2 if spec.rank == 8 else 1e-5
        return {"metric": 90.0 - 10.0 * abs(math.log10(spec.lr / peak)), "steps_run": 8, "early_stopped": False,
                "best_val_loss": 1.0}

    rows = run_sweep(cfg, runner=run, context=_context(cfg, tmp_path / "out"))
    assert sorted(float(r["lr"]) for r in rows if r["rank"] == 32) == [1e-4, 1e-3, 1e-2]
    assert edge_extensions(cfg, rows)[1] == [
        "lora r32: best at lr 0.0001, the lowest rate tried (1 added beyond the grid, extend_edges 1); widen its lrs"]


# ------------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_of_a_named_base_ignores_the_rebuilt_file(tmp_path):
    base = tmp_path / "smollm2.nemo"
    base.write_bytes(b"one")
    named = parse_config(_config(tmp_path, base="smollm2"))
    first = fingerprint(named, base=base, data="sample")
    base.write_bytes(b"rebuilt")  # another machine's import: new mtime, maybe other bytes
    assert fingerprint(named, base=base, data="sample") == first
    by_path = parse_config(_config(tmp_path, base=str(base)))
    before = fingerprint(by_path, base=base, data="sample")
    base.write_bytes(b"changed again")
    assert fingerprint(by_path, base=base, data="sample") != before
    sized = parse_config(_config(tmp_path, base="smollm2", sample_sizes={"test": 96}))
    assert fingerprint(sized, base=base, data="sample") != first


# ------------------------------------------------------------------------------------------ arithmetic


def _evaluate_steps(answer: str) -> int:
    """Check every worked line ``x op y = z`` with Python's arithmetic and that each line uses the one before."""
    lines = answer.splitlines()
    previous = None
    for line in lines[:-1]:
        left, op, right, _, result = line.split()
        value = {"*": int(left) * int(right), "+": int(left) + int(right), "-": int(left) - int(right),
                 "/": int(left) / int(right)}[op]
        assert value == int(result) and int(result) > 0, line
        assert previous is None or str(previous) in (left, right), (line, previous)
        previous = int(result)
    assert lines[-1] == f"#### {previous}"
    return previous


def test_arithmetic_problems_are_worked_correctly_and_splits_are_disjoint(tmp_path):
    task = TASKS["arithmetic"]
    folder = task.write_sample(tmp_path / "a", sizes={"train": 300, "validation": 20, "test": 60})
    questions = {}
    for split, count in (("train", 300), ("validation", 20), ("test", 60)):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == count
        for row in rows:
            assert _evaluate_steps(row["answer"]) == int(gold_number(row["answer"]))
            numbers = [int(n) for n in re.findall(r"\d+", row["question"])]
            b, k = (int(n) for n in re.match(r"(\d+) \* (\d+) =", row["answer"]).groups())
            assert b in numbers and k in numbers
        questions[split] = {row["question"] for row in rows}
    assert not (questions["train"] & questions["test"]) and not (questions["validation"] & questions["test"])
    again = task.write_sample(tmp_path / "b", sizes={"train": 300, "validation": 20, "test": 60})
    assert (again / "test.jsonl").read_text() == (folder / "test.jsonl").read_text()  # deterministic
    sft = prepare("arithmetic", folder, tmp_path / "sft")
    record = json.loads(sft["test"].read_text().splitlines()[0])
    assert record["input"].startswith("Question: ") and record["input"].endswith("\nAnswer:")


def test_arithmetic_scores_the_final_number():
    task = TASKS["arithmetic"]
    gold = "2 * 3 = 6\n10 + 6 = 16\n16 - 4 = 12\n12 / 3 = 4\n#### 4"
    examples = [Example(id=str(i), fields={"question": "q"}, target=gold, references=("4",)) for i in range(3)]
    scores = task.score([gold, "12 / 3 = 5\n#### 5", "#### 4\n#### 7"], examples)
    assert scores["metric"] == pytest.approx(100 * 2 / 3)


def test_extraction_sample_sizes_keep_the_default_items_first(tmp_path):
    task = TASKS["extraction"]
    default = task.write_sample(tmp_path / "d")
    bigger = task.write_sample(tmp_path / "b", sizes={"test": 96})
    small, big = ((f / "test.jsonl").read_text().splitlines() for f in (default, bigger))
    assert len(small) == 48 and len(big) == 96 and big[:48] == small
    assert (default / "train.jsonl").read_text() == (bigger / "train.jsonl").read_text()


# ------------------------------------------------------------------------------------------ the shipped study


@pytest.mark.parametrize("name", ["study_smollm2_extraction", "study_smollm2_arithmetic"])
def test_the_shipped_two_task_study_follows_the_protocol(name):
    """Each task's config: lora, vera, tl5, tl6 at rank 8 with at least three rates each and room to extend beyond
    the edge, three seeds at the best rate, lora and tl6 at rank 32, early stopping on the validation loss, 144 test
    items, the results in the repo."""
    cfg = sweep.load_config(REPO / "conf" / f"{name}.yaml")
    assert cfg.base == "smollm2" and cfg.task == name.rsplit("_", 1)[1]
    assert cfg.presets == ("lora", "vera", "tl5", "tl6") and cfg.ranks == (8,)
    assert all(len(cfg.rates(preset)) >= 3 for preset in cfg.presets) and cfg.extend_edges >= 1
    assert len((cfg.training.seed, *cfg.rerun_best_seeds)) == 3
    assert cfg.best_lr_at_ranks.ranks == (32,) and set(cfg.best_lr_at_ranks.presets) == {"lora", "tl6"}
    assert cfg.best_lr_at_ranks.steps == (-1, 0)  # rank 32 is tuned too: the rank-8 best and one step below
    assert cfg.early_stopping.enabled and cfg.early_stopping.monitor == "validation_loss"
    assert cfg.sample_sizes["test"] == 144
    assert cfg.output == Path("benchmarks/results/study_smollm2_tuned_cpu") / cfg.task


def test_rows_record_paths_relative_to_the_current_folder_when_below_it(tmp_path, monkeypatch):
    """A study kept in a repository (its output below the folder the sweep runs in) records paths that read the
    same on every checkout; an output elsewhere keeps absolute paths."""
    from nemo_tiedlora.apps.study.sweep_runs import _shown

    monkeypatch.chdir(tmp_path)
    assert _shown(tmp_path / "study" / "logs" / "a.log") == "study/logs/a.log"
    outside = tmp_path.parent / "elsewhere" / "a.log"
    assert _shown(outside) == str(outside)

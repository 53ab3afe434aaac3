"""The study's real-model additions: ``prompt_template`` (every split), ``base: smollm2``, the reruns of each
(preset, rank)'s best learning rate with more seeds, the report's mean over seeds, and the ``extraction`` task.

The runner is a fake (the real one runs the entry scripts: ``benchmarks/results/study_smollm2_cpu``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sweep_fakes import fake_context, study_config

from nemo_tiedlora.apps.study import sweep
from nemo_tiedlora.apps.study.report import best_runs, build_report, read_results
from nemo_tiedlora.apps.study.sweep import RunSpec, SweepConfigError, SweepContext, parse_config, run_sweep
from nemo_tiedlora.apps.study.tasks import TASKS, prepare

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n{output}"


def _config(tmp_path: Path, **changes) -> dict:
    return study_config(tmp_path, {"presets": ["lora", "tl6"], "lrs": [1.0e-3, 1.0e-2, 1.0e-1]}, changes)


def _context(cfg, out: Path) -> SweepContext:
    return fake_context(cfg, out)


# Metric of a grid run by (preset, lr): lora peaks at 1e-2, tl6 at 1e-1; reruns score seed-dependent values.
GRID = {("lora", 1e-3): 40.0, ("lora", 1e-2): 70.0, ("lora", 1e-1): 10.0,
        ("tl6", 1e-3): 20.0, ("tl6", 1e-2): 50.0, ("tl6", 1e-1): 60.0}


def _runner(calls: list[RunSpec]):
    def run(spec: RunSpec, ctx: SweepContext) -> dict:
        calls.append(spec)
        metric = GRID[(spec.preset, spec.lr)] if spec.seed is None else GRID[(spec.preset, spec.lr)] - 10.0
        return {"metric": metric, "steps_run": 8, "early_stopped": False, "best_val_loss": 1.0}
    return run


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"prompt_template": "{output} then {input}"}, r"prompt_template .*\{output\} once at its end"),
        ({"prompt_template": "no placeholders"}, r"prompt_template .*\{input\} once"),
        ({"prompt_template": "it's {input} {output}"}, r"prompt_template .*no single quotes"),
        ({"rerun_best_seeds": [1234]}, r"rerun_best_seeds \[1234\]: .*not training.seed"),
        ({"rerun_best_seeds": [7, 7]}, r"rerun_best_seeds \[7, 7\]: list each seed once"),
        ({"rerun_best_seeds": ["x"]}, r"rerun_best_seeds \['x'\]: give a list of integer seeds"),
        ({"base": "smollm3"}, r"base 'smollm3': no such file; .*'smollm2'"),
    ],
)
def test_bad_new_fields_are_named(tmp_path, changes, expected):
    with pytest.raises(SweepConfigError, match=expected):
        parse_config(_config(tmp_path, **changes))


def test_the_smollm2_study_config_is_valid():
    cfg = sweep.load_config(REPO / "conf" / "study_smollm2.yaml")
    assert cfg.base == "smollm2" and cfg.task == "extraction"
    assert cfg.presets == ("lora", "vera", "tl5", "tl6") and cfg.ranks == (8,) and len(cfg.lrs) == 3
    assert cfg.rerun_best_seeds and cfg.training.seed not in cfg.rerun_best_seeds
    assert len(cfg.presets) * len(cfg.ranks) * (len(cfg.lrs) + len(cfg.rerun_best_seeds)) == 16  # the 16 runs
    assert cfg.prompt_template.endswith("<|im_start|>assistant\n{output}")
    from nemo_tiedlora.apps.demo.real import PROMPT_TEMPLATE

    assert cfg.prompt_template == PROMPT_TEMPLATE  # the demo's chat format, the same string


def test_best_lr_of_each_preset_is_rerun_with_each_extra_seed(tmp_path, capsys):
    cfg = parse_config(_config(tmp_path, rerun_best_seeds=[4321, 99]))
    out = tmp_path / "out"
    calls: list[RunSpec] = []
    rows = run_sweep(cfg, runner=_runner(calls), context=_context(cfg, out))
    grid_calls = [(spec.preset, spec.lr) for spec in calls if spec.seed is None]
    assert grid_calls == list(GRID)  # the whole grid first, in config order
    reruns = [(spec.preset, spec.lr, spec.seed) for spec in calls if spec.seed is not None]
    assert reruns == [("lora", 1e-2, 4321), ("lora", 1e-2, 99), ("tl6", 1e-1, 4321), ("tl6", 1e-1, 99)]
    assert [row["seed"] for row in rows] == [1234] * 6 + [4321, 99, 4321, 99]
    assert [row["seed_rerun"] for row in rows] == [False] * 6 + [True] * 4
    assert rows[6]["run"] == "extraction_lora_r8_lr0.01_seed4321"
    # resume: nothing to do, reruns included
    again: list[RunSpec] = []
    capsys.readouterr()
    run_sweep(cfg, runner=_runner(again), context=_context(cfg, out))
    assert again == []
    resumed = capsys.readouterr().out
    assert "resuming: 6 of 6 grid run(s)" in resumed and "will be replaced" not in resumed  # the ok reruns are kept
    # the report: the rate is chosen on the grid's seed; the cell is the mean over the seeds at that rate
    best = best_runs(read_results(out / "results.csv"))
    assert best[("extraction", "lora", 8)].lr == 1e-2
    assert best[("extraction", "lora", 8)].metric == pytest.approx((70.0 + 60.0 + 60.0) / 3)
    assert best[("extraction", "tl6", 8)].lr == 1e-1
    assert best[("extraction", "tl6", 8)].metric == pytest.approx((60.0 + 50.0 + 50.0) / 3)
    table = build_report(out / "results.csv", tmp_path / "report")["table.md"].read_text()
    assert "lora r=8 lr=1e-2: seed 1234: 70.00, seed 4321: 60.00, seed 99: 60.00 (mean 63.33)" in table


def test_rerun_choice_breaks_metric_ties_on_validation_loss(tmp_path):
    cfg = parse_config(_config(tmp_path, presets=["tl6"], lrs=[1.0e-3, 1.0e-2], rerun_best_seeds=[5]))
    rows = [{"task": "extraction", "preset": "tl6", "rank": 8, "lr": lr, "seed": 1234, "seed_rerun": False,
             "status": "ok", "metric": 50.0, "best_val_loss": loss} for lr, loss in ((1e-3, 0.9), (1e-2, 0.4))]
    assert sweep.best_lr_reruns(cfg, rows) == [RunSpec("extraction", "tl6", 8, 1e-2, 5)]
    rows[1]["status"] = "failed: x"
    assert sweep.best_lr_reruns(cfg, rows) == [RunSpec("extraction", "tl6", 8, 1e-3, 5)]


def test_prompt_template_and_seed_reach_the_entry_scripts(tmp_path):
    cfg = parse_config(_config(tmp_path, prompt_template=TEMPLATE, rerun_best_seeds=[4321]))
    ctx = _context(cfg, tmp_path)
    grid = sweep.finetune_args(RunSpec("extraction", "tl6", 8, 0.01), ctx, exp_dir=tmp_path)
    rerun = sweep.finetune_args(RunSpec("extraction", "tl6", 8, 0.01, 4321), ctx, exp_dir=tmp_path)
    for key in ("model.seed", "model.peft.tiedlora_tuning.seed", "model.data.train_ds.seed"):  # init, factors, data
        assert f"{key}=1234" in grid and f"{key}=4321" in rerun
    for split in ("train_ds", "validation_ds"):
        assert f"model.data.{split}.prompt_template='{TEMPLATE}'" in grid
    generate = sweep.generate_args(ctx, adapter=Path("/a.nemo"), prefix=tmp_path / "p")
    assert f"model.data.test_ds.prompt_template='{TEMPLATE}'" in generate
    plain = parse_config(_config(tmp_path))
    assert not any(".prompt_template=" in a for a in sweep.finetune_args(RunSpec("extraction", "tl6", 8, 0.01),
                                                                        _context(plain, tmp_path), exp_dir=tmp_path))


def test_fingerprint_changes_with_the_prompt_template(tmp_path):
    from nemo_tiedlora.apps.study.sweep_results import fingerprint

    one = fingerprint(parse_config(_config(tmp_path)), base="b", data="sample")
    two = fingerprint(parse_config(_config(tmp_path, prompt_template=TEMPLATE)), base="b", data="sample")
    assert one != two


# ------------------------------------------------------------------------------------------------ the task


def test_extraction_task_scores_by_hand():
    task = TASKS["extraction"]
    from nemo_tiedlora.apps.study.tasks.base import Example

    gold = "name=Ana Silva; job=pilot; city=Lima; year=2014"
    examples = [Example(id=str(i), fields={"input": "x"}, target=gold, references=(gold,)) for i in range(4)]
    predictions = [
        gold,                                                      # exact: 4/4 fields
        " name=Ana Silva; job=pilot; city=Lima; year=2014\n",      # exact up to surrounding whitespace
        "name=Ana Silva; job=baker; city=Lima; year=2014",         # 3/4 fields
        "Ana Silva is a pilot in Lima.",                           # prose: 0 fields
    ]
    scores = task.score(predictions, examples)
    assert scores["metric"] == scores["exact_match"] == pytest.approx(50.0)
    assert scores["field_accuracy"] == pytest.approx(100.0 * (4 + 4 + 3 + 0) / 16)


def test_extraction_sample_is_the_demo_data_and_round_trips(tmp_path):
    from nemo_tiedlora.apps.demo.extraction_data import build

    folder = TASKS["extraction"].write_sample(tmp_path / "sample")
    demo = build(tmp_path / "demo")  # the demo's own default seed
    assert (folder / "test.jsonl").read_text() == demo.test.read_text()
    sft = prepare("extraction", folder, tmp_path / "sft")
    records = [json.loads(line) for line in sft["test"].read_text().splitlines()]
    demo_rows = [json.loads(line) for line in demo.test.read_text().splitlines()]
    assert [r["input"] for r in records] == [r["input"] for r in demo_rows]
    assert [r["output"] for r in records] == [r["output"] for r in demo_rows]
    assert len(records) == 48 and len(sft["train"].read_text().splitlines()) == 1200


def test_shipped_study_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: as from an installed wheel
    assert sweep.load_config(Path("study")).task == "homes"
    assert sweep.load_config(Path("study_smollm2.yaml")).task == "extraction"
    with pytest.raises(SweepConfigError, match=r"nope.yaml: no such study config; .*study, study_smollm2"):
        sweep.load_config(Path("nope.yaml"))


def test_report_breaks_metric_ties_on_validation_loss_as_the_sweep_does(tmp_path):
    """All rates score 0 (VeRA in the SmolLM2 study): the sweep reran the rate with the lowest validation loss, so
    the report's cell is that rate, averaged with its rerun."""
    from nemo_tiedlora.apps.study.sweep_results import write_results

    rows = [{"task": "extraction", "preset": "vera", "rank": 8, "lr": lr, "seed": 1234, "seed_rerun": False,
             "metric": 0.0, "trainable_params": 10, "status": "ok", "best_val_loss": loss}
            for lr, loss in ((5e-4, 1.9), (2e-3, 1.8), (8e-3, 1.6))]
    cfg = parse_config(_config(tmp_path, presets=["vera"], lrs=[5e-4, 2e-3, 8e-3], rerun_best_seeds=[4321]))
    (rerun,) = sweep.best_lr_reruns(cfg, rows)
    assert rerun.lr == 8e-3
    rows.append({**rows[2], "seed": 4321, "seed_rerun": True, "metric": 0.0, "best_val_loss": 1.7})
    write_results(tmp_path, rows)
    best = best_runs(read_results(tmp_path / "results.csv"))[("extraction", "vera", 8)]
    assert best.lr == 8e-3 and [seed for seed, _ in best.seed_metrics] == [1234, 4321]

"""``python -m nemo_tiedlora sweep``: config validation, grid, closed-form counts, % of best LoRA, resume, atomic
writes.

No NeMo run here: the sweep's runner is replaced by a fake that returns a metric (the real runner is exercised by
tests/integration/test_sweep.py).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from nemo_tiedlora.apps.cli import main as cli_main
from nemo_tiedlora.apps.study import sweep
from nemo_tiedlora.apps.study.report import read_results
from nemo_tiedlora.apps.study.sweep import (
    RunSpec,
    SweepConfigError,
    SweepContext,
    add_percent_of_best_lora,
    expand_grid,
    parse_config,
    run_sweep,
    trainable_params,
    write_results,
)

REPO = Path(__file__).resolve().parents[2]
# Llama-style GQA shape: d=64, 2 layers, 4 heads of 16, 2 query groups -> fused QKV width 4*16 + 2*2*16 = 128
SHAPE = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
         "out_features": 128}


def _config(tmp_path: Path, **changes):
    data = {
        "task": "squad",
        "data": "sample",
        "base": "embedded",
        "output": str(tmp_path / "out"),
        "presets": ["lora", "tl6"],
        "ranks": [2, 8],
        "lrs": [1.0e-3, 1.0e-2],
        "training": {"max_steps": 8, "val_check_interval": 2, "global_batch_size": 4, "micro_batch_size": 2},
    }
    data.update(changes)
    return data


# ------------------------------------------------------------------------------------------------ config


def test_valid_config_and_defaults(tmp_path):
    cfg = parse_config(_config(tmp_path, lrs=["1e-4", 0.5], presets=["LoRA", "tl6"]))
    assert cfg.task == "squad"
    assert cfg.presets == ("lora", "tl6")
    assert cfg.ranks == (2, 8)
    assert cfg.lrs == (0.0001, 0.5)  # YAML 1.1 reads 1e-4 as a string: accepted as the number
    assert cfg.training.max_steps == 8 and cfg.training.micro_batch_size == 2
    assert cfg.early_stopping.enabled is True and cfg.early_stopping.monitor == "validation_loss"
    assert cfg.output == tmp_path / "out"


def test_example_config_in_conf_is_valid():
    cfg = sweep.load_config(REPO / "conf" / "study.yaml")
    assert cfg.base == "embedded" and cfg.data == "sample"
    assert "lora" in cfg.presets  # percent_of_best_lora needs a LoRA run
    assert cfg.training.val_check_interval <= cfg.training.max_steps


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"task": "squad2"}, "task 'squad2' is unknown"),
        ({"presets": ["lora", "tl9"]}, "presets ['tl9'] unknown"),
        ({"presets": []}, "presets []"),
        ({"presets": ["tl6", "tl6"]}, "repeat"),
        ({"ranks": [4, 0]}, "ranks [0]: every rank must be an integer > 0"),
        ({"ranks": [-2]}, "ranks [-2]"),
        ({"ranks": ["4"]}, "ranks ['4']"),
        ({"ranks": []}, "ranks []"),
        ({"lrs": [0.001, 0]}, "lrs [0]: every learning rate must be a number > 0"),
        ({"lrs": [-1.0e-3]}, "lrs [-0.001]"),
        ({"lrs": ["fast"]}, "lrs ['fast']"),
        ({"lrs": []}, "lrs []"),
        ({"base": "/no/such/base.nemo"}, "base '/no/such/base.nemo': no such file"),
        ({"data": "/no/such/folder"}, "data '/no/such/folder' is not a folder"),
        ({"output": ""}, "output ''"),
        ({"epochs": 3}, "unknown field 'epochs'"),
        ({"training": {"max_steps": 4, "val_check_interval": 10}}, "val_check_interval 10 > training.max_steps 4"),
        ({"training": {"max_steps": 0}}, "training.max_steps 0"),
        ({"training": {"global_batch_size": 6, "micro_batch_size": 4}}, "not a multiple"),
        ({"training": {"steps": 4}}, "unknown field training.steps"),
        ({"early_stopping": {"patience": -1}}, "early_stopping.patience -1"),
        ({"early_stopping": {"mode": "lowest"}}, "early_stopping.mode 'lowest'"),
        ({"early_stopping": {"min_delta": -0.1}}, "early_stopping.min_delta -0.1"),
        ({"generation": {"tokens_to_generate": 0}}, "generation.tokens_to_generate 0"),
    ],
)
def test_each_bad_field_is_named(tmp_path, changes, expected):
    with pytest.raises(SweepConfigError) as info:
        parse_config(_config(tmp_path, **changes))
    assert expected in str(info.value)
    assert "1 problem(s)" in str(info.value)


def test_every_bad_field_in_one_error(tmp_path):
    bad = _config(tmp_path, task="nope", presets=["x"], ranks=[0], lrs=[0], base="/missing.nemo")
    with pytest.raises(SweepConfigError) as info:
        parse_config(bad)
    message = str(info.value)
    assert "5 problem(s)" in message
    for field in ("task", "presets", "ranks", "lrs", "base"):
        assert f"\n  - {field}" in message


def test_bad_yaml_file_and_cli_exit_code(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("task: squad\npresets: [lora]\nranks: [0]\nlrs: [1.0e-3]\noutput: out\n")
    assert cli_main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ranks [0]" in err
    assert cli_main(["sweep", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_dry_run_lists_the_grid(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(f"task: gsm8k\npresets: [lora, vera]\nranks: [4]\nlrs: [1.0e-3, 1.0e-2]\noutput: {tmp_path}\n")
    assert cli_main(["sweep", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 run(s) of gsm8k" in out
    for name in ("gsm8k_lora_r4_lr0.001", "gsm8k_lora_r4_lr0.01", "gsm8k_vera_r4_lr0.001", "gsm8k_vera_r4_lr0.01"):
        assert name in out
    assert not (tmp_path / "results.csv").exists()


# ------------------------------------------------------------------------------------------------ grid and counts


def test_grid_is_the_full_product_preset_major(tmp_path):
    cfg = parse_config(_config(tmp_path, presets=["tl6", "lora", "vera"], ranks=[8, 2], lrs=[0.1, 0.01]))
    expected = []
    for preset in ("tl6", "lora", "vera"):
        for rank in (8, 2):
            for lr in (0.1, 0.01):
                expected.append(RunSpec("squad", preset, rank, lr))
    assert expand_grid(cfg) == expected
    assert len({spec.name for spec in expected}) == 12


def test_trainable_params_closed_form():
    d, layers, out = 64, 2, 128
    for r in (1, 2, 8):
        assert trainable_params(SHAPE, "lora", r) == layers * (d * r + out * r)
        assert trainable_params(SHAPE, "tl6", r) == d * r + out * r + layers * r + layers * out
        assert trainable_params(SHAPE, "vera", r) == layers * r + layers * out
        assert trainable_params(SHAPE, "tl1", r) == d * r
        assert trainable_params(SHAPE, "tl4", r) == out * r + layers * r


def test_percent_of_best_lora_by_hand():
    rows = [
        {"task": "squad", "preset": "lora", "rank": 2, "lr": 1e-3, "metric": 70.0, "trainable_params": 1000,
         "status": "ok"},
        {"task": "squad", "preset": "lora", "rank": 8, "lr": 1e-3, "metric": 75.0, "trainable_params": 4000,
         "status": "ok"},  # the best LoRA run of squad: the reference
        {"task": "squad", "preset": "lora", "rank": 16, "lr": 1e-3, "metric": None, "trainable_params": 8000,
         "status": "failed: boom"},  # not finished: neither reference nor given a percentage
        {"task": "squad", "preset": "tl6", "rank": 8, "lr": 1e-3, "metric": 80.0, "trainable_params": 500,
         "status": "ok"},
        {"task": "gsm8k", "preset": "tl6", "rank": 8, "lr": 1e-3, "metric": 10.0, "trainable_params": 500,
         "status": "ok"},  # no LoRA run of gsm8k
    ]
    got = [row["percent_of_best_lora"] for row in add_percent_of_best_lora(rows)]
    assert got == [pytest.approx(1000 / 4000 * 100), pytest.approx(100.0), None, pytest.approx(500 / 4000 * 100), None]


def test_percent_of_best_lora_first_on_ties():
    rows = [
        {"task": "squad", "preset": "lora", "rank": 2, "lr": 1e-3, "metric": 50.0, "trainable_params": 200,
         "status": "ok"},
        {"task": "squad", "preset": "lora", "rank": 4, "lr": 1e-3, "metric": 50.0, "trainable_params": 400,
         "status": "ok"},
    ]
    assert [row["percent_of_best_lora"] for row in add_percent_of_best_lora(rows)] == [100.0, 200.0]


# ------------------------------------------------------------------------------------------------ running, resume


def _context(cfg, out: Path, fingerprint: str = "fp-1") -> SweepContext:
    return SweepContext(cfg=cfg, base=out / "base.nemo", shape=SHAPE, sft={}, source=out, out=out,
                        fingerprint=fingerprint)


class FakeRunner:
    """Returns metric = 10 * rank (+ lr) and snapshots results.json at every call; fails or stops on request."""

    def __init__(self, out: Path, *, fail: set = frozenset(), interrupt_at: int | None = None):
        self.out, self.fail, self.interrupt_at = out, fail, interrupt_at
        self.calls: list[str] = []
        self.snapshots: list[int] = []

    def __call__(self, spec, ctx):
        path = self.out / "results.json"
        self.snapshots.append(len(json.loads(path.read_text())) if path.exists() else 0)
        self.calls.append(spec.name)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if spec.name in self.fail:
            raise RuntimeError(f"fine-tune {spec.name} failed (exit 1); last lines of x.log:\n"
                               "  a\nValueError: bad lr\n")
        return {"metric": 10.0 * spec.rank + spec.lr, "steps_run": 4, "early_stopped": True, "best_val_loss": 1.5}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_records_failures_rewrites_after_each_run_and_resumes(tmp_path):
    out = tmp_path / "out"
    cfg = parse_config(_config(tmp_path, ranks=[2], lrs=[1.0e-3, 1.0e-2]))  # 4 runs
    failing = "squad_tl6_r2_lr0.001"
    runner = FakeRunner(out, fail={failing})
    rows = run_sweep(cfg, runner=runner, context=_context(cfg, out))
    assert runner.calls == ["squad_lora_r2_lr0.001", "squad_lora_r2_lr0.01", "squad_tl6_r2_lr0.001",
                            "squad_tl6_r2_lr0.01"]
    assert runner.snapshots == [0, 1, 2, 3]  # the results file was rewritten after every run
    table = _csv_rows(out / "results.csv")
    assert [r["status"] for r in table] == ["ok", "ok", "failed: fine-tune squad_tl6_r2_lr0.001 failed (exit 1): "
                                            "ValueError: bad lr", "ok"]
    assert [r["status"] for r in rows] == [r["status"] for r in table]
    lora_params = 2 * (64 * 2 + 128 * 2)
    tl6_params = 64 * 2 + 128 * 2 + 2 * 2 + 2 * 128
    assert [int(r["trainable_params"]) for r in table] == [lora_params, lora_params, tl6_params, tl6_params]
    # best LoRA run: lr 1e-2 (metric 20.01 > 20.001); both LoRA runs have the same count
    assert float(table[3]["percent_of_best_lora"]) == pytest.approx(100 * tl6_params / lora_params)
    assert table[2]["percent_of_best_lora"] == "" and table[2]["metric"] == ""
    assert json.loads((out / "results.json").read_text())[0]["metric"] == pytest.approx(20.001)
    # the report reads the file: 3 finished runs, the failed one kept as not ok
    runs = read_results(out / "results.csv")
    assert [run.ok for run in runs] == [True, True, False, True]

    again = FakeRunner(out)
    run_sweep(cfg, runner=again, context=_context(cfg, out))
    assert again.calls == [failing]  # only the failed run is re-run
    assert [r["status"] for r in _csv_rows(out / "results.csv")] == ["ok"] * 4

    third = FakeRunner(out)
    run_sweep(cfg, runner=third, context=_context(cfg, out))
    assert third.calls == []  # everything ok: nothing to do

    changed = FakeRunner(out)
    run_sweep(cfg, runner=changed, context=_context(cfg, out, fingerprint="fp-2"))  # other budget/base/data
    assert len(changed.calls) == 4


def test_interrupted_sweep_keeps_finished_runs_and_resumes(tmp_path):
    out = tmp_path / "out"
    cfg = parse_config(_config(tmp_path, presets=["lora"], ranks=[2, 4, 8], lrs=[0.01]))
    runner = FakeRunner(out, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, runner=runner, context=_context(cfg, out))
    table = _csv_rows(out / "results.csv")
    assert [(r["rank"], r["status"]) for r in table] == [("2", "ok"), ("4", "ok")]
    resumed = FakeRunner(out)
    run_sweep(cfg, runner=resumed, context=_context(cfg, out))
    assert resumed.calls == ["squad_lora_r8_lr0.01"]
    assert [r["rank"] for r in _csv_rows(out / "results.csv")] == ["2", "4", "8"]


def test_results_are_written_atomically(tmp_path, monkeypatch):
    rows = [{"task": "squad", "preset": "lora", "rank": 2, "lr": 0.01, "metric": 1.0, "trainable_params": 10,
             "status": "ok"}]
    csv_path, json_path = write_results(tmp_path, rows)
    before = csv_path.read_bytes(), json_path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_results(tmp_path, rows + rows)
    assert (csv_path.read_bytes(), json_path.read_bytes()) == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]  # no temp file left


# ------------------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize(
    "error, expected",
    [
        (RuntimeError("generate r failed (exit 1); last lines of g.log:\nError executing job with overrides: [x]\n"
                      "[rank0]: RuntimeError: cannot reshape tensor\n[rank0]:[W] done"),
         "failed: generate r failed (exit 1): RuntimeError: cannot reshape tensor"),
        (RuntimeError("generate r failed (exit 1); tail:\nRuntimeError: cannot reshape tensor of 0 elements"),
         "failed: generate r failed (exit 1): RuntimeError: cannot reshape tensor of 0 elements (prompts truncated "
         "to nothing: raise training/generation max_seq_length)"),
        (RuntimeError("fine-tuning wrote no adapter .nemo under /r"),
         "failed: fine-tuning wrote no adapter .nemo under /r"),
        (KeyError("id"), "failed: KeyError: 'id'"),
    ],
)
def test_failure_status_is_one_line_with_the_cause(error, expected):
    assert sweep._failure(error) == expected


def test_predictions_are_matched_by_id(tmp_path):
    from nemo_tiedlora.apps.study.tasks.base import Example

    examples = [Example(id=i, fields={}, target="", references=("",)) for i in ("a", "b", "c")]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "pred": f"P{i}", "label": ""}) + "\n" for i in ("c", "a", "b")))
    assert sweep.read_predictions(path, examples) == ["Pa", "Pb", "Pc"]
    path.write_text(json.dumps({"id": "a", "pred": "x"}) + "\n")
    with pytest.raises(RuntimeError, match="1 predictions for 3 test examples"):
        sweep.read_predictions(path, examples)


def test_finetune_command_carries_early_stopping_and_budget(tmp_path):
    cfg = parse_config(_config(tmp_path, early_stopping={"patience": 1, "min_delta": 5.0}))
    ctx = SweepContext(cfg=cfg, base=Path("/b/base.nemo"), shape=SHAPE,
                       sft={"train": Path("/d/train.jsonl"), "validation": Path("/d/validation.jsonl"),
                            "test": Path("/d/test.jsonl")}, source=tmp_path, out=tmp_path, fingerprint="x")
    args = sweep.finetune_args(RunSpec("squad", "tl6", 8, 0.01), ctx, exp_dir=tmp_path / "runs")
    assert args[1].endswith("nemo_tiedlora/apps/entry_scripts/megatron_gpt_finetuning.py")  # the packaged entry script
    for expected in (
        "model.restore_from_path=/b/base.nemo",
        "model.peft.peft_scheme=tiedlora",
        "model.peft.tiedlora_tuning.preset=tl6",
        "model.peft.tiedlora_tuning.adapter_dim=8",
        "model.optim.lr=0.01",
        "trainer.max_steps=8",
        "trainer.val_check_interval=2",
        "model.global_batch_size=4",
        "model.micro_batch_size=2",
        "exp_manager.create_early_stopping_callback=True",
        "exp_manager.early_stopping_callback_params.monitor=validation_loss",
        "exp_manager.early_stopping_callback_params.patience=1",
        "exp_manager.early_stopping_callback_params.min_delta=5.0",
        "model.data.train_ds.file_names=[/d/train.jsonl]",
        "model.data.validation_ds.file_names=[/d/validation.jsonl]",
    ):
        assert expected in args
    generate = sweep.generate_args(ctx, adapter=Path("/a.nemo"), prefix=tmp_path / "p")
    assert "model.peft.restore_from_path=/a.nemo" in generate
    assert "model.data.test_ds.file_names=[/d/test.jsonl]" in generate


def test_multiple_choice_is_scored_by_the_loglik_script(tmp_path):
    """HellaSwag goes through the log-likelihood scorer (the paper's protocol), not through generation."""
    cfg = parse_config(_config(tmp_path, task="hellaswag"))
    ctx = SweepContext(cfg=cfg, base=Path("/b/base.nemo"), shape=SHAPE, sft={"test": Path("/d/test.jsonl")},
                       source=tmp_path, out=tmp_path, fingerprint="x")
    args = sweep.loglik_args(ctx, adapter=Path("/a.nemo"), out=tmp_path / "s.json")
    assert args[1:3] == ["-m", "nemo_tiedlora.apps.study.loglik"]
    assert args[args.index("--adapter") + 1] == "/a.nemo" and args[args.index("--split") + 1] == "test"
    assert args[args.index("--data") + 1] == str(ctx.source) and args[args.index("--task") + 1] == "hellaswag"

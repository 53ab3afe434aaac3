"""``python -m nemo_tiedlora bench`` as typed: the default output is a work folder, never the
results shipped in benchmarks/results; the base row reports no adapter memory; the tiny base is built in a
temporary folder and moved into place, so an interrupted build leaves no ``model_weights/`` in --work.
No NeMo: the measurement and the base's pre-training are stand-ins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_tiedlora.apps import bench
from nemo_tiedlora.apps.demo import embedded
from nemo_tiedlora.apps.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def recorded_out(monkeypatch):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"machine": {"device": "cpu"}, "model": "m", "rank": kwargs["rank"], "steps": 1, "batch": 1,
                "rounds": 1, "rows": [], "targets": []}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "_markdown", lambda report: "table")
    return seen


def test_default_out_is_the_work_folder_not_the_shipped_results(recorded_out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["bench", "--work", "w"]) == 0
    assert Path(recorded_out["out"]) == Path("w") / "results"
    assert cli_main(["bench"]) == 0
    assert Path(recorded_out["out"]) == Path(".cache/bench/results")
    assert cli_main(["bench", "--out", "benchmarks/results"]) == 0  # replacing them is a choice spelled out
    assert Path(recorded_out["out"]) == Path("benchmarks/results")


def test_base_row_shows_no_adapter_memory():
    row = {"config": "base", "median_step_s": 0.5, "round_medians_s": [0.5], "peak_rss_mb": 900.0,
           "adapter_memory_bytes": None, "trainable_parameters": 0, "optimizer_state_bytes": 0}
    lora = dict(row, config="lora", median_step_s=1.0, adapter_memory_bytes=10_304, trainable_parameters=5)
    text = bench._markdown({"machine": {"device": "cpu"}, "model": "m", "rank": 8, "steps": 3, "batch": 2,
                            "rounds": 1, "rows": [row, lora], "targets": []})
    base_line = next(line for line in text.splitlines() if line.startswith("| base |"))
    assert base_line.split("|")[7].strip() == "-"  # the adapter memory column
    assert "| 10,304 |" in next(line for line in text.splitlines() if line.startswith("| lora |"))


def _fake_builder(monkeypatch, *, interrupt: bool):
    """Stands in for the runner running `python -m nemo_tiedlora.apps.demo.base_model --out X`: stages
    model_weights/ next to X like NeMo's save_to, then either stops (Ctrl-C) or writes X and its manifest."""
    calls = []

    def fake_run(command, *, log, **kwargs):
        Path(log).write_text("")  # the runner writes the child's output there
        out = Path(command[command.index("--out") + 1])
        calls.append(out)
        (out.parent / "model_weights").mkdir()
        if interrupt:
            raise KeyboardInterrupt
        out.write_bytes(b"nemo")
        out.with_suffix(".json").write_text(json.dumps({"fingerprint": "F"}))
        (out.parent / "model_weights").rmdir()

    monkeypatch.setattr(embedded, "run_logged", fake_run)
    monkeypatch.setattr("nemo_tiedlora.apps.demo.base_model._fingerprint", lambda *args: "F")
    return calls


class _Data:
    corpus = tokenizer_model = Path("unused")


def test_interrupted_base_build_leaves_nothing_in_work(tmp_path, monkeypatch):
    _fake_builder(monkeypatch, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        embedded.embedded_base(tmp_path, _Data())
    assert list(tmp_path.iterdir()) == [tmp_path / "base.log"]  # no model_weights/, no partial base


def test_base_is_moved_into_place_and_then_reused(tmp_path, monkeypatch):
    stale = tmp_path / ".base-build-killed" / "model_weights"  # left by a SIGKILLed build
    stale.mkdir(parents=True)
    calls = _fake_builder(monkeypatch, interrupt=False)
    base = embedded.embedded_base(tmp_path, _Data())
    assert base == tmp_path / "base.nemo" and base.read_bytes() == b"nemo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.json", "base.log", "base.nemo"]
    assert embedded.embedded_base(tmp_path, _Data()) == base and len(calls) == 1  # cached: not built again

"""Fixtures shared by the multi-process suites (tests/distributed, tests/multinode): the tiny 4-layer GQA base and
the entry script's TP1 run on it, each built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dist_base(tmp_path_factory):
    """(base .nemo, data folder, work folder): a 4-layer GQA base (4 heads, 2 query groups) trained 20 steps."""
    from nemo_tiedlora.apps.demo.base_model import BaseSpec, build_base_model
    from nemo_tiedlora.apps.demo.data import build_all

    work = tmp_path_factory.mktemp("dist")
    data = build_all(work / "data")
    spec = BaseSpec(num_layers=4, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4, num_query_groups=2,
                    steps=20, batch_size=8)
    base, _ = build_base_model(work / "base.nemo", corpus=data.corpus, tokenizer_model=data.tokenizer_model, spec=spec)
    return base, work / "data", work


@pytest.fixture(scope="session")
def script_tp1(dist_base):
    """The adapter the entry script writes at TP=PP=DP=1 (one process): every launch mode's reference."""
    from nemo_tiedlora.formats.adapter_archive import load_archive
    from tests.entry_runs import run_finetune

    base, data, work = dist_base
    return load_archive(run_finetune(base, data, work, "script_tp1", 1))


@pytest.fixture(scope="session")
def bank_reference(dist_base):
    """(base, adapters' folder, items, answers): three adapter archives and the generate script's answer to each item
    with its adapter alone (tests/bank_runs.py)."""
    from tests.bank_runs import reference_answers

    return reference_answers(dist_base)

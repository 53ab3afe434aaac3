"""The embedded base's cache key: a base built for another spec or corpus is rebuilt, never reused stale."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from nemo_tiedlora.apps.demo import embedded
from nemo_tiedlora.apps.demo.base_model import BaseSpec


@dataclasses.dataclass
class _Data:
    corpus: Path
    tokenizer_model: Path


def _key(spec: BaseSpec, data: _Data) -> str:
    """The cache key written out independently: sha256 of the spec's fields (sorted JSON), corpus and tokenizer."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    digest.update(data.corpus.read_bytes())
    digest.update(data.tokenizer_model.read_bytes())
    return digest.hexdigest()


def _setup(tmp_path: Path, monkeypatch, *, cached_spec: BaseSpec, cached_corpus: bytes) -> tuple[_Data, list]:
    """A work folder holding a base cached for `cached_spec` and `cached_corpus`; the builder replaced by one that
    records its calls and writes a base whose manifest holds the current key."""
    (tmp_path / "corpus.txt").write_bytes(cached_corpus)
    (tmp_path / "tokenizer.model").write_bytes(b"tok")
    data = _Data(tmp_path / "corpus.txt", tmp_path / "tokenizer.model")
    (tmp_path / "base.nemo").write_bytes(b"old base")
    (tmp_path / "base.json").write_text(json.dumps({"fingerprint": _key(cached_spec, data)}))
    calls = []

    def fake_run(command, *, log, **kwargs):
        Path(log).write_text("")
        out = Path(command[command.index("--out") + 1])
        calls.append(command)
        out.write_bytes(b"new base")
        out.with_suffix(".json").write_text(json.dumps({"fingerprint": _key(BaseSpec(), data)}))

    monkeypatch.setattr(embedded, "run_logged", fake_run)
    return data, calls


def test_base_cached_for_the_current_spec_and_corpus_is_reused(tmp_path, monkeypatch):
    data, calls = _setup(tmp_path, monkeypatch, cached_spec=BaseSpec(), cached_corpus=b"corpus")
    assert embedded.embedded_base(tmp_path, data).read_bytes() == b"old base" and calls == []


def test_base_cached_for_another_pretraining_budget_is_rebuilt(tmp_path, monkeypatch):
    """A base from a shorter pre-training (another spec) is replaced by a fresh build, then reused."""
    shorter = dataclasses.replace(BaseSpec(), steps=BaseSpec().steps // 2)
    data, calls = _setup(tmp_path, monkeypatch, cached_spec=shorter, cached_corpus=b"corpus")
    base = embedded.embedded_base(tmp_path, data)
    assert base.read_bytes() == b"new base" and len(calls) == 1
    assert embedded.embedded_base(tmp_path, data) == base and len(calls) == 1


def test_base_cached_for_another_corpus_is_rebuilt(tmp_path, monkeypatch):
    data, calls = _setup(tmp_path, monkeypatch, cached_spec=BaseSpec(), cached_corpus=b"corpus")
    data.corpus.write_bytes(b"a changed corpus")
    assert embedded.embedded_base(tmp_path, data).read_bytes() == b"new base" and len(calls) == 1

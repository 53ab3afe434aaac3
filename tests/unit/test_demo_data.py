"""Tests of the demo's generated corpus, tokenizer, SFT task and metric (no NeMo needed)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from nemo_tiedlora.apps.demo import data


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> data.DemoData:
    """One full build with the default parameters, shared by the read-only tests."""
    return data.build_all(tmp_path_factory.mktemp("demo"))


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _paths(demo: data.DemoData) -> list[Path]:
    return [demo.corpus, demo.tokenizer_model, demo.train, demo.validation, demo.test]


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_corpus_is_deterministic(tmp_path: Path) -> None:
    first = data.build_corpus(tmp_path / "a.txt", num_lines=300, seed=3)
    second = data.build_corpus(tmp_path / "b.txt", num_lines=300, seed=3)
    other = data.build_corpus(tmp_path / "c.txt", num_lines=300, seed=4)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    assert len(first.read_text(encoding="utf-8").splitlines()) == 300


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    corpus = data.build_corpus(tmp_path / "corpus.txt", num_lines=2000, seed=0)
    first = data.build_tokenizer(corpus, tmp_path / "a")
    second = data.build_tokenizer(corpus, tmp_path / "b")
    assert first.name == second.name == "tokenizer.model"
    assert first.read_bytes() == second.read_bytes()


def test_task_is_deterministic(tmp_path: Path) -> None:
    first = data.build_task(tmp_path / "a", num_train=50, num_val=10, num_test=10, seed=1)
    second = data.build_task(tmp_path / "b", num_train=50, num_val=10, num_test=10, seed=1)
    other = data.build_task(tmp_path / "c", num_train=50, num_val=10, num_test=10, seed=2)
    assert set(first) == {"train", "validation", "test"}
    for split in first:
        assert first[split].read_bytes() == second[split].read_bytes()
        assert first[split].read_bytes() != other[split].read_bytes()


def test_test_split_does_not_depend_on_train_size(tmp_path: Path) -> None:
    small = data.build_task(tmp_path / "a", num_train=20, num_val=5, num_test=30)
    large = data.build_task(tmp_path / "b", num_train=200, num_val=50, num_test=30)
    assert small["test"].read_bytes() == large["test"].read_bytes()


def test_build_all_is_deterministic(tmp_path: Path, built: data.DemoData) -> None:
    again = data.build_all(tmp_path)
    for mine, theirs in zip(_paths(again), _paths(built)):
        assert mine.read_bytes() == theirs.read_bytes(), mine.name


# ---------------------------------------------------------------------------------------------
# The task files
# ---------------------------------------------------------------------------------------------


def test_split_sizes(built: data.DemoData) -> None:
    assert len(_records(built.train)) == 2000
    assert len(_records(built.validation)) == 200
    assert len(_records(built.test)) == 200


def test_jsonl_format(built: data.DemoData) -> None:
    for path in (built.train, built.validation, built.test):
        for record in _records(path):
            assert set(record) == {"input", "output"}
            assert isinstance(record["input"], str) and record["input"].strip()
            assert isinstance(record["output"], str) and record["output"].strip()
            assert record["input"] == " ".join(record["input"].split())
            assert record["input"].endswith(" is which"), "prompts end with the separator"


def test_splits_are_disjoint(built: data.DemoData) -> None:
    inputs = {split: {r["input"] for r in _records(getattr(built, split))}
              for split in ("train", "validation", "test")}
    assert not inputs["test"] & inputs["train"]
    assert not inputs["test"] & inputs["validation"]
    assert not inputs["validation"] & inputs["train"]
    statements = {split: {text.split(" . ")[0] for text in items} for split, items in inputs.items()}
    assert not statements["test"] & statements["train"], "no test statement is seen in training"
    assert len(inputs["train"]) == 2000, "no duplicates inside train"


def test_answers_are_the_queried_animals_home_as_the_corpus_states_it(built: data.DemoData) -> None:
    vocabulary = set(data.VOCABULARY)
    corpus = built.corpus.read_text(encoding="utf-8")
    for path in (built.train, built.validation, built.test):
        for record in _records(path):
            answer, words = record["output"], record["input"].split()
            queried = words[-3]  # "... the home of the <animal> is which"
            assert answer in data.PLACES and len(answer.split()) == 1
            assert f"the {queried} lives in the {answer} ." in corpus, "the base can learn the fact in pre-training"
            assert set(words) <= vocabulary


def test_the_corpus_says_lives_in_of_each_animals_home_only(built: data.DemoData) -> None:
    """Every "<animal> lives in the <place>" in the corpus names that animal's home (the facts never disagree), and
    every animal's home is stated."""
    import re

    stated = collections.defaultdict(set)
    for animal, place in re.findall(r"(\w+) lives in the (\w+)", built.corpus.read_text(encoding="utf-8")):
        stated[animal].add(place)
    assert dict(stated) == {animal: {home} for animal, home in data.HOMES.items()}


def test_trivial_baselines_are_poor(built: data.DemoData) -> None:
    """The metric can show improvement: neither a constant nor the other animal's home does well."""
    train, test = _records(built.train), _records(built.test)
    most_frequent, _ = collections.Counter(r["output"] for r in train).most_common(1)[0]
    constant = data.score([most_frequent] * len(test), [r["output"] for r in test])
    assert constant < 0.35
    other_home = [data.HOMES[r["input"].split()[1]] for r in test]  # "the <other> is <color> and ..."
    assert data.score(other_home, [r["output"] for r in test]) < 0.5


def test_corpus_never_uses_the_question_format(built: data.DemoData) -> None:
    corpus = built.corpus.read_text(encoding="utf-8")
    assert "the home of the" not in corpus
    lines = corpus.splitlines()
    assert len(lines) == 20000 and all(line.strip() for line in lines)
    assert set(corpus.split()) <= set(data.VOCABULARY)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_special_ids(built: data.DemoData) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(built.tokenizer_model))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() <= 256


def test_tokenizer_round_trips_task_strings(built: data.DemoData) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(built.tokenizer_model))
    for path in (built.train, built.validation, built.test):
        for record in _records(path):
            text = f"{record['input']} {record['output']}"
            ids = sp.encode(text)
            assert data.UNK_ID not in ids
            assert sp.decode(ids) == text


def test_every_vocabulary_word_is_compact(built: data.DemoData) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(built.tokenizer_model))
    for word in data.VOCABULARY:
        pieces = sp.encode(word, out_type=str)
        assert len(pieces) <= 2, (word, pieces)
        assert sp.encode(f"the {word}", out_type=str)[1:] == pieces, "a word tokenizes alike mid-text"
    for word in data.ANIMALS:
        assert sp.encode(f" {word}", out_type=str) == [f"\u2581{word}"], "answers are one piece"


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def _mtimes(demo: data.DemoData) -> list[int]:
    return [path.stat().st_mtime_ns for path in _paths(demo)]


def test_cache_is_reused(tmp_path: Path) -> None:
    first = data.build_all(tmp_path, num_lines=500, num_train=40, num_val=5, num_test=5)
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["params"]["num_lines"] == 500
    before = _mtimes(first)
    second = data.build_all(tmp_path, num_lines=500, num_train=40, num_val=5, num_test=5)
    assert second == first
    assert _mtimes(second) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp files left"


@pytest.mark.parametrize("victim", ["corpus", "tokenizer_model", "train", "test"])
def test_cache_is_rebuilt_when_a_file_is_corrupted(tmp_path: Path, victim: str) -> None:
    demo = data.build_all(tmp_path, num_lines=500, num_train=40, num_val=5, num_test=5)
    originals = {path: path.read_bytes() for path in _paths(demo)}
    path = getattr(demo, victim)
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    data.build_all(tmp_path, num_lines=500, num_train=40, num_val=5, num_test=5)
    assert {p: p.read_bytes() for p in _paths(demo)} == originals


def test_cache_is_rebuilt_when_a_file_is_missing_or_params_change(tmp_path: Path) -> None:
    demo = data.build_all(tmp_path, num_lines=500, num_train=40, num_val=5, num_test=5)
    train = demo.train.read_bytes()
    demo.validation.unlink()
    data.build_all(tmp_path, num_lines=500, num_train=40, num_val=5, num_test=5)
    assert demo.validation.is_file()
    data.build_all(tmp_path, seed=1, num_lines=500, num_train=40, num_val=5, num_test=5)
    assert demo.train.read_bytes() != train
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["params"]["seed"] == 1


def test_corrupt_manifest_triggers_rebuild(tmp_path: Path) -> None:
    demo = data.build_all(tmp_path, num_lines=500, num_train=40, num_val=5, num_test=5)
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    data.build_all(tmp_path, num_lines=500, num_train=40, num_val=5, num_test=5)
    recorded = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert set(recorded["sha256"]) == {p.name for p in _paths(demo)}


# ---------------------------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("cat", "cat", True),
        (" Cat ", "cat", True),
        ("cat .", "cat", True),
        ("cat. the dog", "cat", True),
        ("CAT", " cat\n", True),
        ("cat dog", "cat", True),
        ("dog cat", "cat", False),
        ("cats", "cat", False),
        ("", "cat", False),
        ("   ", "cat", False),
        ("cat", "", False),
        (". cat", "cat", False),
        ("cat?", "Cat", True),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: bool) -> None:
    assert data.exact_match(prediction, reference) is expected


def test_score() -> None:
    assert data.score(["cat", "dog .", "fox"], ["cat", "dog", "pig"]) == pytest.approx(2 / 3)
    assert data.score([], []) == 0.0
    with pytest.raises(ValueError, match="one prediction per reference"):
        data.score(["cat"], ["cat", "dog"])

"""Extractive question answering: SQuAD v1.1 (``train-v1.1.json``, ``dev-v1.1.json``).

Metric: exact match with the official SQuAD v1.1 evaluation (``evaluate-v1.1.py``): both strings are
lower-cased, punctuation and the articles a/an/the are removed and whitespace is collapsed; a prediction scores
if it equals any gold answer. Token F1 (max over gold answers) is reported as ``f1``. The dev file serves as
test; validation is held out of train, whole articles at a time.
"""

from __future__ import annotations

import collections
import json
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path

from nemo_tiedlora.apps.study.tasks.base import (
    Example,
    TaskAdapter,
    atomic_write_bytes,
    first_line,
    read_json,
    require,
)

__all__ = ["SquadTask", "exact_match", "f1", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Official SQuAD normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    """Whether the normalized strings are equal."""
    return normalize_answer(prediction) == normalize_answer(gold)


def f1(prediction: str, gold: str) -> float:
    """Official SQuAD token F1 of the normalized strings (0.0 when they share no token)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


class SquadTask(TaskAdapter):
    """SQuAD v1.1 as SFT: ``Context: ...\\nQuestion: ...\\nAnswer:`` -> the first gold answer."""

    name = "squad"
    dataset = "SQuAD v1.1"
    metric_name = "exact match"
    template = "Context: {context}\nQuestion: {question}\nAnswer:"
    split_files = {"train": "train-v1.1.json", "test": "dev-v1.1.json"}
    record_format = (
        'SQuAD v1.1 JSON {"data": [{"title": str, "paragraphs": [{"context": str, "qas": [{"id": str, '
        '"question": str, "answers": [{"text": str, "answer_start": int}, ...]}]}]}]}'
    )

    def read(self, file: Path) -> list[Example]:
        """Every question of a SQuAD v1.1 JSON file, grouped by article title."""
        document = read_json(file)
        articles = require(document, "data", list, where=str(file), adapter=self)
        examples = []
        for i, article in enumerate(articles):
            where_article = f"{file} data[{i}]"
            title = require(article, "title", str, where=where_article, adapter=self)
            for j, paragraph in enumerate(require(article, "paragraphs", list, where=where_article, adapter=self)):
                where_paragraph = f"{where_article}.paragraphs[{j}]"
                context = require(paragraph, "context", str, where=where_paragraph, adapter=self)
                for k, qa in enumerate(require(paragraph, "qas", list, where=where_paragraph, adapter=self)):
                    where = f"{where_paragraph}.qas[{k}]"
                    examples.append(self._question(qa, context=context, title=title, where=where))
        return examples

    def _question(self, qa: object, *, context: str, title: str, where: str) -> Example:
        qid = require(qa, "id", str, where=where, adapter=self)
        where = f"{where} (id {qid})"
        question = require(qa, "question", str, where=where, adapter=self)
        answers = require(qa, "answers", list, where=where, adapter=self)
        if not answers:
            raise self.error(where, "'answers' is empty (SQuAD v2 unanswerable questions are not supported)")
        texts = []
        for m, answer in enumerate(answers):
            texts.append(require(answer, "text", str, where=f"{where}.answers[{m}]", adapter=self))
            require(answer, "answer_start", int, where=f"{where}.answers[{m}]", adapter=self)
        return Example(
            id=qid,
            fields={"context": context, "question": question},
            target=texts[0],
            references=tuple(texts),
            group=title,
        )

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """``metric``/``exact_match`` and ``f1`` (0-100), each the max over an item's gold answers.

        A prediction is cut to its first non-blank line (the answer when generation runs on).
        """
        self.check_lengths(predictions, examples)
        if not examples:
            return {"metric": 0.0, "exact_match": 0.0, "f1": 0.0, "count": 0.0}
        em_total = f1_total = 0.0
        for prediction, example in zip(predictions, examples):
            answer = first_line(prediction)
            em_total += max(float(exact_match(answer, gold)) for gold in example.references)
            f1_total += max(f1(answer, gold) for gold in example.references)
        em, f1_mean = 100.0 * em_total / len(examples), 100.0 * f1_total / len(examples)
        return {"metric": em, "exact_match": em, "f1": f1_mean, "count": float(len(examples))}

    def write_sample(self, out_dir: Path, *, seed: int = 0) -> Path:
        """``train-v1.1.json`` (4 articles, 12 questions) and ``dev-v1.1.json`` (2 articles, 3 answers each)."""
        rng = random.Random(seed)
        names = _invented_words(rng, 6)
        for split, first, count, answers in (("train", 0, 4, 1), ("test", 4, 2, 3)):
            articles = [_article(rng, name=names[first + i], answers=answers) for i in range(count)]
            text = json.dumps({"version": "1.1", "data": articles}, indent=1)
            atomic_write_bytes(out_dir / self.split_files[split], text.encode("utf-8"))
        return out_dir


_SYLLABLES = ("ka", "lo", "mi", "ren", "to", "va", "sil", "dor", "ne", "bri", "sa", "mun")
_JOBS = ("carpenter", "baker", "weaver", "sailor", "painter", "teacher", "miller", "potter")


def _invented_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct capitalized made-up words of three syllables."""
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
        if word not in words:
            words.append(word)
    return words


def _article(rng: random.Random, *, name: str, answers: int) -> dict[str, object]:
    """One generated SQuAD article about a made-up person, with three answerable questions."""
    birthplace, workplace = (f"Port {word}" for word in _invented_words(rng, 2))
    year, job, years = str(rng.randint(1700, 1900)), rng.choice(_JOBS), str(rng.randint(2, 30))
    context = (
        f"{name} was born in {birthplace} in {year}. After school {name} became a {job} "
        f"and worked in {workplace} for {years} years."
    )
    asked = (
        (f"Where was {name} born?", birthplace, (f"in {birthplace}", birthplace)),
        (f"In what year was {name} born?", year, (f"in {year}", year)),
        (f"What did {name} become after school?", job, (f"a {job}", job)),
    )
    qas = []
    for number, (question, gold, variants) in enumerate(asked):
        texts = [gold, *variants][:answers]
        qas.append(
            {
                "id": f"{name.lower()}-{number}",
                "question": question,
                "answers": [{"text": text, "answer_start": context.index(text)} for text in texts],
            }
        )
    return {"title": name, "paragraphs": [{"context": context, "qas": qas}]}

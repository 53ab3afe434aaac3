"""Math word problems: GSM8K (``train.jsonl``, ``test.jsonl``).

Each record's ``answer`` is a worked solution that ends with ``#### <number>``; the whole solution is the SFT
target. Metric: exact match of the final number. The prediction's number is the last number in it, read only up to
the end of its first ``####`` line when it has one (so text generated after the answer does not count); commas
are dropped and the numbers compare as decimals (``1,200`` = ``1200.0``). Validation is held out of train.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

from nemo_tiedlora.apps.study.tasks.base import Example, TaskAdapter, iter_jsonl, require, write_jsonl

__all__ = ["Gsm8kTask", "final_number", "gold_number"]

_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d[\d,]*(?:\.\d+)?")
_MARK = "####"


def final_number(prediction: str) -> Decimal | None:
    """The last number of ``prediction`` (up to the end of its first ``####`` line), commas removed; or None."""
    mark = prediction.find(_MARK)
    if mark >= 0:
        line_end = prediction.find("\n", mark)
        prediction = prediction if line_end < 0 else prediction[:line_end]
    numbers = _NUMBER.findall(prediction)
    return _decimal(numbers[-1]) if numbers else None


def gold_number(answer: str) -> Decimal | None:
    """The number after the final ``####`` of a GSM8K answer; None if there is no such number."""
    _, mark, tail = answer.rpartition(_MARK)
    match = _NUMBER.search(tail) if mark else None
    return _decimal(match.group(0)) if match else None


def _decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


class Gsm8kTask(TaskAdapter):
    """GSM8K as SFT: ``Question: ...\\nAnswer:`` -> the worked solution ending in ``#### <number>``."""

    name = "gsm8k"
    dataset = "GSM8K"
    metric_name = "accuracy"
    template = "Question: {question}\nAnswer:"
    split_files = {"train": "train.jsonl", "test": "test.jsonl"}
    record_format = 'GSM8K JSONL {"question": str, "answer": str ending in "#### <number>"}'

    def read(self, file: Path) -> list[Example]:
        """Every problem of a GSM8K JSONL file; the reference is its final number."""
        examples = []
        for index, (where, record) in enumerate(iter_jsonl(file)):
            question = require(record, "question", str, where=where, adapter=self)
            answer = require(record, "answer", str, where=where, adapter=self)
            number = gold_number(answer)
            if number is None:
                raise self.error(where, f"'answer' does not end with '#### <number>': {answer[-60:]!r}")
            fields = {"question": question}
            examples.append(Example(id=f"{file.stem}-{index}", fields=fields, target=answer, references=(str(number),)))
        return examples

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """``metric``/``accuracy`` (0-100): final numbers equal; ``answered``: % of predictions with a number."""
        self.check_lengths(predictions, examples)
        hits = answered = 0
        for prediction, example in zip(predictions, examples):
            number = final_number(prediction)
            answered += number is not None
            hits += number is not None and number == Decimal(example.references[0])
        count = max(len(examples), 1)
        accuracy, answered_percent = 100.0 * hits / count, 100.0 * answered / count
        return {"metric": accuracy, "accuracy": accuracy, "answered": answered_percent, "count": float(len(examples))}

    def write_sample(self, out_dir: Path, *, seed: int = 0) -> Path:
        """16 train and 4 test generated problems in GSM8K's format (calculator annotations included)."""
        rng = random.Random(seed)
        for split, count in (("train", 16), ("test", 4)):
            write_jsonl(out_dir / self.split_files[split], [_problem(rng) for _ in range(count)])
        return out_dir


_PEOPLE = ("Mira", "Tobin", "Ansel", "Kaia", "Desmond", "Lio", "Petra", "Rowan")
_THINGS = ("apples", "stickers", "marbles", "pencils", "stamps", "shells")


def _problem(rng: random.Random) -> dict[str, str]:
    """One generated two-step word problem with a worked answer ending in ``#### <number>``."""
    person, thing = rng.choice(_PEOPLE), rng.choice(_THINGS)
    boxes, per_box, given = rng.randint(2, 9), rng.choice((12, 25, 150, 400)), rng.randint(2, 10)
    total = boxes * per_box
    left = total - given
    question = (
        f"{person} buys {boxes} boxes of {thing} with {per_box} {thing} in each box. "
        f"{person} gives {given} {thing} to a friend. How many {thing} does {person} have left?"
    )
    answer = (
        f"{person} buys {boxes} * {per_box} = <<{boxes}*{per_box}={total}>>{total} {thing}.\n"
        f"After giving {given} away, {person} has {total} - {given} = <<{total}-{given}={left}>>{left} {thing}.\n"
        f"#### {left:,}"
    )
    return {"question": question, "answer": answer}

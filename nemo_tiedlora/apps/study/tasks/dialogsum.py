"""Dialogue summarization: DialogSum (``dialogsum.{train,dev,test}.jsonl``).

Train and dev records hold one ``summary``; test records hold three (``summary1`` .. ``summary3``). Metric:
ROUGE-L F-measure (``rouge_score``, Porter stemmer), the max over an item's reference summaries, averaged and
reported on 0-100; ROUGE-1 and ROUGE-2 come as extras.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from pathlib import Path

from rouge_score import rouge_scorer

from nemo_tiedlora.apps.study.tasks.base import Example, TaskAdapter, first_line, iter_jsonl, require, write_jsonl

__all__ = ["DialogSumTask", "rouge"]

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_MAX_REFERENCES = 3


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (0-1) of ``prediction``, each the max over ``references``."""
    scorer = _scorer()
    best = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for reference in references:
        scores = scorer.score(reference, prediction)
        for kind in _ROUGE_TYPES:
            best[kind] = max(best[kind], scores[kind].fmeasure)
    return best


class DialogSumTask(TaskAdapter):
    """DialogSum as SFT: ``Dialogue:\\n...\\nSummary:`` -> the (first) reference summary."""

    name = "dialogsum"
    dataset = "DialogSum"
    metric_name = "ROUGE-L"
    template = "Dialogue:\n{dialogue}\nSummary:"
    split_files = {
        "train": "dialogsum.train.jsonl",
        "validation": "dialogsum.dev.jsonl",
        "test": "dialogsum.test.jsonl",
    }
    record_format = (
        'DialogSum JSONL {"fname": str, "dialogue": str, "summary": str, "topic": str} '
        '(test files: "summary1", "summary2", "summary3")'
    )

    def read(self, file: Path) -> list[Example]:
        """Every dialogue of a DialogSum JSONL file with its reference summaries."""
        examples = []
        for where, record in iter_jsonl(file):
            fname = require(record, "fname", str, where=where, adapter=self)
            where = f"{where} (fname {fname})"
            dialogue = require(record, "dialogue", str, where=where, adapter=self)
            keys = ["summary"] if "summary" in record else [f"summary{n}" for n in range(1, _MAX_REFERENCES + 1)]
            present = [key for key in keys if key in record]
            if not present:
                raise self.error(where, "neither 'summary' nor 'summary1' is present")
            summaries = tuple(require(record, key, str, where=where, adapter=self) for key in present)
            examples.append(
                Example(id=fname, fields={"dialogue": dialogue}, target=summaries[0], references=summaries)
            )
        return examples

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """``metric``/``rougeL`` and ``rouge1``, ``rouge2`` (0-100), max over references, mean over items.

        A prediction is cut to its first non-blank line (a summary is one line).
        """
        self.check_lengths(predictions, examples)
        totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
        for prediction, example in zip(predictions, examples):
            for kind, value in rouge(first_line(prediction), example.references).items():
                totals[kind] += value
        means = {kind: 100.0 * total / max(len(examples), 1) for kind, total in totals.items()}
        return {"metric": means["rougeL"], **means, "count": float(len(examples))}

    def write_sample(self, out_dir: Path, *, seed: int = 0) -> Path:
        """12 train, 4 dev and 4 test dialogues (test with three summaries) of generated small talk."""
        rng = random.Random(seed)
        for split, count in (("train", 12), ("validation", 4), ("test", 4)):
            records = []
            for number in range(count):
                record = _dialogue(rng, fname=f"{split}_{number}")
                if split == "test":
                    summary = record.pop("summary")
                    record.update(summary1=summary, summary2=_reword(summary, 0), summary3=_reword(summary, 1))
                records.append(record)
            write_jsonl(out_dir / self.split_files[split], records)
        return out_dir


_ITEMS = ("a lamp", "two chairs", "a bicycle", "a kettle", "some paint", "a winter coat", "a map", "a red scarf")
_PLACES = ("the market", "the station", "the library", "the harbour", "the bakery", "the garden shop")
_DAYS = ("Monday", "Tuesday", "Friday", "Saturday")


def _dialogue(rng: random.Random, *, fname: str) -> dict[str, str]:
    """One generated two-person dialogue about buying something, with its summary and topic."""
    item, place, day = rng.choice(_ITEMS), rng.choice(_PLACES), rng.choice(_DAYS)
    price = rng.randint(3, 90)
    dialogue = "\n".join(
        (
            f"#Person1#: Hello, I am looking for {item}. Do you know where I can find one?",
            f"#Person2#: You could try {place}. They had {item} last week.",
            "#Person1#: How much do they ask for it?",
            f"#Person2#: About {price} dollars, I think. They are open until {day}.",
            "#Person1#: Thank you, I will go there.",
        )
    )
    summary = f"#Person1# wants to buy {item}. #Person2# suggests {place}, where it costs about {price} dollars."
    return {"fname": fname, "dialogue": dialogue, "summary": summary, "topic": "shopping"}


_SYNONYMS = (
    (("wants to buy", "is looking for"), ("suggests", "recommends")),
    (("wants to buy", "needs"), (", where", ";")),
)


def _reword(summary: str, variant: int) -> str:
    """Another reference summary: the same facts in other words."""
    for old, new in _SYNONYMS[variant]:
        summary = summary.replace(old, new)
    return summary

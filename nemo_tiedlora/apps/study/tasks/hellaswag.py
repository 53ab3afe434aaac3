"""Commonsense multiple choice: HellaSwag (``hellaswag_{train,val}.jsonl``).

The official test file has no labels, so ``hellaswag_val.jsonl`` serves as test and validation is held out of
train (whole source videos/articles at a time). Texts are cleaned as lm-evaluation-harness does (``[title]``
becomes ``". "``, other ``[...]`` markers are dropped, double spaces collapse).

Metric: accuracy of picking the labelled ending by log-likelihood. :meth:`HellaSwagTask.choices` gives, per item,
the context (the SFT prompt) and its candidate endings; :meth:`HellaSwagTask.score_loglik` takes a callable
``scorer(context, ending) -> float`` (the summed log-probability of ``ending`` after ``context``; the model sees
``"{context} {ending}"``, NeMo's SFT template) and picks the ending with the highest score, either as is or
divided by the ending's length in characters (lm-evaluation-harness's ``acc_norm``, the default).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from nemo_tiedlora.apps.study.tasks.base import Example, TaskAdapter, first_line, iter_jsonl, require, write_jsonl
from nemo_tiedlora.apps.study.tasks.squad import normalize_answer

__all__ = ["HellaSwagTask", "Scorer", "clean"]

Scorer = Callable[[str, str], float]
"""``scorer(context, ending)``: the summed log-probability of ``ending`` following ``context``."""

_BRACKETED = re.compile(r"\[.*?\]")


def clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing of a context or an ending."""
    text = text.strip().replace(" [title]", ". ")
    return _BRACKETED.sub("", text).replace("  ", " ").strip()


class HellaSwagTask(TaskAdapter):
    """HellaSwag as SFT: ``Activity: ...\\nContext: ...\\nEnding:`` -> the labelled ending."""

    name = "hellaswag"
    dataset = "HellaSwag"
    metric_name = "accuracy"
    template = "Activity: {activity}\nContext: {context}\nEnding:"
    split_files = {"train": "hellaswag_train.jsonl", "test": "hellaswag_val.jsonl"}
    record_format = (
        'HellaSwag JSONL {"ind": int, "activity_label": str, "ctx_a": str, "ctx_b": str, "ctx": str, '
        '"endings": [str, str, str, str], "label": int, "split": str}'
    )

    def read(self, file: Path) -> list[Example]:
        """Every item of a HellaSwag JSONL file; each needs its ``label``."""
        examples = []
        for where, record in iter_jsonl(file):
            ind = require(record, "ind", int, where=where, adapter=self)
            where = f"{where} (ind {ind})"
            activity = require(record, "activity_label", str, where=where, adapter=self)
            if "ctx_a" in record:
                ctx_b = require(record, "ctx_b", str, where=where, adapter=self)
                context = require(record, "ctx_a", str, where=where, adapter=self) + " " + ctx_b.capitalize()
            else:
                context = require(record, "ctx", str, where=where, adapter=self)
            endings = require(record, "endings", list, where=where, adapter=self)
            if len(endings) < 2 or not all(isinstance(ending, str) for ending in endings):
                raise self.error(where, f"'endings' must be a list of at least two strings, got {endings!r:.80}")
            label = self._label(record, count=len(endings), where=where)
            cleaned = tuple(clean(ending) for ending in endings)
            examples.append(
                Example(
                    id=str(ind),
                    fields={"activity": clean(activity), "context": clean(context)},
                    target=cleaned[label],
                    references=(cleaned[label],),
                    endings=cleaned,
                    label=label,
                    group=str(record.get("source_id", "")),
                )
            )
        return examples

    def _label(self, record: dict[str, object], *, count: int, where: str) -> int:
        label = record.get("label")
        if label is None or label == "":
            raise self.error(
                where, "'label' is missing (HellaSwag's own test file is unlabelled: use hellaswag_val.jsonl as test)"
            )
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < count:
            raise self.error(where, f"'label' is {label!r}, not an index into the {count} endings")
        return label

    def choices(self, example: Example) -> tuple[str, tuple[str, ...]]:
        """``(context, endings)`` of one item: the SFT prompt and the candidate endings, in file order."""
        return self.prompt(example), example.endings

    def score_loglik(
        self, examples: Sequence[Example], scorer: Scorer, *, normalize: bool = True
    ) -> dict[str, float]:
        """Accuracy (0-100) of picking the labelled ending by ``scorer``.

        Both ways of picking are reported: ``accuracy`` (highest summed log-probability) and ``accuracy_norm``
        (highest log-probability per character of the ending); ``metric`` is the second if ``normalize`` else the
        first. Ties go to the first ending. The scorer is called once per (item, ending).
        """
        hits = hits_norm = 0
        for example in examples:
            context, endings = self.choices(example)
            scores = [float(scorer(context, ending)) for ending in endings]
            per_char = [value / max(len(ending), 1) for value, ending in zip(scores, endings)]
            hits += _argmax(scores) == example.label
            hits_norm += _argmax(per_char) == example.label
        count = max(len(examples), 1)
        accuracy, accuracy_norm = 100.0 * hits / count, 100.0 * hits_norm / count
        return {
            "metric": accuracy_norm if normalize else accuracy,
            "accuracy": accuracy,
            "accuracy_norm": accuracy_norm,
            "count": float(len(examples)),
        }

    def score(self, predictions: Sequence[int | str], examples: Sequence[Example]) -> dict[str, float]:
        """Accuracy (0-100) of already chosen endings: an index, or a generated text.

        A text (its first non-blank line) counts as the ending it equals after SQuAD normalization (case,
        punctuation, articles, whitespace); a text equal to no ending is wrong. Log-likelihood scoring
        (:meth:`score_loglik`) is the paper's protocol; this is for generation-only pipelines.
        """
        self.check_lengths(predictions, examples)
        hits = 0
        for prediction, example in zip(predictions, examples):
            if isinstance(prediction, str):
                answer = normalize_answer(first_line(prediction))
                chosen = next((i for i, e in enumerate(example.endings) if normalize_answer(e) == answer), None)
            else:
                chosen = int(prediction)
            hits += chosen == example.label
        accuracy = 100.0 * hits / max(len(examples), 1)
        return {"metric": accuracy, "accuracy": accuracy, "count": float(len(examples))}

    def write_sample(self, out_dir: Path, *, seed: int = 0) -> Path:
        """12 labelled train items and 4 labelled val items of generated everyday scenes."""
        rng = random.Random(seed)
        scenes = list(_SCENES)
        rng.shuffle(scenes)
        for split, first, last in (("train", 0, 12), ("test", 12, 16)):
            records = [
                _item(rng, ind=ind, scene=scenes[ind], split="train" if split == "train" else "val")
                for ind in range(first, last)
            ]
            write_jsonl(out_dir / self.split_files[split], records)
        return out_dir


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# (activity label, ctx_a, ctx_b, correct ending); the wrong endings are the correct endings of other scenes
_SCENES: tuple[tuple[str, str, str, str], ...] = (
    ("Baking cookies", "A man pours flour into a bowl.", "he", "cracks two eggs into the flour and stirs."),
    ("Washing a car", "A woman sprays water over a blue car.", "she", "scrubs the doors with a soapy sponge."),
    ("Playing guitar", "A boy sits on a stool holding a guitar.", "he", "strums a few chords and starts to sing."),
    ("Painting a fence", "A girl dips a brush into white paint.", "she", "paints the boards of the fence one by one."),
    ("Walking the dog", "A man clips a leash to his dog's collar.", "they", "walk down the street to the park."),
    ("Making tea", "A woman fills a kettle with water.", "she", "pours the hot water over a tea bag in a cup."),
    ("Mowing the lawn", "A man pulls the cord of a lawn mower.", "he", "pushes the mower across the grass in rows."),
    ("Skipping rope", "Two girls turn a long rope in a yard.", "a third girl", "jumps in and skips in time."),
    ("Planting a tree", "A man digs a deep hole in the garden.", "he", "sets the young tree in and fills in soil."),
    ("Ironing a shirt", "A woman lays a shirt on an ironing board.", "she", "presses the hot iron along the sleeves."),
    ("Shoveling snow", "A boy steps out onto a snowy driveway.", "he", "pushes the shovel and throws snow aside."),
    ("Juggling", "A clown holds three balls in his hands.", "he", "tosses them up and catches them in turn."),
    ("Home and Garden", "[header] How to water a plant [title] Check the soil.", "", "[step] Pour water slowly."),
    ("Kayaking", "A woman paddles a kayak on a calm lake.", "she", "steers around a rock near the shore."),
    ("Brushing teeth", "A child squeezes paste onto a toothbrush.", "he", "brushes his teeth in small circles."),
    ("Building a snowman", "Kids roll a big ball of snow.", "they", "stack a smaller ball on top for the head."),
)


def _item(rng: random.Random, *, ind: int, scene: tuple[str, str, str, str], split: str) -> dict[str, object]:
    """One generated HellaSwag record: the scene's ending and three endings of other scenes, shuffled."""
    activity, ctx_a, ctx_b, correct = scene
    wrong = rng.sample([other[3] for other in _SCENES if other[3] != correct], 3)
    endings = [correct, *wrong]
    rng.shuffle(endings)
    return {
        "ind": ind,
        "activity_label": activity,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}".strip(),
        "split": split,
        "split_type": "indomain",
        "label": endings.index(correct),
        "endings": endings,
        "source_id": f"generated~{activity.lower().replace(' ', '-')}",
    }

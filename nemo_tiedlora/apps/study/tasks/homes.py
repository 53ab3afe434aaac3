"""The embedded default task (``homes``): the demo's own data, which the embedded tiny base can actually learn.

The paper's task samples are small format stand-ins written in words the embedded tiny base's tokenizer has never
seen, so a sweep on them measures nothing. ``homes`` is the supervised task of :mod:`nemo_tiedlora.apps.demo.data`
(``{"input": "the cat is red and the dog is blue . the home of the dog is which", "output": "kennel"}``; 2000 / 200
/ 200 items, every statement in one item only) in the same vocabulary as the corpus the tiny base was pre-trained
on. Metric: exact match of the first predicted word (:func:`nemo_tiedlora.apps.demo.data.exact_match`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nemo_tiedlora.apps.study.tasks.base import Example, InputOutputTask

__all__ = ["HomesTask"]


class HomesTask(InputOutputTask):
    """The demo task as a study task: ``{input}`` -> the queried animal's home (one word)."""

    name = "homes"
    dataset = "the embedded demo task (nemo_tiedlora.apps.demo.data)"
    metric_name = "exact match"

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """``metric``/``exact_match`` (0-100): the first predicted word is the home."""
        from nemo_tiedlora.apps.demo.data import exact_match

        self.check_lengths(predictions, examples)
        hits = sum(exact_match(str(p), e.references[0]) for p, e in zip(predictions, examples))
        value = 100.0 * hits / max(len(examples), 1)
        return {"metric": value, "exact_match": value}

    def write_sample(self, out_dir: Path, *, seed: int = 0) -> Path:
        """The demo task's three splits (the embedded default's data), deterministic in ``seed``."""
        from nemo_tiedlora.apps.demo.data import build_task

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        build_task(out_dir, seed=seed)
        return out_dir

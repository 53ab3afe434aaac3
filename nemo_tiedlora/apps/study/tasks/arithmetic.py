"""Generated multi-step arithmetic word problems (``arithmetic``), in GSM8K's format and scored as GSM8K.

Each problem chains four operations on small whole numbers (a product, a sum, a difference, an equal share) in one of
several stories; the target is a short worked solution, one step per line, ending in ``#### <number>``::

    Question: Petra has 23 shells. Petra buys 4 bags with 6 shells in each, then gives 9 shells away and shares
    the rest equally among 2 friends. How many shells does each friend get?
    Answer: 4 * 6 = 24
    23 + 24 = 47
    47 - 9 = 38
    38 / 2 = 19
    #### 19

Every intermediate and the answer are whole and positive, so the answer is exact. Unlike the extraction task
(copying fields out of a note), the model has to compute: a task of a different kind, where a small model's
arithmetic limits the score. Files: ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (GSM8K records,
``{"question", "answer"}``); metric: exact match of the final number (:class:`Gsm8kTask`'s reading).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

from nemo_tiedlora.apps.study.tasks.base import TaskError, write_jsonl
from nemo_tiedlora.apps.study.tasks.gsm8k import Gsm8kTask

__all__ = ["ArithmeticTask", "problem"]

_PEOPLE = ("Mira", "Tobin", "Ansel", "Kaia", "Desmond", "Lio", "Petra", "Rowan", "Ines", "Joss", "Nadia", "Oren")
_THINGS = ("apples", "stickers", "marbles", "pencils", "stamps", "shells", "cards", "beads", "coins", "buttons")
_CONTAINERS = ("bags", "boxes", "packs", "jars", "crates")
_STORIES = (
    "{p} has {a} {t}. {p} buys {b} {c} with {k} {t} in each, then gives {d} {t} away and shares the rest equally "
    "among {e} friends. How many {t} does each friend get?",
    "A shop starts the day with {a} {t}. It receives {b} {c} of {k} {t} each, sells {d} {t}, and packs what is "
    "left into {e} equal boxes. How many {t} go in each box?",
    "{p} collects {b} {c} of {k} {t} and already owned {a} {t}. After losing {d} {t}, {p} splits the rest into "
    "{e} equal piles. How many {t} are in each pile?",
)
SIZES = {"train": 1200, "validation": 48, "test": 144}
"""Items per split of the generated data (the study's default)."""


def problem(rng: random.Random) -> dict[str, str]:
    """One generated four-step problem: ``{"question": ..., "answer": worked steps + "#### <number>"}``."""
    b, k, a, e = rng.randint(2, 9), rng.randint(3, 12), rng.randint(10, 60), rng.randint(2, 6)
    total = a + b * k
    # the amount taken away leaves a positive multiple of e
    d = rng.choice([x for x in range(1, total) if (total - x) % e == 0 and total - x >= e])
    share = (total - d) // e
    story = rng.choice(_STORIES)
    question = story.format(p=rng.choice(_PEOPLE), t=rng.choice(_THINGS), c=rng.choice(_CONTAINERS),
                            a=a, b=b, k=k, d=d, e=e)
    answer = (f"{b} * {k} = {b * k}\n{a} + {b * k} = {total}\n{total} - {d} = {total - d}\n"
              f"{total - d} / {e} = {share}\n#### {share}")
    return {"question": question, "answer": answer}


class ArithmeticTask(Gsm8kTask):
    """Four-step word problems -> worked steps ending in ``#### <number>`` (GSM8K's format and metric)."""

    name = "arithmetic"
    dataset = "generated multi-step arithmetic"
    split_files = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
    sample_sizes = SIZES

    def write_sample(self, out_dir: Path, *, seed: int = 0, sizes: Mapping[str, int] | None = None) -> Path:
        """Train, validation and test problems (``sizes``; default :data:`SIZES`), deterministic in ``seed``; the
        three splits share no question."""
        counts = {**SIZES, **(sizes or {})}
        unknown = sorted(set(counts) - set(SIZES))
        if unknown:
            raise TaskError(f"{self.name}: unknown split(s) {unknown} in sample sizes; use {', '.join(SIZES)}")
        rng, seen = random.Random(seed * 1000 + 17), set()
        for split, count in counts.items():
            rows = []
            while len(rows) < count:
                row = problem(rng)
                if row["question"] not in seen:
                    seen.add(row["question"])
                    rows.append(row)
            write_jsonl(Path(out_dir) / self.split_files[split], rows)
        return Path(out_dir)

"""The real-model demo's task: structured extraction over generated passages (NeMo SFT JSONL, exact match).

Each passage tells of two people (the second is a distractor); the answer is one line in a fixed format about the
person the question names::

    input : Read the note and fill in the record for Ana Silva.
            Note: Last spring Tomas Berg, a baker, left Oslo. Ana Silva, who works as a pilot, settled in Lima in 2014.
    output: name=Ana Silva; job=pilot; city=Lima; year=2014

An instruct model of 135M parameters answers in prose or in some other format out of the box (exact match near 0);
the format and the span copying are learnt in a few minutes of adapter training. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

FIRST = ["Ana", "Tomas", "Maria", "Kenji", "Leila", "Omar", "Ingrid", "Pavel", "Sofia", "Diego", "Mei", "Arjun",
         "Chloe", "Lukas", "Amara", "Felix", "Nadia", "Ravi", "Elena", "Hugo", "Yara", "Marco", "Priya", "Jonas"]
LAST = ["Silva", "Berg", "Novak", "Tanaka", "Haddad", "Farah", "Olsen", "Petrov", "Rossi", "Garcia", "Chen",
        "Mehta", "Dubois", "Weber", "Okafor", "Klein", "Hassan", "Iyer", "Costa", "Moreau", "Santos", "Bianchi"]
JOBS = ["pilot", "baker", "nurse", "teacher", "chemist", "painter", "lawyer", "farmer", "plumber", "dentist",
        "librarian", "carpenter", "journalist", "architect", "chef", "geologist"]
CITIES = ["Lima", "Oslo", "Cairo", "Dublin", "Hanoi", "Quito", "Porto", "Nairobi", "Kyoto", "Zagreb", "Perth",
          "Austin", "Lyon", "Tunis", "Riga", "Bogota", "Dakar", "Seville"]
TEMPLATES = [
    "{a_name}, who works as a {a_job}, settled in {a_city} in {a_year}.",
    "In {a_year} the {a_job} {a_name} moved to {a_city}.",
    "{a_name} has lived in {a_city} since {a_year} and earns a living as a {a_job}.",
    "Since {a_year}, {a_city} has been home to {a_name}, a {a_job} by trade.",
]
DISTRACTORS = [
    "Last spring {b_name}, a {b_job}, left {b_city}.",
    "{b_name}, a {b_job} from {b_city}, visited in {b_year}.",
    "Their neighbour {b_name} is a {b_job} in {b_city}.",
]
INSTRUCTION = "Read the note and fill in the record for {name}.\nNote: {note}"


@dataclass(frozen=True)
class ExtractionData:
    train: Path
    validation: Path
    test: Path


def example(rng: random.Random) -> dict[str, str]:
    """One {'input', 'output'} pair."""
    first, last = rng.sample(FIRST, 2), rng.sample(LAST, 2)
    a_name, b_name = f"{first[0]} {last[0]}", f"{first[1]} {last[1]}"
    a_job, b_job = rng.sample(JOBS, 2)
    a_city, b_city = rng.sample(CITIES, 2)
    a_year, b_year = rng.randint(1990, 2023), rng.randint(1990, 2023)
    fields = dict(a_name=a_name, a_job=a_job, a_city=a_city, a_year=a_year, b_name=b_name, b_job=b_job,
                  b_city=b_city, b_year=b_year)
    sentences = [rng.choice(TEMPLATES).format(**fields), rng.choice(DISTRACTORS).format(**fields)]
    rng.shuffle(sentences)
    return {"input": INSTRUCTION.format(name=a_name, note=" ".join(sentences)),
            "output": f"name={a_name}; job={a_job}; city={a_city}; year={a_year}"}


def build(folder: Path, *, train: int = 1200, validation: int = 32, test: int = 48, seed: int = 7) -> ExtractionData:
    """Write train/validation/test JSONL (disjoint by construction of the random streams) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for offset, (split, count) in enumerate((("train", train), ("validation", validation), ("test", test))):
        rng = random.Random(seed * 1000 + offset)
        rows = [example(rng) for _ in range(count)]
        path = folder / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(path)
        paths[split] = path
    return ExtractionData(**paths)



def record_match(predictions: list[str], labels: list[str]) -> float:
    """Share of predictions equal to their whole record (surrounding whitespace ignored): exact match."""
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions for {len(labels)} labels: pass one per label, in order")
    return sum(p.strip() == t.strip() for p, t in zip(predictions, labels)) / len(labels) if labels else 0.0

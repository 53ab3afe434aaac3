"""Generated data for the Tied-LoRA demo: corpus, tokenizer and a new-format question task.

Nothing is downloaded. A tiny English-like language over a fixed vocabulary (:data:`VOCABULARY`) is
generated from a seed:

* the **pretraining corpus** (one document per line) states every animal's home (:data:`HOMES`,
  ``"the fox lives in the river ."``: ``lives`` is said of homes only, while animals are *in* any place in the
  other documents, so the facts never contradict each other) and adds scenes, repeated lists (plain copying), ``where``
  questions and *binding stories* (``"the blue cat , the red dog . the blue cat runs ."``), so a small
  GPT trained on it knows the homes and can find words earlier in its context;
* the **SFT task** asks for one animal's home after a distractor, in a format the corpus never uses::

      {"input": "the dog is red and the fox is pink . the home of the fox is which",
       "output": "river"}

  NeMo's template ``"{input} {output}"`` turns that into ``"... is which river"``. The answer is one
  vocabulary word, so exact match (:func:`exact_match`) is the metric. The base model never saw
  ``"the home of the"`` and scores near zero; the fact is already in the model, so an adapter on the
  attention QKV projections mainly has to route the queried animal to the answer position.

:func:`build_all` writes every file once into a folder and reuses them while a ``manifest.json`` records
the same parameters and the files' sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator

import sentencepiece as spm
from nemo_tiedlora.core.fileio import atomic_write_bytes as _atomic_write_bytes

__all__ = [
    "ANIMALS",
    "COLORS",
    "HOMES",
    "DATA_VERSION",
    "DemoData",
    "NUMBERS",
    "PLACES",
    "VERBS",
    "VOCABULARY",
    "build_all",
    "build_corpus",
    "build_task",
    "build_tokenizer",
    "exact_match",
    "score",
]

logger = logging.getLogger(__name__)

#: Bumped whenever a generator changes, so that cached folders from older code are rebuilt.
DATA_VERSION = 3

ANIMALS: tuple[str, ...] = (
    "dog", "cat", "bird", "fish", "horse", "cow", "pig", "sheep", "duck", "frog", "fox", "bear",
)
COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLACES: tuple[str, ...] = ("park", "house", "farm", "river", "forest", "garden", "school", "city")
VERBS: tuple[str, ...] = ("runs", "sleeps", "eats", "jumps", "sits", "walks", "swims", "plays")
SIZES: tuple[str, ...] = ("big", "small")
FUNCTION_WORDS: tuple[str, ...] = (
    "the", "a", "is", "and", "in", "to", "with", "what", "which", "where", "animal",
    "list", "comes", "after", "home", "of", "lives", ".", ",", "?",
)
#: Every word the corpus and the task use (punctuation marks are words of their own).
VOCABULARY: tuple[str, ...] = ANIMALS + COLORS + NUMBERS + PLACES + VERBS + SIZES + FUNCTION_WORDS

#: The most (animal, color) pairs a binding story states.
TASK_MAX_PAIRS = 5

# sentencepiece ids as NeMo's sentencepiece tokenizer expects them.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

CORPUS_NAME = "corpus.txt"
TOKENIZER_NAME = "tokenizer.model"
SPLIT_NAMES: dict[str, str] = {
    "train": "train.jsonl",
    "validation": "validation.jsonl",
    "test": "test.jsonl",
}
MANIFEST_NAME = "manifest.json"

_PUNCTUATION = ".,?!;:\"'"


@dataclasses.dataclass(frozen=True)
class DemoData:
    """Paths of the generated demo files (see :func:`build_all`)."""

    corpus: Path
    tokenizer_model: Path
    train: Path
    validation: Path
    test: Path


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    """Write one line per item (``\\n``-terminated, UTF-8) atomically."""
    _atomic_write_bytes(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))


def _sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The language
# --------------------------------------------------------------------------------------------------


def _binding_statement(animals: list[str], colors: list[str]) -> str:
    """``"the blue cat , the red dog and the pink fox ."`` for paired lists (len >= 2)."""
    clauses = [f"the {color} {animal}" for animal, color in zip(animals, colors)]
    return " , ".join(clauses[:-1]) + f" and {clauses[-1]} ."


def _scene_sentence(rng: random.Random) -> str:
    """One sentence about animals doing things in places."""
    animal, other = rng.sample(ANIMALS, 2)
    color, verb, place, size = (
        rng.choice(COLORS), rng.choice(VERBS), rng.choice(PLACES), rng.choice(SIZES),
    )
    templates = (
        f"the {color} {animal} {verb} in the {place} .",
        f"the {animal} {verb} to the {place} with the {other} .",
        f"a {size} {animal} {verb} in the {place} .",
        f"the {animal} which is {color} {verb} with a {size} {other} .",
        f"the {size} {color} {animal} {verb} .",
        f"what a {size} {animal} .",
        f"the {animal} is a {size} animal .",
    )
    return rng.choice(templates)


def _scene(rng: random.Random) -> str:
    """A document of two to four scene sentences."""
    return " ".join(_scene_sentence(rng) for _ in range(rng.randint(2, 4)))


def _binding_story(rng: random.Random) -> str:
    """Colored animals introduced once, then mentioned again by their color.

    ``"the blue cat , the red dog . the blue ___"`` -> ``cat``: the follow-ups are predictable only by
    finding the color earlier in the line and copying the word after it (an induction-head lookup).
    """
    count = rng.randint(2, TASK_MAX_PAIRS)
    animals, colors = rng.sample(ANIMALS, count), rng.sample(COLORS, count)
    sentences = [_binding_statement(animals, colors)]
    for _ in range(rng.randint(2, 5)):
        index = rng.randrange(count)
        animal, color = animals[index], colors[index]
        verb, place, size = rng.choice(VERBS), rng.choice(PLACES), rng.choice(SIZES)
        sentences.append(rng.choice((
            f"the {color} {animal} {verb} in the {place} .",
            f"the {color} {animal} is {size} .",
            f"the {color} {animal} {verb} .",
        )))
    return " ".join(sentences)


def _word_list(rng: random.Random) -> str:
    """Lists of vocabulary words, mostly said twice (plain copying), and counting."""
    items = rng.sample(ANIMALS + COLORS + PLACES, rng.randint(4, 8))
    start = rng.randrange(len(NUMBERS) - 3)
    run = NUMBERS[start:start + rng.randint(3, len(NUMBERS) - start)]
    after = rng.randrange(1, len(NUMBERS))
    return rng.choices(
        (
            " ".join(items) + " . " + " ".join(items) + " .",
            "the list is " + " , ".join(items[:-1]) + f" and {items[-1]} . " + " ".join(items) + " .",
            " ".join(run) + " .",
            f"{NUMBERS[after]} comes after {NUMBERS[after - 1]} .",
        ),
        weights=(0.7, 0.2, 0.05, 0.05),
    )[0]


def _where(rng: random.Random) -> str:
    """A ``where`` question answered by a full sentence, with a random place (not the home)."""
    animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
    return f"where is the {animal} ? the {animal} is in the {place} ."


def _homes() -> dict[str, str]:
    """Every animal's home: a fixed, balanced map (each place is home to at most two animals)."""
    animals = list(ANIMALS)
    random.Random("homes").shuffle(animals)
    return {animal: PLACES[index % len(PLACES)] for index, animal in enumerate(animals)}


#: The facts the base model learns in pre-training and the task asks about in a new format.
HOMES: dict[str, str] = _homes()


def _facts(rng: random.Random) -> str:
    """One to three statements of where animals live (the base model memorizes them): ``lives in`` is used for
    homes only, so every statement of that form is the same fact."""
    sentences = []
    for _ in range(rng.randint(1, 3)):
        animal = rng.choice(ANIMALS)
        home = HOMES[animal]
        sentences.append(rng.choice((
            f"the {animal} lives in the {home} .",
            f"the {rng.choice(COLORS)} {animal} lives in the {home} .",
            f"where is the {animal} ? the {animal} lives in the {home} .",
        )))
    return " ".join(sentences)


_DOCUMENT_KINDS: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (_facts, 0.35),
    (_scene, 0.13),
    (_binding_story, 0.36),
    (_word_list, 0.1),
    (_where, 0.06),
)


def _document(rng: random.Random) -> str:
    """One corpus document (a line) of a randomly chosen kind."""
    kinds, weights = zip(*_DOCUMENT_KINDS)
    return rng.choices(kinds, weights=weights)[0](rng)


def build_corpus(path: Path, *, num_lines: int = 20000, seed: int = 0) -> Path:
    """Write the pretraining corpus, one document per line, and return ``path``.

    The same ``seed`` and ``num_lines`` give identical bytes.
    """
    if num_lines < 1:
        raise ValueError(f"num_lines must be positive, got {num_lines}")
    rng = random.Random(f"corpus-{seed}")
    path = Path(path)
    _write_lines(path, (_document(rng) for _ in range(num_lines)))
    logger.info("wrote %d corpus lines to %s", num_lines, path)
    return path


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _tokenizer_sentences(corpus: Path) -> Iterator[str]:
    """Corpus lines, then every vocabulary word a few times so each becomes one piece."""
    with Path(corpus).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip("\n")
    for _ in range(10):
        yield " ".join(VOCABULARY)


def build_tokenizer(corpus: Path, out_dir: Path, *, vocab_size: int = 256) -> Path:
    """Train a BPE sentencepiece model on ``corpus`` and return the path of ``out_dir/tokenizer.model``.

    Ids follow NeMo's sentencepiece usage: unk=0, bos=1, eos=2, pad=3. Training is single-threaded and
    reads the corpus in order, so the model's bytes depend only on the corpus and ``vocab_size``.
    ``vocab_size`` is a soft limit: a language this small has fewer possible BPE pieces, and the model
    then holds all of them (every vocabulary word is one ``▁word`` piece either way).
    """
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_tokenizer_sentences(corpus),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = Path(out_dir) / TOKENIZER_NAME
    _atomic_write_bytes(path, writer.getvalue())
    logger.info("wrote sentencepiece model to %s", path)
    return path


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------


def _task_item(rng: random.Random) -> tuple[str, str, str]:
    """``(statement, question, answer)``: two animals with colors, then the home of one of them.

    The base model knows every animal's home from pre-training, but never saw this question format: it has to
    pick the queried animal out of the statement and answer with its home as the first word.
    """
    animal, other = rng.sample(ANIMALS, 2)
    color, other_color = rng.sample(COLORS, 2)
    statement = f"the {other} is {other_color} and the {animal} is {color} ."
    return statement, f"the home of the {animal} is which", HOMES[animal]


def build_task(
    out_dir: Path,
    *,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` in NeMo's SFT format.

    Each line is ``{"input": "<statement> <question> ?", "output": "<word>"}``. Every statement occurs
    in one item only, so no split shares a statement (hence an item) with another. Test items are drawn
    first, so they do not depend on ``num_train``/``num_val``. Returns ``{"train": path, ...}``.
    """
    sizes = {"test": num_test, "validation": num_val, "train": num_train}
    if any(size < 1 for size in sizes.values()):
        raise ValueError(f"every split needs at least one item, got {sizes}")
    rng = random.Random(f"task-{seed}")
    seen: set[str] = set()
    paths: dict[str, Path] = {}
    for split, size in sizes.items():
        records: list[str] = []
        while len(records) < size:
            statement, question, answer = _task_item(rng)
            if statement in seen:
                continue
            seen.add(statement)
            records.append(json.dumps({"input": f"{statement} {question}", "output": answer}))
        paths[split] = Path(out_dir) / SPLIT_NAMES[split]
        _write_lines(paths[split], records)
        logger.info("wrote %d %s items to %s", size, split, paths[split])
    return {split: paths[split] for split in SPLIT_NAMES}


# --------------------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------------------


def _normalize(text: str) -> list[str]:
    """Lower-case whitespace-separated words, each stripped of surrounding punctuation."""
    return [word.strip(_PUNCTUATION) for word in text.lower().split()]


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the first word of ``prediction`` equals ``reference``, ignoring case and whitespace.

    Punctuation attached to either end of a word is ignored, so ``"Blue ."``, ``" blue"`` and
    ``"blue. the dog"`` all match ``"blue"``; ``". blue"`` does not (its first word is ``"."``). An empty
    prediction or reference never matches.
    """
    predicted, expected = _normalize(prediction), " ".join(_normalize(reference))
    return bool(predicted) and bool(expected) and predicted[0] == expected


def score(predictions: list[str], references: list[str]) -> float:
    """Fraction of :func:`exact_match` hits; ``0.0`` for empty lists.

    Raises:
        ValueError: if the lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(references)} references; "
            "pass one prediction per reference, in the same order"
        )
    if not references:
        return 0.0
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)


# --------------------------------------------------------------------------------------------------
# Everything, cached
# --------------------------------------------------------------------------------------------------


def _file_names() -> dict[str, str]:
    """Field of :class:`DemoData` -> file name inside the output folder."""
    return {"corpus": CORPUS_NAME, "tokenizer_model": TOKENIZER_NAME, **SPLIT_NAMES}


def _cached(out_dir: Path, params: dict[str, int]) -> bool:
    """Whether ``out_dir`` holds a manifest with ``params`` whose files all exist with their sha256."""
    manifest = out_dir / MANIFEST_NAME
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("params") != params:
        return False
    hashes = recorded.get("sha256")
    if not isinstance(hashes, dict):
        return False
    for name in _file_names().values():
        path = out_dir / name
        if not path.is_file() or hashes.get(name) != _sha256(path):
            logger.info("cache in %s is stale: %s is missing or changed", out_dir, name)
            return False
    return True


def build_all(
    out_dir: Path,
    *,
    seed: int = 0,
    num_lines: int = 20000,
    vocab_size: int = 256,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
) -> DemoData:
    """Build (or reuse) the corpus, tokenizer and task splits in ``out_dir``.

    The files are reused untouched when ``out_dir/manifest.json`` records the same parameters (and
    :data:`DATA_VERSION`) and every file's sha256 still matches; otherwise everything is rebuilt. Each
    file, the manifest last, is written atomically.
    """
    out_dir = Path(out_dir)
    names = _file_names()
    paths = DemoData(**{field: out_dir / name for field, name in names.items()})
    params = {
        "data_version": DATA_VERSION,
        "seed": seed,
        "num_lines": num_lines,
        "vocab_size": vocab_size,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
    }
    if _cached(out_dir, params):
        logger.info("reusing demo data in %s", out_dir)
        return paths
    logger.info("building demo data in %s", out_dir)
    build_corpus(paths.corpus, num_lines=num_lines, seed=seed)
    build_tokenizer(paths.corpus, out_dir, vocab_size=vocab_size)
    build_task(out_dir, num_train=num_train, num_val=num_val, num_test=num_test, seed=seed)
    manifest = {"params": params, "sha256": {name: _sha256(out_dir / name) for name in names.values()}}
    _atomic_write_bytes(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return paths

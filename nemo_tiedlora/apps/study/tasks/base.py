"""What every task adapter shares: :class:`Example`, :class:`TaskAdapter`, :class:`TaskError`, file helpers.

A task adapter reads one public dataset in its own file format from a local folder, turns its items into
:class:`Example` objects, renders them as NeMo SFT JSONL records (``{"input": prompt, "output": target}``; NeMo's
default template ``"{input} {output}"`` joins them) and scores predictions with the task's metric. Every metric
is reported on a 0-100 scale under the key ``"metric"``.
"""

from __future__ import annotations

import abc
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from nemo_tiedlora.core.fileio import atomic_write_bytes

__all__ = [
    "SPLITS",
    "Example",
    "InputOutputTask",
    "TaskAdapter",
    "TaskError",
    "atomic_write_bytes",
    "first_line",
    "hold_out",
    "iter_jsonl",
    "read_json",
    "require",
    "write_jsonl",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The splits :func:`~nemo_tiedlora.apps.study.tasks.prepare` writes."""


class TaskError(ValueError):
    """A dataset file is missing or one of its records is malformed.

    The message names the file, the record (line, index or id) and what the adapter expected there.
    """


@dataclass(frozen=True)
class Example:
    """One item of a task, as read from the dataset's own file.

    Attributes:
        id: the dataset's own id of the item (SQuAD question id, DialogSum ``fname``, HellaSwag ``ind``, ...).
        fields: the raw texts the task's prompt template is filled with.
        target: the SFT output (the first gold answer, the correct ending, the reference translation, ...).
        references: every gold string the metric compares a prediction with (``target`` first).
        endings: the candidate endings of a multiple-choice item; empty otherwise.
        label: index of the correct ending in ``endings``; ``None`` for other tasks.
        group: items of one group (one SQuAD article, one TED talk) are kept in one split when a validation split
            is held out of train; empty: the item is its own group.
    """

    id: str
    fields: Mapping[str, str]
    target: str
    references: tuple[str, ...]
    endings: tuple[str, ...] = ()
    label: int | None = None
    group: str = field(default="")


class TaskAdapter(abc.ABC):
    """One task type: reading its dataset, its prompt, its metric and a generated sample.

    Subclasses set the class attributes and implement :meth:`read`, :meth:`score` and :meth:`write_sample`.
    """

    name: ClassVar[str]
    """Registry name (``squad``, ``dialogsum``, ...)."""
    dataset: ClassVar[str]
    """Human name of the dataset and its version, for messages."""
    metric_name: ClassVar[str]
    """Name of the main metric, as it appears in tables and plot axes."""
    higher_is_better: ClassVar[bool] = True
    template: ClassVar[str]
    """``str.format`` template over :attr:`Example.fields`; it ends with a separator such as ``"Answer:"``."""
    split_files: ClassVar[Mapping[str, str]]
    """Our split name -> the dataset's own file name; a split missing here is held out of train by ``prepare``."""
    record_format: ClassVar[str]
    """One-line description of a well-formed record, quoted by :class:`TaskError` messages."""
    sample_sizes: ClassVar[Mapping[str, int] | None] = None
    """Items per split of :meth:`write_sample` when a study config may set them (``sizes=``); None: fixed sizes."""

    # --- reading -------------------------------------------------------------------------------------

    def load(self, path: Path, split: str) -> list[Example]:
        """Read ``split`` from ``path``: the dataset's folder, or directly one of its files.

        Raises:
            TaskError: the file is missing or a record is malformed (the message names both).
        """
        return self.read(self.source_file(Path(path), split))

    @abc.abstractmethod
    def read(self, file: Path) -> list[Example]:
        """Every item of one file of the dataset, in file order."""

    def source_file(self, path: Path, split: str) -> Path:
        """The file holding ``split``: ``path`` itself if it is a file, else the split's file inside it."""
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r} for {self.name}: use one of {', '.join(SPLITS)}")
        if path.is_file():
            return path
        expected = ", ".join(f"{name} ({s})" for s, name in self.split_files.items())
        if not path.is_dir():
            raise TaskError(f"{path}: no such file or folder; expected the {self.dataset} folder holding {expected}")
        if split not in self.split_files:
            raise TaskError(
                f"{self.dataset} has no {split} file (it ships {expected}); prepare() holds a {split} split out "
                "of train, or pass the file itself"
            )
        file = path / self.split_files[split]
        if not file.is_file():
            raise TaskError(f"{file}: no such file; expected the {self.dataset} {split} file {file.name} in {path}")
        return file

    # --- SFT records ---------------------------------------------------------------------------------

    def prompt(self, example: Example) -> str:
        """The model input for ``example``: :attr:`template` filled with its fields."""
        return self.template.format(**example.fields)

    def to_sft(self, examples: Iterable[Example]) -> list[dict[str, Any]]:
        """NeMo SFT JSONL records: ``input``, ``output`` and what the metric needs.

        NeMo's SFT dataset keeps keys outside the prompt template as metadata and writes them into its prediction
        files, so ``id`` and ``references`` (and ``endings``/``label`` for multiple choice) come back with the
        predictions.
        """
        records = []
        for example in examples:
            record: dict[str, Any] = {
                "input": self.prompt(example),
                "output": example.target,
                "id": example.id,
                "references": list(example.references),
            }
            if example.endings:
                record["endings"] = list(example.endings)
                record["label"] = example.label
            records.append(record)
        return records

    # --- metric and sample ---------------------------------------------------------------------------

    @abc.abstractmethod
    def score(self, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
        """The main metric (0-100) under ``"metric"``, plus extras; one prediction per example, same order."""

    @abc.abstractmethod
    def write_sample(self, out_dir: Path, *, seed: int = 0) -> Path:
        """Write a small generated dataset in the dataset's own format into ``out_dir``; return ``out_dir``.

        The texts are generated from ``seed`` (no real dataset text), the layout and file names are the
        dataset's, so :meth:`load` reads the folder like the real one.
        """

    # --- helpers for subclasses ----------------------------------------------------------------------

    def error(self, where: str, problem: str) -> TaskError:
        """A :class:`TaskError` for a malformed record: ``where`` names file and record."""
        return TaskError(f"{where}: {problem}; expected {self.record_format}")

    def check_lengths(self, predictions: Sequence[Any], examples: Sequence[Example]) -> None:
        """Raise if there is not exactly one prediction per example."""
        if len(predictions) != len(examples):
            raise TaskError(
                f"{self.name}: got {len(predictions)} predictions for {len(examples)} examples; pass one "
                "prediction per example, in the same order"
            )


# --------------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------------

_KINDS: dict[type, str] = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def require(record: Mapping[str, Any], key: str, kind: type, *, where: str, adapter: TaskAdapter) -> Any:
    """``record[key]`` if present and of type ``kind`` (``bool`` is not an ``int``), else a :class:`TaskError`."""
    if not isinstance(record, Mapping):
        raise adapter.error(where, f"the record is {type(record).__name__}, not an object")
    if key not in record:
        raise adapter.error(where, f"field {key!r} is missing")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise adapter.error(where, f"field {key!r} is {type(value).__name__} {value!r:.60}, not {_KINDS[kind]}")
    return value


def read_json(file: Path) -> Any:
    """The parsed JSON document in ``file``; a :class:`TaskError` naming line and column if it is not JSON."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TaskError(f"{file}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise TaskError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def iter_jsonl(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every non-blank line of a JSONL file; ``where`` is ``"<file> line <n>"``."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise TaskError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{where}: a JSON {type(record).__name__}, expected one JSON object per line")
        yield where, record


def first_line(prediction: str) -> str:
    """The first non-blank line of a generated text, stripped: the model's answer if it runs on past it."""
    for line in prediction.splitlines():
        if line.strip():
            return line.strip()
    return ""


# --------------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept) atomically; return ``path``."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def hold_out(examples: Sequence[Example], *, size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into (kept, held out) with about ``size`` held-out items, whole groups at a time.

    Groups (:attr:`Example.group`, else the id) are drawn in a seeded random order until ``size`` items are held
    out; at least one group stays. Both lists keep the input order.

    Raises:
        TaskError: fewer than two groups, so nothing could be held out without emptying train.
    """
    groups = list(dict.fromkeys(example.group or example.id for example in examples))
    if len(groups) < 2:
        raise TaskError(
            f"cannot hold out a validation split from {len(examples)} training item(s) in {len(groups)} group(s); "
            "give the training file at least two items (two articles/talks for SQuAD/IWSLT)"
        )
    random.Random(seed).shuffle(groups)
    sizes: dict[str, int] = {}
    for example in examples:
        key = example.group or example.id
        sizes[key] = sizes.get(key, 0) + 1
    chosen: set[str] = set()
    held = 0
    for group in groups[:-1]:
        if held >= size:
            break
        chosen.add(group)
        held += sizes[group]
    kept = [example for example in examples if (example.group or example.id) not in chosen]
    out = [example for example in examples if (example.group or example.id) in chosen]
    return kept, out


class InputOutputTask(TaskAdapter):
    """A task whose files are NeMo SFT JSONL already (``{"input": ..., "output": ...}`` per line, three splits):
    the package's own generated tasks. Subclasses set the names and implement :meth:`score` and
    :meth:`write_sample`."""

    template = "{input}"
    split_files = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
    record_format = '{"input": str, "output": str}'

    def read(self, file: Path) -> list[Example]:
        examples = []
        for index, (where, record) in enumerate(iter_jsonl(file)):
            text = require(record, "input", str, where=where, adapter=self)
            answer = require(record, "output", str, where=where, adapter=self)
            examples.append(Example(id=f"{file.stem}-{index}", fields={"input": text}, target=answer,
                                    references=(answer,)))
        return examples

"""The paper's five task types as adapters over the public datasets' own file formats.

==============  ======================  ============  ===========================================================
name            dataset                 metric        files read (in the dataset's folder)
==============  ======================  ============  ===========================================================
``squad``       SQuAD v1.1              exact match   ``train-v1.1.json``, ``dev-v1.1.json`` (test)
``dialogsum``   DialogSum               ROUGE-L       ``dialogsum.{train,dev,test}.jsonl``
``hellaswag``   HellaSwag               accuracy      ``hellaswag_train.jsonl``, ``hellaswag_val.jsonl`` (test)
``iwslt2017``   IWSLT 2017 de-en        BLEU          ``train.tags.de-en.{de,en}``, ``IWSLT17.TED.{dev,tst}2010...xml``
``gsm8k``       GSM8K                   accuracy      ``train.jsonl``, ``test.jsonl``
``homes``       the embedded demo task  exact match   ``{train,validation,test}.jsonl`` (the embedded default)
``extraction``  real-model demo task    exact match   ``{train,validation,test}.jsonl`` (``demo --base smollm2``'s task)
``arithmetic``  generated 4-step sums   accuracy      ``{train,validation,test}.jsonl`` (GSM8K records, generated)
==============  ======================  ============  ===========================================================

Usage::

    from nemo_tiedlora.apps.study.tasks import TASKS, prepare

    paths = prepare("squad", Path("data/squad"), Path("sft/squad"))   # {"train": ..., "validation": ..., "test": ...}
    task = TASKS["squad"]
    examples = task.load(Path("data/squad"), "test")
    task.score(predictions, examples)                                  # {"metric": ..., "exact_match": ..., "f1": ...}

Nothing is downloaded: point ``prepare`` at a folder holding the dataset's files, or at
``TASKS[name].write_sample(folder)`` for a small generated stand-in.
"""

from __future__ import annotations

from pathlib import Path

from nemo_tiedlora.apps.study.tasks.base import SPLITS, Example, TaskAdapter, TaskError, hold_out, write_jsonl
from nemo_tiedlora.apps.study.tasks.arithmetic import ArithmeticTask
from nemo_tiedlora.apps.study.tasks.dialogsum import DialogSumTask
from nemo_tiedlora.apps.study.tasks.extraction import ExtractionTask
from nemo_tiedlora.apps.study.tasks.gsm8k import Gsm8kTask
from nemo_tiedlora.apps.study.tasks.hellaswag import HellaSwagTask, Scorer
from nemo_tiedlora.apps.study.tasks.homes import HomesTask
from nemo_tiedlora.apps.study.tasks.iwslt import IwsltTask
from nemo_tiedlora.apps.study.tasks.squad import SquadTask

__all__ = ["SPLITS", "TASKS", "Example", "Scorer", "TaskAdapter", "TaskError", "get_task", "prepare"]

TASKS: dict[str, TaskAdapter] = {
    task.name: task
    for task in (SquadTask(), DialogSumTask(), HellaSwagTask(), IwsltTask(), Gsm8kTask(), HomesTask(), ExtractionTask(),
                 ArithmeticTask())
}
"""Task name -> adapter: the paper's five in its order, then the embedded default (homes) and the real-model
demo's task (extraction), and generated multi-step arithmetic in GSM8K's format (arithmetic)."""

_MAX_VALIDATION = 500
_VALIDATION_FRACTION = 0.05


def get_task(task: str | TaskAdapter) -> TaskAdapter:
    """The adapter for a registry name (or the adapter itself); a :class:`TaskError` listing the names if unknown."""
    if isinstance(task, TaskAdapter):
        return task
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return TASKS[task]


def prepare(
    task: str | TaskAdapter,
    source: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    validation_size: int | None = None,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (NeMo SFT records) into ``out_dir``.

    Args:
        task: registry name or adapter.
        source: the folder holding the dataset's own files.
        out_dir: where the SFT files go; each is written to a temporary file first and moved into place.
        seed: order in which groups are drawn when validation is held out of train.
        validation_size: items to hold out when the dataset has no validation file (default: 5% of train, at
            least 1, at most 500); whole groups (SQuAD articles, TED talks, HellaSwag sources) move together.

    Returns:
        split -> path of its SFT JSONL file.

    Raises:
        TaskError: a file is missing or malformed, or train is too small to hold out a validation split.
    """
    adapter = get_task(task)
    source = Path(source)
    if not source.is_dir():
        raise TaskError(
            f"{source}: not a folder; prepare() reads every split, so pass the {adapter.dataset} folder holding "
            + ", ".join(adapter.split_files.values())
        )
    examples = {split: adapter.load(source, split) for split in SPLITS if split in adapter.split_files}
    if "validation" not in examples:
        train = examples["train"]
        size = validation_size
        if size is None:
            size = min(_MAX_VALIDATION, max(1, round(_VALIDATION_FRACTION * len(train))))
        examples["train"], examples["validation"] = hold_out(train, size=size, seed=seed)
    out_dir = Path(out_dir)
    return {split: write_jsonl(out_dir / f"{split}.jsonl", adapter.to_sft(examples[split])) for split in SPLITS}

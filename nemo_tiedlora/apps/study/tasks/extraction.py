"""The real-model task (``extraction``): the structured-extraction data of ``demo --base smollm2`` as a study task.

Each item asks for a one-line record about the person a question names in a two-person note
(:mod:`nemo_tiedlora.apps.demo.extraction_data`): ``name=Ana Silva; job=pilot; city=Lima; year=2014``. The prompt is the
SFT ``input`` as written; a chat model's own format is applied by the study config's ``prompt_template`` (NeMo's
SFT ``prompt_template``), as the demo does. Metric: exact match of the whole record (surrounding whitespace
ignored); ``field_accuracy`` gives the share of the four ``key=value`` fields that are right (partial credit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from nemo_tiedlora.apps.study.tasks.base import Example, InputOutputTask, TaskError

__all__ = ["ExtractionTask", "record_fields"]

_FIELDS = ("name", "job", "city", "year")


def record_fields(text: str) -> dict[str, str]:
    """``{"name": ..., "job": ..., ...}`` from a record line; keys that are not there are absent."""
    fields = {}
    for part in str(text).strip().splitlines()[0].split(";") if str(text).strip() else []:
        key, sep, value = part.partition("=")
        if sep and key.strip() in _FIELDS and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


class ExtractionTask(InputOutputTask):
    """Note + question -> ``name=...; job=...; city=...; year=...`` (one line)."""

    name = "extraction"
    dataset = "generated passages of demo --base smollm2"
    metric_name = "exact match"

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """``metric``/``exact_match``: the whole record line; ``field_accuracy``: right fields / all fields."""
        self.check_lengths(predictions, examples)
        exact = fields = 0
        for prediction, example in zip(predictions, examples):
            gold = record_fields(example.references[0])
            exact += str(prediction).strip() == example.references[0].strip()
            got = record_fields(prediction)
            fields += sum(got.get(key) == value for key, value in gold.items())
        count = max(len(examples), 1)
        value = 100.0 * exact / count
        return {"metric": value, "exact_match": value, "field_accuracy": 100.0 * fields / (len(_FIELDS) * count)}

    sample_sizes = {"train": 1200, "validation": 32, "test": 48}

    def write_sample(self, out_dir: Path, *, seed: int = 0, sizes: Mapping[str, int] | None = None) -> Path:
        """The demo's three splits (by default 1200 train / 32 validation / 48 test; ``sizes`` sets other counts),
        deterministic in ``seed``; each split's items do not depend on the other splits' sizes."""
        from nemo_tiedlora.apps.demo.extraction_data import build

        counts = {**self.sample_sizes, **(sizes or {})}
        unknown = sorted(set(counts) - set(self.sample_sizes))
        if unknown:
            raise TaskError(f"{self.name}: unknown split(s) {unknown} in sample sizes; use train, validation, test")
        build(Path(out_dir), seed=seed + 7, **counts)  # seed 0 writes the demo's own data (its default seed is 7)
        return Path(out_dir)

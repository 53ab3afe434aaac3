"""Checks of NeMo SFT training data (JSONL) before any model is built: pure python, no NeMo.

NeMo's `GPTSFTDataset` fails late and obscurely on bad data (a malformed line deep in the index build, a missing key
as a bare `KeyError` in a data-loader worker) or not at all: an example longer than `max_seq_length` is silently
truncated, and a validation `max_seq_length` that leaves no room next to `tokens_to_generate` truncates every
input away and logs `val_loss=nan`. `check_files` refuses all of these with one `TiedLoraDataError` naming the
file, the line, the field and the fix.

Example length follows `GPTSFTDataset._truncation_ids`: the prompt template's context parts, then
max(answer, tokens_to_generate), plus bos/sep/eos. Tokens are counted with the base's tokenizer when one is given;
otherwise whitespace-separated words are counted, a lower bound for sentencepiece and byte-level BPE tokenizers
(neither merges across spaces), so "longer than max_seq_length" is never claimed wrongly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nemo_tiedlora.core.errors import TiedLoraDataError

MAX_LISTED = 3  # problems spelled out per message; the rest are counted

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class DataSpec:
    """What a dataset section of the finetuning YAML (``model.data.<split>``) says about its files."""

    max_seq_length: int
    prompt_template: str = "{input} {output}"
    label_key: str = "output"
    tokens_to_generate: int = 0
    add_bos: bool = False
    add_sep: bool = False
    add_eos: bool = True
    section: str = "model.data.train_ds"  # named in messages

    @property
    def keys(self) -> list[str]:
        """The record fields the template needs, in template order (the label last)."""
        keys = re.findall(r"{(.+?)}", self.prompt_template)
        return keys + ([self.label_key] if self.label_key not in keys else [])

    def option(self, key: str) -> str:
        """How the user sets `key`: the YAML path, or the check-data option (section "cli")."""
        return f"--{key.replace('_', '-')}" if self.section == "cli" else f"{self.section}.{key}"

    @property
    def specials(self) -> int:
        return int(self.add_bos) + int(self.add_sep) + int(self.add_eos)


@dataclass(frozen=True)
class FileReport:
    path: Path
    examples: int
    longest: int  # tokens (or the word lower bound) of the longest example
    over_length: int  # examples longer than max_seq_length (NeMo truncates them)


def check_spec(spec: DataSpec) -> None:
    """The settings alone: a template NeMo accepts, and room for the answer next to tokens_to_generate."""
    if spec.max_seq_length < 1:
        raise TiedLoraDataError(f"{spec.option('max_seq_length')}={spec.max_seq_length}: set it to a positive length")
    if not spec.prompt_template.endswith(f"{{{spec.label_key}}}"):
        raise TiedLoraDataError(
            f"{spec.option('prompt_template')}={spec.prompt_template!r} must end with the label placeholder "
            f"{{{spec.label_key}}} (label_key={spec.label_key!r}): NeMo's GPTSFTDataset requires it")
    room = spec.max_seq_length - spec.tokens_to_generate - spec.specials
    if spec.tokens_to_generate and room < 1:
        raise TiedLoraDataError(
            f"{spec.option('max_seq_length')}={spec.max_seq_length} leaves no room for the input next to "
            f"{spec.option('tokens_to_generate')}={spec.tokens_to_generate} (+{spec.specials} bos/sep/eos): NeMo would "
            f"truncate every input to nothing and log val_loss=nan; set {spec.option('max_seq_length')} above "
            f"{spec.tokens_to_generate + spec.specials} plus the input length, or lower "
            f"{spec.option('tokens_to_generate')}")


def check_files(paths: Sequence[str | Path], spec: DataSpec, *, count_tokens: Optional[TokenCounter] = None
                ) -> list[FileReport]:
    """Check every file against `spec`; raise one TiedLoraDataError for the first bad file, else the reports."""
    check_spec(spec)
    return [check_file(Path(path), spec, count_tokens=count_tokens) for path in paths]


def check_file(path: Path, spec: DataSpec, *, count_tokens: Optional[TokenCounter] = None) -> FileReport:
    fix_keys = (f"every line must be a JSON object with the keys {spec.keys} ({spec.option('prompt_template')}, "
                f"{spec.option('label_key')})")
    if not path.is_file():
        listed = "on the command line" if spec.section == "cli" else f"in {spec.option('file_names')}"
        raise TiedLoraDataError(f"{path}: no such file (listed {listed}): fix the path")
    raw = path.read_bytes()
    problems: list[str] = []
    examples, longest, shortest, over = 0, 0, None, 0
    counter = count_tokens or (lambda text: len(text.split()))
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            bad_byte = line[error.start:error.start + 1]
            problems.append(f"{path} line {number}: byte {error.start} is not UTF-8 ({bad_byte!r}): "
                            "save the file as UTF-8")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}): {fix_keys}")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path} line {number}: a JSON {type(record).__name__}, not an object: {fix_keys}")
            continue
        missing = [key for key in spec.keys if key not in record]
        if missing:
            problems.append(f"{path} line {number}: field {missing[0]!r} missing"
                            + (f" (also {missing[1:]})" if len(missing) > 1 else "")
                            + f" (the record has {sorted(record)}): {fix_keys}, or set {spec.option('label_key')} / "
                            f"{spec.option('prompt_template')} to the file's keys")
            continue
        bad = [key for key in spec.keys if not isinstance(record[key], str)]
        if bad:
            problems.append(f"{path} line {number}: field {bad[0]!r} is a {type(record[bad[0]]).__name__}, not a "
                            "string: write it as a JSON string")
            continue
        examples += 1
        length = _example_length(record, spec, counter)
        longest = max(longest, length)
        shortest = length if shortest is None else min(shortest, length)
        over += length > spec.max_seq_length
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more problems)" if len(problems) > MAX_LISTED else ""
        raise TiedLoraDataError("; ".join(problems[:MAX_LISTED]) + more)
    if examples == 0:
        raise TiedLoraDataError(f"{path}: no examples (the file is empty or blank): {fix_keys}, one per line")
    if over == examples:
        unit = "tokens" if count_tokens else "words (a lower bound on tokens)"
        raise TiedLoraDataError(
            f"{path}: every example is longer than {spec.option('max_seq_length')}={spec.max_seq_length} "
            f"({shortest} to {longest} {unit}, the answer or tokens_to_generate={spec.tokens_to_generate} included): "
            f"NeMo would truncate all of them; raise {spec.option('max_seq_length')} to at least {longest}")
    return FileReport(path=path, examples=examples, longest=longest, over_length=over)


def _example_length(record: dict, spec: DataSpec, counter: TokenCounter) -> int:
    context_keys = [key for key in re.findall(r"{(.+?)}", spec.prompt_template) if key != spec.label_key]
    template_text = re.sub(r"{.+?}", " ", spec.prompt_template)  # the template's own words count too
    context = counter(" ".join(record[key] for key in context_keys) + " " + template_text) if context_keys else 0
    answer = counter(record[spec.label_key])
    return context + max(answer, spec.tokens_to_generate) + spec.specials

"""Training data checks (nemo_tiedlora.formats.sft_jsonl) and `python -m nemo_tiedlora check-data`: every bad input is
refused with the file, the line, the field and the fix; good data passes with its counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nemo_tiedlora.formats.sft_jsonl import DataSpec, check_files
from nemo_tiedlora.core.errors import TiedLoraDataError
from tests.script_env import script_env

GOOD = [{"input": "the home of the pig is which", "output": "city"}, {"input": "the fox is", "output": "black"}]


def _write(path, lines: list[bytes | str | dict]):
    raw = b"".join((json.dumps(x).encode() if isinstance(x, dict) else x.encode() if isinstance(x, str) else x)
                   + b"\n" for x in lines)
    path.write_bytes(raw)
    return path


# (name, file lines, spec overrides, what the message must name)
CASES = [
    ("malformed", [GOOD[0], '{"input": "a", "output": '], {},
     ["line 2", "not valid JSON", "JSON object with the keys"]),
    ("no_output_key", [GOOD[0], {"input": "a", "answer": "b"}], {}, ["line 2", "field 'output' missing",
                                                                      "label_key"]),
    ("no_input_key", [{"question": "a", "output": "b"}], {}, ["line 1", "field 'input' missing", "prompt_template"]),
    ("not_object", [GOOD[0], "[1, 2]"], {}, ["line 2", "list, not an object"]),
    ("not_string", [{"input": "a", "output": 3}], {}, ["line 1", "field 'output' is a int"]),
    ("empty", [], {}, ["no examples", "empty"]),
    ("blank", ["", "   "], {}, ["no examples"]),
    ("non_utf8", [GOOD[0], b'{"input": "caf\xe9", "output": "x"}'], {},
     ["line 2", "not UTF-8", "save the file as UTF-8"]),
    ("all_too_long", GOOD, {"max_seq_length": 3}, ["every example is longer than", "max_seq_length=3",
                                                   "raise model.data.train_ds.max_seq_length to at least"]),
]


@pytest.mark.parametrize("name,lines,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_refused_naming_file_line_field_and_fix(name, lines, overrides, expected, tmp_path):
    path = _write(tmp_path / f"{name}.jsonl", lines)
    spec = DataSpec(**{"max_seq_length": 64, **overrides})
    with pytest.raises(TiedLoraDataError) as error:
        check_files([path], spec)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_missing_file_and_every_problem_counted(tmp_path):
    with pytest.raises(TiedLoraDataError, match=r"no_such\.jsonl: no such file \(listed in model\.data\.train_ds"):
        check_files([tmp_path / "no_such.jsonl"], DataSpec(max_seq_length=64))
    path = _write(tmp_path / "many.jsonl", ["{"] * 5)
    with pytest.raises(TiedLoraDataError, match=r"line 1: .*line 2: .*line 3: .*\(and 2 more problems\)"):
        check_files([path], DataSpec(max_seq_length=64))


def test_no_room_next_to_tokens_to_generate_is_the_val_loss_nan_trap(tmp_path):
    path = _write(tmp_path / "val.jsonl", GOOD)
    spec = DataSpec(max_seq_length=32, tokens_to_generate=32, section="model.data.validation_ds")
    with pytest.raises(TiedLoraDataError, match="val_loss=nan") as error:
        check_files([path], spec)
    assert "model.data.validation_ds.max_seq_length=32" in str(error.value)
    assert "model.data.validation_ds.tokens_to_generate=32" in str(error.value)
    # room for the input: accepted
    check_files([path], DataSpec(max_seq_length=64, tokens_to_generate=32, section="model.data.validation_ds"))


def test_good_file_passes_with_counts_and_token_counter(tmp_path):
    path = _write(tmp_path / "good.jsonl", GOOD)
    (report,) = check_files([path], DataSpec(max_seq_length=6))
    # words: context + max(answer, tokens_to_generate=0) + eos: 7+1+1 and 3+1+1
    assert (report.examples, report.longest, report.over_length) == (2, 9, 1)
    (report,) = check_files([path], DataSpec(max_seq_length=64), count_tokens=lambda text: len(text))
    # characters: context joined with the template's own text ("{input} {output}" -> 3 spaces), answer, eos
    assert report.longest == len("the home of the pig is which") + 1 + 3 + len("city") + 1


def test_custom_template_keys(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [{"question": "q", "context": "c", "answer": "a"}])
    spec = DataSpec(max_seq_length=64, prompt_template="Q: {question} C: {context} A: {answer}", label_key="answer")
    assert spec.keys == ["question", "context", "answer"]
    check_files([path], spec)
    with pytest.raises(TiedLoraDataError, match="must end with the label placeholder"):
        check_files([path], DataSpec(max_seq_length=64, prompt_template="{answer} {question}", label_key="question2"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nemo_tiedlora", "check-data", *map(str, args)], capture_output=True,
                          text=True, env=script_env(), timeout=300)


def test_check_data_cli(tmp_path):
    good = _write(tmp_path / "good.jsonl", GOOD)
    result = _cli(good, "--max-seq-length", 64)
    assert result.returncode == 0 and "2 examples" in result.stdout and "ok" in result.stdout
    bad = _write(tmp_path / "bad.jsonl", [GOOD[0], {"prompt": "x", "output": "y"}])
    result = _cli(good, bad, "--max-seq-length", 64)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last.startswith("error: ") and f"{bad} line 2: field 'input' missing" in last
    other = _write(tmp_path / "other.jsonl", [{"prompt": "x", "output": "y"}])
    result = _cli(other, "--max-seq-length", 64, "--prompt-template", "{prompt} {output}")
    assert result.returncode == 0, result.stderr
    result = _cli(good, "--max-seq-length", 16, "--tokens-to-generate", 16)
    assert result.returncode == 2 and "--max-seq-length=16" in result.stderr and "val_loss=nan" in result.stderr

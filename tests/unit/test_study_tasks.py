"""Study task adapters: generated samples round-trip, metrics against hand-computed values, clear errors."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import pytest

from nemo_tiedlora.apps.study.tasks import SPLITS, TASKS, Example, TaskAdapter, TaskError, get_task, prepare
from nemo_tiedlora.apps.study.tasks.gsm8k import final_number, gold_number
from nemo_tiedlora.apps.study.tasks.hellaswag import clean
from nemo_tiedlora.apps.study.tasks.squad import exact_match, f1, normalize_answer

TASK_NAMES = ("squad", "dialogsum", "hellaswag", "iwslt2017", "gsm8k")


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every task's generated sample, written once."""
    root = tmp_path_factory.mktemp("samples")
    return {name: TASKS[name].write_sample(root / name) for name in TASK_NAMES}


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _perfect(task: TaskAdapter, examples: list[Example]) -> list[object]:
    """Predictions that are right: the target text (the label's index for multiple choice)."""
    return [example.label if example.endings else example.target for example in examples]


# ---------------------------------------------------------------------------------------------
# Registry and generated samples
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_metadata() -> None:
    assert tuple(TASKS) == TASK_NAMES + ("homes", "extraction", "arithmetic")
    for name, task in TASKS.items():
        assert task.name == name
        assert task.metric_name and task.higher_is_better is True
        assert get_task(name) is task and get_task(task) is task
    with pytest.raises(TaskError, match="unknown task 'nope'.*squad, dialogsum"):
        get_task("nope")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sample_round_trips_to_sft(name: str, samples: dict[str, Path]) -> None:
    task = TASKS[name]
    for split in task.split_files:
        examples = task.load(samples[name], split)
        assert 1 <= len(examples) <= 20
        assert len({example.id for example in examples}) == len(examples), "ids are unique within a split"
        records = task.to_sft(examples)
        assert len(records) == len(examples)
        for record, example in zip(records, examples):
            json.dumps(record)  # serializable
            assert isinstance(record["input"], str) and record["input"].rstrip().endswith(":")
            assert record["input"] == task.prompt(example)
            assert isinstance(record["output"], str) and record["output"].strip()
            assert record["output"] == record["references"][0] or name == "gsm8k"
            assert record["id"] == example.id
        assert task.score(_perfect(task, examples), examples)["metric"] == pytest.approx(100.0)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sample_is_deterministic(name: str, tmp_path: Path) -> None:
    task = TASKS[name]

    def contents(folder: Path) -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}

    first = contents(task.write_sample(tmp_path / "a", seed=3))
    assert first == contents(task.write_sample(tmp_path / "b", seed=3))
    assert first != contents(task.write_sample(tmp_path / "c", seed=4))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_prepare_writes_three_sft_splits(name: str, samples: dict[str, Path], tmp_path: Path) -> None:
    task = TASKS[name]
    paths = prepare(name, samples[name], tmp_path / "sft")
    assert set(paths) == set(SPLITS)
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    records = {split: _records(path) for split, path in paths.items()}
    assert all(records[split] for split in SPLITS)
    if "validation" not in task.split_files:  # held out of train: nothing lost, nothing shared
        train = task.load(samples[name], "train")
        ids = [r["id"] for r in records["train"]], [r["id"] for r in records["validation"]]
        assert sorted(ids[0] + ids[1]) == sorted(example.id for example in train)
        assert not set(ids[0]) & set(ids[1])
    assert paths == prepare(name, samples[name], tmp_path / "sft")  # rerun replaces the files in place
    assert len(list((tmp_path / "sft").iterdir())) == 3, "no temporary files left behind"


def test_hold_out_keeps_squad_articles_whole(samples: dict[str, Path], tmp_path: Path) -> None:
    train = TASKS["squad"].load(samples["squad"], "train")
    paths = prepare("squad", samples["squad"], tmp_path, validation_size=2)
    groups = {example.id: example.group for example in train}
    held = {groups[str(r["id"])] for r in _records(paths["validation"])}
    kept = {groups[str(r["id"])] for r in _records(paths["train"])}
    assert held and kept and not held & kept
    assert len(_records(paths["validation"])) == 3  # one whole article of three questions


def test_hellaswag_sft_carries_endings_and_label(samples: dict[str, Path]) -> None:
    task = TASKS["hellaswag"]
    example = task.load(samples["hellaswag"], "test")[0]
    record = task.to_sft([example])[0]
    assert record["endings"] == list(example.endings) and len(example.endings) == 4
    assert record["output"] == example.endings[record["label"]]
    context, endings = task.choices(example)
    assert context == record["input"] and endings == example.endings


# ---------------------------------------------------------------------------------------------
# Metrics against hand-computed values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear   and THE plum.", "apple pear and plum"),
        ("Theory of a thing", "theory of thing"),  # "the" inside a word stays
        ("  1,000 km ", "1000 km"),
        ("A", ""),
    ],
)
def test_squad_normalization(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_squad_exact_match_and_f1_by_hand() -> None:
    assert exact_match("the Eiffel Tower.", "Eiffel Tower")
    assert not exact_match("Eiffel", "Eiffel Tower")
    # "cat sat on mat" vs "cat sat": 2 common tokens, precision 2/4, recall 2/2 -> F1 = 2 * .5 * 1 / 1.5
    assert f1("the cat sat on a mat", "The cat sat") == pytest.approx(2 / 3)
    assert f1("dog", "cat") == 0.0
    task = TASKS["squad"]
    examples = [
        Example(id="q1", fields={}, target="Paris", references=("Paris", "in Paris")),
        Example(id="q2", fields={}, target="1850", references=("1850",)),
    ]
    scores = task.score(["in Paris.\nQuestion: where else?", "in 1850 or so"], examples)
    assert scores["metric"] == scores["exact_match"] == pytest.approx(50.0)
    # q1 exact (F1 1); q2 "in 1850 or so" vs "1850": P 1/4, R 1 -> 0.4
    assert scores["f1"] == pytest.approx(100 * (1.0 + 0.4) / 2)


@pytest.mark.parametrize(
    ("prediction", "number"),
    [
        ("She has 3 + 4 = 7 apples, so 1,234 in total.", Decimal(1234)),
        ("Step: 10 * 2 = 20\n#### 20\nQuestion: Tom has 5 cats", Decimal(20)),
        ("The answer is -3.", Decimal(-3)),
        ("5-3=2", Decimal(2)),
        ("It costs $4.50.", Decimal("4.5")),
        ("no idea", None),
    ],
)
def test_gsm8k_final_number(prediction: str, number: Decimal | None) -> None:
    assert final_number(prediction) == number


def test_gsm8k_gold_number_and_score() -> None:
    assert gold_number("12 + 30 = <<12+30=42>>42\n#### 1,200") == Decimal(1200)
    assert gold_number("no mark 42") is None
    task = TASKS["gsm8k"]
    examples = [Example(id=str(n), fields={}, target="", references=("72",)) for n in range(3)]
    scores = task.score(["so 72", "... #### 72.0", "seventy-two"], examples)
    assert scores["metric"] == pytest.approx(200 / 3)
    assert scores["answered"] == pytest.approx(200 / 3)


def test_bleu_identical_zero_overlap_and_by_hand() -> None:
    task = TASKS["iwslt2017"]
    reference = "the small dogs sleep in the garden ."
    example = Example(id="1", fields={"source": ""}, target=reference, references=(reference,))
    assert task.score([reference], [example])["metric"] == pytest.approx(100.0)
    assert task.score(["völlig andere wörter hier stehen"], [example])["metric"] == pytest.approx(0.0)
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (BP 1): BLEU = (1/12) ** (1/4)
    hand = Example(id="2", fields={"source": ""}, target="", references=("the cat sat on a mat",))
    assert task.score(["the cat sat on the mat"], [hand])["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-3)


def test_rouge_l_by_hand_max_over_references() -> None:
    task = TASKS["dialogsum"]
    # LCS("the cat lay on the mat", "the cat sat on the mat") = 5 of 6 tokens each way -> F = 5/6
    example = Example(
        id="d", fields={}, target="", references=("completely unrelated words here", "The cat sat on the mat.")
    )
    scores = task.score(["the cat lay on the mat"], [example])
    assert scores["metric"] == scores["rougeL"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)  # bigrams: the cat, on the, the mat of 5


def test_hellaswag_loglik_accuracy_sum_and_normalized() -> None:
    task = TASKS["hellaswag"]
    short, long = "a b", "a much longer ending"
    examples = [
        Example(id="0", fields={"activity": "x", "context": "c"}, target=long, references=(long,),
                endings=(short, long), label=1),
        Example(id="1", fields={"activity": "x", "context": "c"}, target=short, references=(short,),
                endings=(short, long), label=0),
    ]
    calls: list[tuple[str, str]] = []

    def scorer(context: str, ending: str) -> float:
        calls.append((context, ending))
        return -3.0 if ending == short else -4.0  # sum picks short; per character (-1 vs -0.2) picks long

    scores = task.score_loglik(examples, scorer)
    assert scores["accuracy"] == pytest.approx(50.0) and scores["accuracy_norm"] == pytest.approx(50.0)
    assert len(calls) == 4 and calls[0][0] == task.prompt(examples[0])
    only_long = [examples[0], examples[0]]
    assert task.score_loglik(only_long, scorer)["metric"] == pytest.approx(100.0)
    assert task.score_loglik(only_long, scorer, normalize=False)["metric"] == pytest.approx(0.0)
    assert task.score([1, "A B!"], examples)["metric"] == pytest.approx(100.0)
    assert task.score(["something else", 1], examples)["metric"] == pytest.approx(0.0)


def test_hellaswag_cleaning() -> None:
    assert clean("[header] How to water a plant [title] Check the soil.") == "How to water a plant. Check the soil."
    assert clean("[step] Pour  water.") == "Pour water."


def test_score_needs_one_prediction_per_example() -> None:
    example = Example(id="1", fields={}, target="x", references=("x",))
    with pytest.raises(TaskError, match="got 2 predictions for 1 examples"):
        TASKS["squad"].score(["x", "y"], [example])


# ---------------------------------------------------------------------------------------------
# Errors name the file, the record and what was expected
# ---------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_folder_file_and_split(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"no such file or folder.*train-v1\.1\.json"):
        TASKS["squad"].load(tmp_path / "absent", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match=r"empty.train-v1\.1\.json: no such file; expected the SQuAD v1\.1 train"):
        TASKS["squad"].load(tmp_path / "empty", "train")
    with pytest.raises(TaskError, match="has no validation file.*prepare"):
        TASKS["squad"].load(tmp_path / "empty", "validation")
    with pytest.raises(TaskError, match="unknown split 'dev'"):
        TASKS["gsm8k"].load(tmp_path / "empty", "dev")
    file = _write(tmp_path / "train.jsonl", "")
    with pytest.raises(TaskError, match=r"train\.jsonl: not a folder; prepare\(\) reads every split.*test\.jsonl"):
        prepare("gsm8k", file, tmp_path / "out")


def test_squad_malformed_question_names_the_record(tmp_path: Path) -> None:
    document = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"id": "q7", "answers": []}]}]}]}
    file = _write(tmp_path / "train-v1.1.json", json.dumps(document))
    with pytest.raises(TaskError) as raised:
        TASKS["squad"].load(tmp_path, "train")
    message = str(raised.value)
    assert str(file) in message and "data[0].paragraphs[0].qas[0] (id q7)" in message
    assert "'question' is missing" in message and "expected SQuAD v1.1 JSON" in message


def test_squad_not_json(tmp_path: Path) -> None:
    _write(tmp_path / "dev-v1.1.json", '{"data": [')
    with pytest.raises(TaskError, match=r"dev-v1\.1\.json: not valid JSON at line 1"):
        TASKS["squad"].load(tmp_path, "test")


@pytest.mark.parametrize(
    ("name", "file_name", "lines", "expected"),
    [
        ("dialogsum", "dialogsum.train.jsonl", ['{"fname": "a", "dialogue": "d", "summary": "s"}', '{"fname": "b"}'],
         r"line 2 \(fname b\): field 'dialogue' is missing; expected DialogSum JSONL"),
        ("dialogsum", "dialogsum.test.jsonl", ['{"fname": "a", "dialogue": "d"}'],
         r"line 1 \(fname a\): neither 'summary' nor 'summary1'"),
        ("gsm8k", "train.jsonl", ['{"question": "q", "answer": "it is 4"}'],
         r"line 1: 'answer' does not end with '#### <number>'"),
        ("gsm8k", "train.jsonl", ['{"question": 3, "answer": "#### 4"}'],
         r"line 1: field 'question' is int 3, not a string"),
        ("gsm8k", "train.jsonl", ["", "not json"], r"line 2: not valid JSON"),
        ("gsm8k", "train.jsonl", ["[1, 2]"], r"line 1: a JSON list, expected one JSON object per line"),
        ("hellaswag", "hellaswag_train.jsonl",
         ['{"ind": 5, "activity_label": "a", "ctx": "c", "endings": ["x", "y"], "split": "test"}'],
         r"line 1 \(ind 5\): 'label' is missing \(HellaSwag's own test file is unlabelled"),
        ("hellaswag", "hellaswag_train.jsonl",
         ['{"ind": 5, "activity_label": "a", "ctx": "c", "endings": ["x", "y"], "label": 2}'],
         r"'label' is 2, not an index into the 2 endings"),
        ("hellaswag", "hellaswag_train.jsonl", ['{"ind": 1, "activity_label": "a", "ctx": "c", "endings": "xy"}'],
         r"field 'endings' is str 'xy', not a list"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(
    name: str, file_name: str, lines: list[str], expected: str, tmp_path: Path
) -> None:
    file = _write(tmp_path / file_name, "\n".join(lines) + "\n")
    split = "test" if "test" in file_name else "train"
    with pytest.raises(TaskError, match=expected) as raised:
        TASKS[name].load(tmp_path, split)
    assert str(raised.value).startswith(str(file))


def test_iwslt_misaligned_train_and_xml(tmp_path: Path) -> None:
    task = TASKS["iwslt2017"]
    _write(tmp_path / "train.tags.de-en.de", "<talkid>1</talkid>\nHallo Welt.\nZwei.\n")
    _write(tmp_path / "train.tags.de-en.en", "<talkid>1</talkid>\n<title>x</title>\nTwo.\n")
    with pytest.raises(TaskError, match=r"train\.tags\.de-en\.en line 2: .* do not align"):
        task.load(tmp_path, "train")
    _write(tmp_path / "train.tags.de-en.en", "<talkid>1</talkid>\nHello world.\n")
    with pytest.raises(TaskError, match=r"has 3 lines and .* 2; expected the same number"):
        task.load(tmp_path, "train")
    german = _write(tmp_path / "IWSLT17.TED.tst2010.de-en.de.xml", '<doc docid="1">\n<seg id="1"> A </seg>\n')
    with pytest.raises(TaskError, match=r"tst2010\.de-en\.en\.xml: no such file; expected the English side"):
        task.load(tmp_path, "test")
    _write(tmp_path / "IWSLT17.TED.tst2010.de-en.en.xml", '<doc docid="1">\n<seg id="2"> B </seg>\n')
    with pytest.raises(TaskError, match=r"list different segments .*\('1', '1'\)"):
        task.load(german, "test")


def test_iwslt_xml_entities_and_pairing(samples: dict[str, Path]) -> None:
    examples = TASKS["iwslt2017"].load(samples["iwslt2017"], "test")
    assert [example.id for example in examples] == ["900:1", "900:2", "900:3", "900:4"]
    assert "&" in examples[-1].fields["source"] and "&amp;" not in examples[-1].target
    assert examples[-1].fields["source"].startswith("Die ") and examples[-1].target.startswith("The ")
    assert not math.isnan(TASKS["iwslt2017"].score([e.target for e in examples], examples)["chrf"])


def test_homes_task_is_the_demo_task_with_its_metric(tmp_path: Path) -> None:
    """The embedded default task: the demo's splits, read back item for item, scored by first-word exact match."""
    from nemo_tiedlora.apps.demo.data import build_task

    task = TASKS["homes"]
    folder = task.write_sample(tmp_path / "homes")
    demo = build_task(tmp_path / "demo")
    for split in SPLITS:
        records = _records(demo[split])
        examples = task.load(folder, split)
        assert [(e.fields["input"], e.target) for e in examples] == [(r["input"], r["output"]) for r in records]
    examples = task.load(folder, "test")[:4]
    predictions = [f"{examples[0].target} .", examples[1].target.upper(), "nowhere", f"x {examples[3].target}"]
    assert task.score(predictions, examples) == {"metric": 50.0, "exact_match": 50.0}
    assert task.to_sft(examples[:1])[0]["input"] == examples[0].fields["input"]
    paths = prepare("homes", folder, tmp_path / "sft")  # its own validation split: nothing held out of train
    assert len(_records(paths["train"])) == len(_records(demo["train"]))

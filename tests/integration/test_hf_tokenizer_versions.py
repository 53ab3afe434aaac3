"""SmolLM2's tokenizer as import-hf stores it tokenizes alike under the pinned transformers (4.x, what NeMo uses) and
transformers 5 (what vLLM uses), and as the GGUF's own vocabulary does.

The reference is independent of both: the GGUF's tokens and ranked merges read with the `gguf` reader and applied
with llama.cpp's pre-tokenizer rule (tests/gguf_bpe.py). Inputs: the chat template (system, user and assistant turns),
special tokens written inline, newlines and runs of spaces, numerals, non-ASCII text and the demo's own prompts.
transformers 5 runs in the serving environment (tests/vllm_env.py); those tests skip with one line without it.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.gguf_bpe import GGUFByteLevelBPE
from tests.smollm2_assets import smollm2_gguf, smollm2_nemo  # noqa: F401 (pytest fixtures)
from tests.vllm_env import tokenizer_ids, vllm_venv  # noqa: F401 (pytest fixture)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEXTS = [
    "Hello world",
    "line one\nline two\n\n  indented\ttab\r\nwindows line",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|><|endoftext|>",
    "Café, naïve, Zürich, 日本語のテキスト, Привет, مرحبا, "
    "emoji 🚀🎉, ½ and ¾, Ω≈ç√∫",
    "In 2024 we sold 1,234,567 units (3.14%) at $99.99; call 555-0100.",
    "don't won't I'm you'll they've it's O'Neil's",
    "   multiple    spaces   and trailing ",
    "def f(x):\n    return x ** 2  # square\n",
]
CHATS = [
    [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
     {"role": "user", "content": "What is 12 + 30?\nAnswer briefly."}],
    [{"role": "user", "content": "Übersetze: ½ Liter Milch"},
     {"role": "assistant", "content": "Half a litre of milk."},
     {"role": "user", "content": "Und 2 Liter?"}],
]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[str]:
    """TEXTS plus the first eight test prompts of the SmolLM2 demo, in the chat format it trains and serves with."""
    from nemo_tiedlora.apps.demo import extraction_data as extraction
    from nemo_tiedlora.apps.demo.real import PROMPT_TEMPLATE

    data = extraction.build(tmp_path_factory.mktemp("extraction"))
    rows = [json.loads(line) for line in data.test.read_text().splitlines()[:8]]
    return TEXTS + [PROMPT_TEMPLATE.format(input=row["input"], output=row["output"]) for row in rows]


@pytest.fixture(scope="module")
def archive_tokenizer(smollm2_nemo, tmp_path_factory) -> Path:
    """A folder with the tokenizer files the imported .nemo carries (its tokenizer.hf_files artifacts)."""
    from nemo_tiedlora.nemo.hf_base_config import archive_tokenizer_files

    folder = tmp_path_factory.mktemp("archive_tokenizer")
    with tarfile.open(smollm2_nemo) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile() and "/" not in m.name.lstrip("./")}
        cfg = yaml.safe_load(tar.extractfile(members["model_config.yaml"]).read())
        artifacts = {name: tar.extractfile(member).read() for name, member in members.items()
                     if name.endswith(".json")}
    for name, data in archive_tokenizer_files(cfg["tokenizer"], artifacts).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def reference(smollm2_gguf) -> GGUFByteLevelBPE:
    return GGUFByteLevelBPE(smollm2_gguf)


def _assert_as_the_gguf_vocabulary(result: dict, reference: GGUFByteLevelBPE, texts: list[str]) -> None:
    for text, got in zip(texts, result["texts"], strict=True):
        expected = reference.encode(text)
        assert got["ids"] == expected, f"{text!r}: {got['ids'][:24]} != {expected[:24]}"
        assert got["ids_default"] == expected, "no BOS/EOS is added (the GGUF says so)"
        assert got["decoded"] == reference.decode(expected) == text
        assert got["decoded_skip"] == reference.decode(expected, skip_special=True)
    for messages, got in zip(CHATS, result["chats"], strict=True):
        assert got["prompt"] == reference.chat(messages)
        assert got["ids"] == reference.encode(got["prompt"])


def test_archive_tokenizer_gives_the_gguf_vocabularys_ids_under_the_pinned_transformers(
        archive_tokenizer, reference, texts, tmp_path):
    result = tokenizer_ids(sys.executable, archive_tokenizer, texts, CHATS, tmp_path)
    assert result["transformers"].startswith("4.") and result["class"] == "PreTrainedTokenizerFast"
    _assert_as_the_gguf_vocabulary(result, reference, texts)


def test_archive_tokenizer_gives_the_gguf_vocabularys_ids_under_transformers_5(
        archive_tokenizer, reference, texts, vllm_venv, tmp_path):
    result = tokenizer_ids(vllm_venv / "bin" / "python", archive_tokenizer, texts, CHATS, tmp_path)
    assert result["transformers"].startswith("5.")
    _assert_as_the_gguf_vocabulary(result, reference, texts)


def test_export_repair_gives_transformers_5_the_ids_nemo_had_for_a_base_imported_before_the_rule(
        smollm2_gguf, texts, vllm_venv, tmp_path, caplog):
    """A tokenizer as the earlier import-hf stored it (transformers 4.51's GGUF loader, declared LlamaTokenizer):
    transformers 5 reads it into other ids, and the files export writes for it (with a warning naming the fix) into
    exactly the ids the pinned transformers (so NeMo) gives it."""
    from transformers import AutoTokenizer

    from nemo_tiedlora.nemo.hf_base_config import tokenizer_config
    from nemo_tiedlora.tools.export import export_tokenizer_files

    old, repaired = tmp_path / "old", tmp_path / "repaired"
    AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).save_pretrained(
        str(old), legacy_format=False)
    files = {p.name: p.read_bytes() for p in old.iterdir() if p.suffix == ".json"}
    assert json.loads(files["tokenizer_config.json"])["tokenizer_class"] == "LlamaTokenizer"
    section = tokenizer_config(files)  # the base archive's tokenizer section, its files as archive artifacts
    with caplog.at_level("WARNING", logger="nemo_tiedlora"):
        written = export_tokenizer_files(section, files, Path("old.nemo"), repaired)
    assert "run import-hf on the GGUF again" in caplog.text
    assert written["tokenizer.json"] == files["tokenizer.json"]
    repaired.mkdir()
    for name, data in written.items():
        (repaired / name).write_bytes(data)
    nemo = tokenizer_ids(sys.executable, old, texts, CHATS, tmp_path / "nemo")
    before = tokenizer_ids(vllm_venv / "bin" / "python", old, texts, CHATS, tmp_path / "before")
    after = tokenizer_ids(vllm_venv / "bin" / "python", repaired, texts, CHATS, tmp_path / "after")
    assert sum(a["ids"] != b["ids"] for a, b in zip(nemo["texts"], before["texts"])) >= len(texts) // 2
    assert [t["ids"] for t in after["texts"]] == [t["ids"] for t in nemo["texts"]]
    assert [t["decoded"] for t in after["texts"]] == [t["decoded"] for t in nemo["texts"]]
    assert [c["ids"] for c in after["chats"]] == [c["ids"] for c in nemo["chats"]]

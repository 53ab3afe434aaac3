"""Tokenizer files that every transformers release reads alike (`nemo_tiedlora.formats.hf.tokenizer`), on small
tokenizers built here with `tokenizers`. References: the `tokenizers` library itself (ids of the tokenizer object) and
llama.cpp's pre-tokenizer regular expressions applied with `regex` (tests/gguf_bpe.py). The same rules on SmolLM2's
real GGUF vocabulary, under transformers 4.x and 5.x, are tests/integration/test_hf_tokenizer_versions.py.
"""

from __future__ import annotations

import json

import pytest

from nemo_tiedlora.formats.hf.tokenizer import (
    AUTHORITATIVE_CLASS,
    from_gguf_before_repair,
    gguf_byte_level_json,
    is_byte_level_bpe,
    portable_config,
    portable_files,
    special_token_ids,
)
from tests.gguf_bpe import pre_tokenize

TEXTS = ["Hello world", "line one\nline two\n\n  indented\ttab", "In 2024 we sold 1,234,567 units (3.14%)",
         "Café, naïve, Zürich, 日本語, ½ and ¾, emoji 🚀", "don't won't I'm you'll", "x2y 42abc ٣٤ Ⅻ"]
# what transformers 4.51's GGUF loader writes for a byte-level BPE GGUF (SmolLM2's, fields abridged)
GGUF_LOADER_CONFIG = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": None, "legacy": True,
                      "bos_token": "<s>", "eos_token": "</s>", "clean_up_tokenization_spaces": True,
                      "model_type": "gpt2", "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False}
GGUF_LOADER_DECODER = {"type": "Sequence", "decoders": [
    {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE trained here on TEXTS, with <s> and </s> as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS * 4, trainer)
    return tokenizer


def _sentencepiece_style() -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab={"<unk>": 0, "\u2581a": 1, "a": 2}, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return json.loads(tokenizer.to_str())


def test_byte_level_bpe_is_recognised_and_sentencepiece_style_is_not(byte_level):
    assert is_byte_level_bpe(json.loads(byte_level.to_str()))
    assert not is_byte_level_bpe(_sentencepiece_style())


def test_byte_level_bpe_declared_as_llama_becomes_pretrainedtokenizerfast_without_sentencepiece_keys(byte_level):
    fixed = portable_config(GGUF_LOADER_CONFIG, json.loads(byte_level.to_str()))
    assert fixed["tokenizer_class"] == AUTHORITATIVE_CLASS == "PreTrainedTokenizerFast"
    assert not {"legacy", "add_prefix_space", "model_type", "use_default_system_prompt"} & set(fixed)
    assert fixed["clean_up_tokenization_spaces"] is False
    kept = {k: v for k, v in GGUF_LOADER_CONFIG.items() if k not in fixed}
    assert set(kept) == {"legacy", "add_prefix_space", "model_type", "use_default_system_prompt"}
    assert (fixed["bos_token"], fixed["eos_token"], fixed["add_bos_token"]) == ("<s>", "</s>", False)


def test_sentencepiece_tokenizer_keeps_its_own_llama_class():
    assert portable_config(GGUF_LOADER_CONFIG, _sentencepiece_style()) == GGUF_LOADER_CONFIG


def test_repaired_files_load_in_transformers_with_the_ids_of_the_tokenizers_library(byte_level, tmp_path):
    """The files as export writes them (tokenizer.json untouched, config made portable) load with the pinned
    transformers and give, for every text, the ids and text of the `tokenizers` object they were saved from."""
    from transformers import AutoTokenizer

    files = {"tokenizer.json": byte_level.to_str().encode(),
             "tokenizer_config.json": json.dumps(GGUF_LOADER_CONFIG).encode()}
    repaired = portable_files(files)
    assert repaired["tokenizer.json"] == files["tokenizer.json"]
    for name, data in repaired.items():
        (tmp_path / name).write_bytes(data)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "PreTrainedTokenizerFast"
    for text in TEXTS:
        expected = byte_level.encode(text).ids
        assert loaded(text, add_special_tokens=False).input_ids == expected
        assert loaded.decode(expected) == byte_level.decode(expected) == text


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_gguf_pre_tokenizer_cuts_text_as_llama_cpp(byte_level, pre):
    """For each GGUF pre-tokenizer name, the rebuilt tokenizer.json's pre-tokenizer cuts every text into the pieces
    llama.cpp's regular expressions for that name give (tests/gguf_bpe.pre_tokenize)."""
    from tokenizers import Tokenizer

    loaded = json.loads(byte_level.to_str())
    fixed, known = gguf_byte_level_json(dict(loaded, decoder=GGUF_LOADER_DECODER), pre)
    assert known
    rebuilt = Tokenizer.from_str(json.dumps(fixed))
    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    for text in TEXTS:
        pieces = [bytes(byte_of[c] for c in piece).decode() for piece, _ in
                  rebuilt.pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == pre_tokenize(text, pre), text
        assert rebuilt.decode(rebuilt.encode(text).ids) == text  # the plain byte-level decoder


def test_digit_rule_splits_a_numeral_off_where_gpt2_keeps_it_with_its_space():
    assert pre_tokenize(" ½ 42", "gpt-2") == [" ½", " 42"]
    assert pre_tokenize(" ½ 42", "smollm") == [" ", "½", " ", "4", "2"]


def test_unknown_gguf_pre_tokenizer_keeps_the_loaders_rule_and_says_it_was_unknown(byte_level):
    loaded = json.loads(byte_level.to_str())
    fixed, known = gguf_byte_level_json(loaded, "llama-bpe")
    assert not known and fixed["pre_tokenizer"] == loaded["pre_tokenizer"]


def test_gguf_loader_decoder_marks_a_tokenizer_imported_before_the_rule(byte_level):
    loaded = json.loads(byte_level.to_str())
    assert from_gguf_before_repair(dict(loaded, decoder=GGUF_LOADER_DECODER))
    assert not from_gguf_before_repair(gguf_byte_level_json(dict(loaded, decoder=GGUF_LOADER_DECODER), "smollm")[0])
    assert not from_gguf_before_repair(_sentencepiece_style())


def test_special_token_ids_are_the_vocabulary_ids_of_the_declared_tokens(byte_level):
    files = {"tokenizer.json": byte_level.to_str().encode(),
             "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                                  "pad_token": None}).encode()}
    assert special_token_ids(files) == {"bos_token_id": byte_level.token_to_id("<s>"),
                                        "eos_token_id": byte_level.token_to_id("</s>")}
    assert special_token_ids({"tokenizer.json": files["tokenizer.json"]}) == {}


def _bytes_to_unicode() -> dict[int, str]:
    from tests.gguf_bpe import _bytes_to_unicode as table

    return table()

"""Hugging Face tokenizer files that every ``transformers`` release reads the same way (formats layer: JSON only).

A fast tokenizer is two files that can disagree: ``tokenizer.json`` (the whole pipeline: normalizer, pre-tokenizer,
model, post-processor, decoder) and ``tokenizer_config.json``, whose ``tokenizer_class`` names the Python class
that loads it. ``transformers`` 4.x loads ``tokenizer.json`` as it is whatever the class; ``transformers`` 5 builds
the pipeline its class defines for several classes (``LlamaTokenizer`` among them: SentencePiece-style Metaspace
pre-tokenization), so a byte-level BPE ``tokenizer.json`` declared as ``LlamaTokenizer`` tokenizes into other ids
there (newlines vanish, words split differently). ``PreTrainedTokenizerFast`` is the class whose pipeline is
``tokenizer.json`` in every release, so a byte-level BPE tokenizer is always declared as that class here.

A GGUF file carries its vocabulary and merges but names its pre-tokenizer only as a string
(``tokenizer.ggml.pre``), which ``transformers``' GGUF loader ignores: it builds GPT-2's rule (and a SentencePiece
style decoder with byte fallback). :func:`gguf_byte_level_json` puts llama.cpp's rule for that name back, so the
imported tokenizer splits text as the model's own runtime does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

AUTHORITATIVE_CLASS = "PreTrainedTokenizerFast"
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies for it (llama-vocab.cpp). GPT-2's regex is what
# ByteLevel(use_regex=True) applies; the StarCoder family first splits every numeral off on its own (``\p{N}``),
# which is tokenizers' Digits(individual_digits=True).
_DIGITS_THEN_GPT2 = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
GGUF_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    **{name: _BYTE_LEVEL for name in ("gpt-2", "mpt", "olmo", "jais")},
    **{name: _DIGITS_THEN_GPT2 for name in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone")},
}
_BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
# tokenizer_config.json keys that only SentencePiece-style classes read; transformers 5 rebuilds pre-tokenizers
# from some of them even for PreTrainedTokenizerFast
_SENTENCEPIECE_KEYS = ("legacy", "add_prefix_space", "use_default_system_prompt", "model_type")


def _pre_tokenizers(tokenizer_json: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def is_byte_level_bpe(tokenizer_json: Mapping[str, Any]) -> bool:
    """A BPE model over GPT-2's byte alphabet (a ``ByteLevel`` pre-tokenizer)."""
    model = tokenizer_json.get("model") or {}
    return model.get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(tokenizer_json))


def gguf_byte_level_json(tokenizer_json: Mapping[str, Any], pre: Optional[str]) -> tuple[dict[str, Any], bool]:
    """(``tokenizer.json`` of a GGUF's byte-level BPE with llama.cpp's pre-tokenizer, whether ``pre`` was known).

    ``tokenizer_json`` is what ``transformers``' GGUF loader built. The pre-tokenizer becomes the rule llama.cpp
    applies for ``pre`` (``tokenizer.ggml.pre``); an unknown name keeps the loader's GPT-2 rule (the caller warns).
    The decoder becomes the plain byte-level one and the SentencePiece leftovers (empty normalizer, byte fallback)
    go: byte-level BPE has a token for every byte.
    """
    fixed = dict(tokenizer_json)
    known = pre in GGUF_PRE_TOKENIZERS
    if known:
        fixed["pre_tokenizer"] = json.loads(json.dumps(GGUF_PRE_TOKENIZERS[pre]))
    fixed["decoder"] = dict(_BYTE_LEVEL_DECODER)
    fixed["normalizer"] = None
    fixed["model"] = dict(fixed["model"], byte_fallback=False)
    return fixed, known


def portable_config(config: Mapping[str, Any], tokenizer_json: Mapping[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` that loads ``tokenizer_json`` as it is under ``transformers`` 4.x and 5.x.

    A byte-level BPE tokenizer is declared as ``PreTrainedTokenizerFast``, loses the SentencePiece-only keys and
    decodes without "clean-up" of spaces (the byte-level decoder restores the text exactly); any other tokenizer
    (a SentencePiece one, say, under its own Llama class) is returned unchanged.
    """
    if not is_byte_level_bpe(tokenizer_json):
        return dict(config)
    fixed = {key: value for key, value in config.items() if key not in _SENTENCEPIECE_KEYS}
    fixed["tokenizer_class"] = AUTHORITATIVE_CLASS
    fixed["clean_up_tokenization_spaces"] = False  # 5.x ignores True for BPE, 4.x would strip spaces before "."
    return fixed


def from_gguf_before_repair(tokenizer_json: Mapping[str, Any]) -> bool:
    """Whether a byte-level BPE ``tokenizer.json`` still has the decoder ``transformers``' GGUF loader builds
    (byte fallback, SentencePiece's space marker): a tokenizer imported from a GGUF without its pre-tokenizer."""
    if not is_byte_level_bpe(tokenizer_json):
        return False
    decoder = tokenizer_json.get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteFallback" for part in parts)


def portable_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The tokenizer files (name -> bytes) with ``tokenizer_config.json`` made portable (:func:`portable_config`);
    ``tokenizer.json`` and every other file unchanged."""
    out = dict(files)
    if "tokenizer.json" in files and "tokenizer_config.json" in files:
        tokenizer_json = json.loads(files["tokenizer.json"])
        config = json.loads(files["tokenizer_config.json"])
        fixed = portable_config(config, tokenizer_json)
        if fixed != config:
            out["tokenizer_config.json"] = (json.dumps(fixed, indent=2, ensure_ascii=False) + "\n").encode()
    return out


def special_token_ids(files: Mapping[str, bytes]) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the tokenizer files (those it declares), for a model
    ``config.json``: servers such as vLLM stop generating at the config's EOS."""
    if "tokenizer.json" not in files or "tokenizer_config.json" not in files:
        return {}
    tokenizer_json = json.loads(files["tokenizer.json"])
    config = json.loads(files["tokenizer_config.json"])
    ids = dict((tokenizer_json.get("model") or {}).get("vocab") or {})
    ids.update({token["content"]: token["id"] for token in tokenizer_json.get("added_tokens") or []})
    found = {}
    for role in ("bos", "eos", "pad"):
        token = config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, Mapping) else token
        if isinstance(token, str) and token in ids:
            found[f"{role}_token_id"] = int(ids[token])
    return found

"""An independent byte-level BPE tokenizer read straight from a GGUF file: the reference for imported tokenizers.

Uses only the `gguf` reader, `regex` and `jinja2`; neither `transformers` nor `tokenizers`. The GGUF's own
vocabulary (``tokenizer.ggml.tokens``), token types and ranked merges (``tokenizer.ggml.merges``) are applied the way
llama.cpp does for its pre-tokenizer name (``tokenizer.ggml.pre``): control tokens are matched first, the text is
split by llama.cpp's regular expressions for that name, each piece is mapped to GPT-2's byte alphabet and merged by
rank. The chat template is rendered with jinja2 as ``transformers`` compiles it (trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's llama-vocab.cpp: the regular expressions applied in turn for each tokenizer.ggml.pre it knows
PRE_REGEXES = {"smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "gpt-2": [_GPT2]}
_CONTROL = 3  # gguf token type


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


class GGUFByteLevelBPE:
    """``encode``/``decode``/``chat`` of the GGUF's byte-level BPE vocabulary."""

    def __init__(self, path: str | Path):
        import gguf
        import regex

        reader = gguf.GGUFReader(str(path))

        def field(key):
            return reader.fields[key].contents() if key in reader.fields else None

        if field("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"{path}: not a byte-level BPE vocabulary ({field('tokenizer.ggml.model')})")
        self.pre = field("tokenizer.ggml.pre")
        if self.pre not in PRE_REGEXES:
            raise ValueError(f"{path}: no reference rule for pre-tokenizer {self.pre!r}")
        self.tokens: list[str] = field("tokenizer.ggml.tokens")
        self.types: list[int] = field("tokenizer.ggml.token_type")
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.ranks = {tuple(merge.split(" ")): i for i, merge in enumerate(field("tokenizer.ggml.merges"))}
        self.control = [t for t, kind in zip(self.tokens, self.types) if kind == _CONTROL]
        self.template = field("tokenizer.chat_template")
        self.byte_chars = _bytes_to_unicode()
        self.char_bytes = {char: byte for byte, char in self.byte_chars.items()}
        longest_first = sorted(self.control, key=len, reverse=True)
        self._control_split = regex.compile("(" + "|".join(regex.escape(t) for t in longest_first) + ")")

    @lru_cache(maxsize=None)
    def _merge(self, word: str) -> tuple[str, ...]:
        parts = list(word)
        while len(parts) > 1:
            rank, i = min((self.ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment in self._control_split.split(text):
            if not segment:
                continue
            if segment in self.control:
                ids.append(self.ids[segment])
                continue
            for piece in pre_tokenize(segment, self.pre):
                ids.extend(self.ids[t] for t in self._merge("".join(self.byte_chars[b] for b in piece.encode())))
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        out = bytearray()
        for i in ids:
            if self.types[i] == _CONTROL:
                out += b"" if skip_special else self.tokens[i].encode()
            else:
                out += bytes(self.char_bytes[c] for c in self.tokens[i])
        return out.decode("utf-8", errors="replace")

    def chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        import jinja2

        environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return environment.from_string(self.template).render(messages=messages,
                                                              add_generation_prompt=add_generation_prompt)


def pre_tokenize(text: str, pre: str) -> list[str]:
    """The pieces llama.cpp's regular expressions for ``pre`` cut ``text`` into (before byte mapping and merges)."""
    import regex

    pieces = [text]
    for pattern in PRE_REGEXES[pre]:
        pieces = _split_by(pieces, regex.compile(pattern))
    return pieces


def _split_by(pieces: list[str], pattern) -> list[str]:
    out = []
    for piece in pieces:  # llama.cpp keeps the text between matches as pieces of their own
        position = 0
        for match in pattern.finditer(piece):
            if match.start() > position:
                out.append(piece[position:match.start()])
            out.append(match.group())
            position = match.end()
        if position < len(piece):
            out.append(piece[position:])
    return out

"""Translation: IWSLT 2017 German -> English, in the original release layout of ``de-en.tgz``.

* train: ``train.tags.de-en.de`` and ``train.tags.de-en.en``, aligned line by line; lines that start with ``<``
  (``<url>``, ``<talkid>``, ``<title>``, ...) carry talk metadata and are skipped in both files.
* validation: ``IWSLT17.TED.dev2010.de-en.{de,en}.xml``; test: ``IWSLT17.TED.tst2010.de-en.{de,en}.xml``, one
  ``<seg id="N">text</seg>`` per line inside ``<doc docid="...">`` (XML entities such as ``&amp;`` are decoded).
  Segments are paired by (doc id, seg id); both files must list the same segments.

``load(path, split)`` takes the folder or the German file of a split; the English file is its sibling. Metric:
corpus BLEU with sacrebleu's defaults (13a tokenization, exp smoothing); chrF comes as an extra.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape, unescape

import sacrebleu

from nemo_tiedlora.apps.study.tasks.base import Example, TaskAdapter, TaskError, atomic_write_bytes, first_line

__all__ = ["IwsltTask"]

_SEG = re.compile(r'<seg\s+id="\s*(\d+)\s*"\s*>(.*)</seg>')
_DOC = re.compile(r'<doc\s[^>]*docid="([^"]*)"')
_TALKID = re.compile(r"<talkid>\s*([^<]*?)\s*</talkid>")
_ENTITIES = {"&quot;": '"', "&apos;": "'"}


class IwsltTask(TaskAdapter):
    """IWSLT 2017 de-en as SFT: ``Translate German to English.\\nGerman: ...\\nEnglish:`` -> the English line."""

    name = "iwslt2017"
    dataset = "IWSLT 2017 de-en"
    metric_name = "BLEU"
    template = "Translate German to English.\nGerman: {source}\nEnglish:"
    split_files = {
        "train": "train.tags.de-en.de",
        "validation": "IWSLT17.TED.dev2010.de-en.de.xml",
        "test": "IWSLT17.TED.tst2010.de-en.de.xml",
    }
    record_format = (
        'IWSLT 2017 files: train.tags.de-en.{de,en} with one sentence (or one "<tag>" line) per line, aligned; '
        '*.de-en.{de,en}.xml with one <seg id="N">text</seg> per line inside <doc docid="...">'
    )

    def read(self, file: Path) -> list[Example]:
        """The sentence pairs of a German file and its English sibling (``.de`` -> ``.en``)."""
        target = _english_sibling(file)
        if not target.is_file():
            raise TaskError(f"{target}: no such file; expected the English side of {file} next to it")
        if file.name.endswith(".xml"):
            return self._read_xml(file, target)
        return self._read_tags(file, target)

    def _read_tags(self, source: Path, target: Path) -> list[Example]:
        german, english = _lines(source), _lines(target)
        if len(german) != len(english):
            raise TaskError(
                f"{source} has {len(german)} lines and {target} {len(english)}; expected the same number (the "
                "two sides of train.tags are aligned line by line)"
            )
        examples, talk = [], ""
        for number, (de, en) in enumerate(zip(german, english), start=1):
            de, en = de.strip(), en.strip()
            if de.startswith("<") and en.startswith("<"):
                match = _TALKID.search(de)
                talk = match.group(1) if match else talk
                continue
            if not de and not en:
                continue
            if de.startswith("<") or en.startswith("<") or not de or not en:
                raise self.error(
                    f"{source} / {target} line {number}",
                    f"German {de!r:.60} and English {en!r:.60} do not align (a tag or blank line on one side only)",
                )
            examples.append(
                Example(id=f"line {number}", fields={"source": de}, target=en, references=(en,), group=talk)
            )
        return examples

    def _read_xml(self, source: Path, target: Path) -> list[Example]:
        german, english = self._segments(source), self._segments(target)
        if list(german) != list(english):
            missing = sorted(set(german) ^ set(english))
            raise self.error(
                f"{source} / {target}",
                f"the files list different segments ({len(german)} vs {len(english)}; first differing (doc, seg): "
                f"{missing[0] if missing else 'order'})",
            )
        return [
            Example(id=f"{doc}:{seg}", fields={"source": de}, target=en, references=(en,), group=doc)
            for (doc, seg), de in german.items()
            for en in (english[doc, seg],)
        ]

    def _segments(self, file: Path) -> dict[tuple[str, str], str]:
        """(doc id, seg id) -> decoded text of every ``<seg>`` line, in file order."""
        segments: dict[tuple[str, str], str] = {}
        doc = ""
        for number, line in enumerate(_lines(file), start=1):
            if match := _DOC.search(line):
                doc = match.group(1)
            elif match := _SEG.search(line):
                key = (doc, match.group(1))
                if key in segments:
                    raise self.error(f"{file} line {number}", f"segment id {key[1]} repeats in doc {doc!r}")
                segments[key] = unescape(match.group(2).strip(), _ENTITIES)
            elif "<seg" in line:
                raise self.error(f"{file} line {number}", f"malformed segment {line.strip()!r:.80}")
        if not segments:
            raise self.error(str(file), "no <seg> line found")
        return segments

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """``metric``/``bleu`` (sacrebleu corpus BLEU, 0-100) and ``chrf``; one reference per sentence.

        A prediction is cut to its first non-blank line (one sentence is translated per prompt).
        """
        self.check_lengths(predictions, examples)
        hypotheses = [first_line(prediction) for prediction in predictions]
        references = [[example.references[0] for example in examples]]
        bleu = sacrebleu.corpus_bleu(hypotheses, references).score if examples else 0.0
        chrf = sacrebleu.corpus_chrf(hypotheses, references).score if examples else 0.0
        return {"metric": bleu, "bleu": bleu, "chrf": chrf, "count": float(len(examples))}

    def write_sample(self, out_dir: Path, *, seed: int = 0) -> Path:
        """12 train pairs (two talks, with tag lines) and 4 dev2010 / 4 tst2010 segments, from a small lexicon."""
        rng = random.Random(seed)
        talks = [[_sentence(rng) for _ in range(6)] for _ in range(2)]
        for index, lang in enumerate(("de", "en")):
            lines = []
            for talk_id, pairs in enumerate(talks, start=1):
                lines += [f"<url>http://example.invalid/talks/{talk_id}</url>", "<keywords>generated</keywords>"]
                lines += [f"<talkid>{talk_id}</talkid>", f"<title>Generated talk {talk_id}</title>"]
                lines += [pair[index] for pair in pairs]
            _write_lines(out_dir / f"train.tags.de-en.{lang}", lines)
        for split, setid in (("validation", "dev2010"), ("test", "tst2010")):
            pairs = [_sentence(rng) for _ in range(3)] + [_sentence(rng, pair=True)]
            german = out_dir / self.split_files[split]
            _write_lines(german, _xml(pairs, setid=setid, lang="de"))
            _write_lines(_english_sibling(german), _xml(pairs, setid=setid, lang="en"))
        return out_dir


def _english_sibling(file: Path) -> Path:
    """``x.de-en.de`` -> ``x.de-en.en``, ``x.de-en.de.xml`` -> ``x.de-en.en.xml``."""
    name = file.name
    if name.endswith(".de.xml"):
        return file.with_name(name[: -len(".de.xml")] + ".en.xml")
    if name.endswith(".de"):
        return file.with_name(name[: -len(".de")] + ".en")
    raise TaskError(f"{file}: not a German IWSLT file; expected a name ending in .de or .de.xml")


def _lines(file: Path) -> list[str]:
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise TaskError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    atomic_write_bytes(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))


# (English, German) plural phrases that combine into grammatical sentences: "The {adj} {noun} {verb} {place}."
_ADJECTIVES = (
    ("small", "kleinen"),
    ("old", "alten"),
    ("happy", "glücklichen"),
    ("tired", "müden"),
    ("young", "jungen"),
)
_NOUNS = (("dogs", "Hunde"), ("cats", "Katzen"), ("children", "Kinder"), ("birds", "Vögel"), ("farmers", "Bauern"))
_VERBS = (("sleep", "schlafen"), ("sing", "singen"), ("play", "spielen"), ("wait", "warten"), ("laugh", "lachen"))
_PLACES = (("in the garden", "im Garten"), ("in the house", "im Haus"), ("at the station", "am Bahnhof"))


def _sentence(rng: random.Random, *, pair: bool = False) -> tuple[str, str]:
    """A generated (German, English) sentence pair; ``pair`` joins two nouns with ``&``."""
    (adj_en, adj_de), (verb_en, verb_de), (place_en, place_de) = (
        rng.choice(_ADJECTIVES),
        rng.choice(_VERBS),
        rng.choice(_PLACES),
    )
    (noun_en, noun_de), (other_en, other_de) = rng.sample(_NOUNS, 2)
    if pair:
        noun_en, noun_de = f"{noun_en} & {other_en}", f"{noun_de} & {other_de}"
    return f"Die {adj_de} {noun_de} {verb_de} {place_de}.", f"The {adj_en} {noun_en} {verb_en} {place_en}."


def _xml(pairs: Sequence[tuple[str, str]], *, setid: str, lang: str) -> list[str]:
    """The lines of one IWSLT evaluation XML file (one talk) for the German or English side of ``pairs``."""
    index = 0 if lang == "de" else 1
    opening = (
        f'<srcset setid="iwslt2017-{setid}" srclang="german">'
        if lang == "de"
        else f'<refset setid="iwslt2017-{setid}" srclang="german" trglang="english" refid="ref">'
    )
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", opening, '<doc docid="900" genre="lectures">']
    lines += ["<url>http://example.invalid/talks/900</url>", "<talkid>900</talkid>", "<title>Generated talk</title>"]
    lines += [f'<seg id="{n}"> {escape(pair[index])} </seg>' for n, pair in enumerate(pairs, start=1)]
    lines += ["</doc>", "</srcset>" if lang == "de" else "</refset>", "</mteval>"]
    return lines

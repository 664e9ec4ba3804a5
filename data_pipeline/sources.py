"""Sources → shards → documents, each document with a position to resume from and bad records flagged.

A **shard** is the unit that streams are given. Line-oriented files (JSONL, TXT read by line) are split into byte
ranges (a range owns the lines that *start* inside it), so a single large file still spreads over many streams; a
Parquet file is split by row groups; a JSON array file, a TXT file read whole, and each shard of an HF streaming
dataset are one shard each. The split depends only on the files and ``min_shards`` — never on the world size — so the
set of packed blocks is the same whatever the number of ranks and workers.

Reading a shard yields :class:`Document` records in order. ``position`` is where reading must restart to read that
document again (a byte offset, a row or an example index): resuming costs a seek, not a replay. Bad records — invalid
JSON, a missing or non-string text field, invalid UTF-8, an empty document — come through with ``bad`` set to the
reason, so that the packer can count them exactly as it passes them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataSpecError
from .spec import SourceSpec, TextDataSpec

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".txt": "txt", ".parquet": "parquet"}
# Compressed files are not read (a byte range of one cannot be decoded on its own): their suffixes and first bytes.
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
MIN_RANGE_BYTES = 4096  # a byte range smaller than this is not worth a shard of its own

BAD_REASONS = ("invalid_json", "missing_text_field", "non_string_text", "invalid_utf8", "empty_document")


@dataclass(frozen=True)
class Shard:
    source_index: int
    key: str  # stable identifier, used in cursors
    reader: str  # "lines" | "json_array" | "txt_file" | "parquet" | "hf"
    path: str | None = None
    start: int = 0  # byte range (lines) or row-group range (parquet)
    end: int = 0
    text_field: str = "text"
    jsonl: bool = True  # lines reader: JSON objects (True) or raw text lines
    hf_index: int = 0
    hf_count: int = 1


@dataclass(frozen=True)
class Document:
    position: int  # restart here to read this document again
    text: str | None
    bad: str | None = None  # one of BAD_REASONS
    line: int | None = None  # 1-based line number in the file, when the reader knows it cheaply
    path: str | None = None


# ---------------------------------------------------------------------------------------------------- discovery


def _expand_paths(source: SourceSpec, where: str) -> list[Path]:
    pattern = os.path.expanduser(source.path)
    if os.path.isdir(pattern):
        files = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and p.suffix in SUFFIX_FORMATS)
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    elif os.path.isfile(pattern):
        files = [Path(pattern)]
    else:
        raise DataSpecError(f"{where}.path: {source.path!r} does not exist")
    if not files:
        raise DataSpecError(f"{where}.path: no files match {source.path!r}")
    return files


def _refuse_compressed(path: Path, where: str, fmt: str | None) -> None:
    """One-line error for a compressed file, by its first bytes (whatever ``format`` says) or, when the format is
    inferred, by its suffix: its text would otherwise be read as a stream of bad records."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    kind = next((name for magic, name in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)
    if kind is not None:
        raise DataSpecError(f"{where}.path: {path} is {kind}-compressed; compressed files are not read, decompress it")
    if fmt is None and path.suffix.lower() in COMPRESSED_SUFFIXES:
        raise DataSpecError(
            f"{where}.path: {path} ends in {path.suffix}; compressed files are not read, decompress it (or set "
            f"{where}.format if it is plain text)"
        )


def _file_format(source: SourceSpec, path: Path, where: str) -> str:
    if source.format != "parquet":
        _refuse_compressed(path, where, source.format)
    if source.format:
        return source.format
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataSpecError(
            f"{where}.format: cannot infer the format of {path} (suffix {path.suffix!r}); "
            f"set format to one of {sorted(set(SUFFIX_FORMATS.values()))}"
        )
    return fmt


def _byte_ranges(size: int, pieces: int) -> list[tuple[int, int]]:
    pieces = max(1, min(pieces, size // MIN_RANGE_BYTES or 1))
    bounds = [round(i * size / pieces) for i in range(pieces + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(pieces)]


def discover_shards(spec: TextDataSpec, source_index: int) -> list[Shard]:
    """The shards of one source, in a deterministic order. Raises a one-line error for a missing or empty source."""
    source = spec.sources[source_index]
    where = f"data.sources[{source_index}]"
    if source.kind == "builtin":
        from .builtin import ensure_prepared

        directory = ensure_prepared(source.builtin) / source.split
        if not directory.is_dir():
            raise DataSpecError(f"{where}.split: built-in source {source.builtin!r} has no split {source.split!r}")
        source = SourceSpec(path=str(directory), text_field="text", weight=source.weight, format="jsonl")
    if source.kind == "hf":
        return _hf_shards(source, source_index, where)

    files = _expand_paths(source, where)
    line_files, shards = [], []
    for path in files:
        fmt = _file_format(source, path, where)
        if fmt == "jsonl" or (fmt == "txt" and source.txt_unit == "line"):
            line_files.append((path, fmt))
        elif fmt == "txt":
            shards.append(Shard(source_index, f"{path}", "txt_file", str(path)))
        elif fmt == "json":
            shards.append(Shard(source_index, f"{path}", "json_array", str(path), text_field=source.text_field))
        else:
            shards.extend(_parquet_shards(source, source_index, path))
    total = sum(path.stat().st_size for path, _ in line_files)
    for path, fmt in line_files:
        size = path.stat().st_size
        pieces = math.ceil(spec.min_shards * size / total) if total else 1
        for start, end in _byte_ranges(size, pieces):
            shards.append(
                Shard(
                    source_index,
                    f"{path}#{start}-{end}",
                    "lines",
                    str(path),
                    start,
                    end,
                    source.text_field,
                    jsonl=fmt == "jsonl",
                )
            )
    if not shards:
        raise DataSpecError(f"{where}: the source {source.label!r} holds no data")
    return shards


def _parquet_shards(source: SourceSpec, source_index: int, path: Path) -> list[Shard]:
    import pyarrow.parquet as pq

    groups = pq.ParquetFile(path).metadata.num_row_groups
    return [
        Shard(source_index, f"{path}@rg{g}", "parquet", str(path), g, g + 1, source.text_field) for g in range(groups)
    ]


def _open_hf(source: SourceSpec):
    import datasets

    return datasets.load_dataset(
        source.hf,
        source.config,
        split=source.split,
        streaming=True,
        data_dir=source.data_dir,
        data_files=source.data_files,
    )


def _hf_shards(source: SourceSpec, source_index: int, where: str) -> list[Shard]:
    try:
        dataset = _open_hf(source)
    except Exception as error:  # datasets raises many types; the user needs the name and the reason
        raise DataSpecError(f"{where}.hf: cannot open {source.label!r}: {str(error).splitlines()[0]}") from None
    count = dataset.num_shards
    return [
        Shard(
            source_index,
            f"hf:{source.label}#{i}/{count}",
            "hf",
            None,
            text_field=source.text_field,
            hf_index=i,
            hf_count=count,
        )
        for i in range(count)
    ]


def fingerprint(spec: TextDataSpec, shards: list[list[Shard]]) -> str:
    """A digest of what the stream reads: shard layout and file identity (size + head and tail bytes)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([s.label for s in spec.sources]).encode())
    for source_shards in shards:
        for shard in source_shards:
            digest.update(shard.key.encode())
        for path in sorted({s.path for s in source_shards if s.path}):
            size = os.path.getsize(path)
            digest.update(f"{path}:{size}".encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(65536))
                handle.seek(max(0, size - 65536))
                digest.update(handle.read(65536))
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- reading


def read_shard(shard: Shard, position: int | None = None, source: SourceSpec | None = None) -> Iterator[Document]:
    """Documents of ``shard`` from ``position`` (``None``: its start)."""
    if shard.reader == "lines":
        yield from _read_lines(shard, position)
    elif shard.reader == "txt_file":
        yield from _read_txt_file(shard, position)
    elif shard.reader == "json_array":
        yield from _read_json_array(shard, position)
    elif shard.reader == "parquet":
        yield from _read_parquet(shard, position)
    elif shard.reader == "hf":
        yield from _read_hf(shard, position, source)
    else:
        raise ValueError(f"unknown shard reader {shard.reader!r}")


def _text_of(record, text_field: str) -> tuple[str | None, str | None]:
    """(text, bad reason) of a decoded record."""
    if not isinstance(record, dict) or text_field not in record:
        return None, "missing_text_field"
    text = record[text_field]
    if not isinstance(text, str):
        return None, "non_string_text"
    if not text.strip():
        return None, "empty_document"
    return text, None


def _read_lines(shard: Shard, position: int | None) -> Iterator[Document]:
    with open(shard.path, "rb") as handle:
        if position is None:
            position = shard.start
            if position > 0:  # the range owns the lines that start inside it: skip the one we landed in
                handle.seek(position - 1)
                if handle.read(1) != b"\n":
                    position += len(handle.readline())
        handle.seek(position)
        while position < shard.end:
            raw = handle.readline()
            if not raw:
                break
            start, position = position, position + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Document(start, None, "invalid_utf8", path=shard.path)
                continue
            if not shard.jsonl:
                if line.strip():
                    yield Document(start, line.rstrip("\n"))
                continue
            if not line.strip():
                continue  # blank lines between records are not records
            try:
                record = json.loads(line)
            except ValueError:
                yield Document(start, None, "invalid_json", path=shard.path)
                continue
            text, bad = _text_of(record, shard.text_field)
            yield Document(start, text, bad, path=shard.path if bad else None)


def _read_txt_file(shard: Shard, position: int | None) -> Iterator[Document]:
    if position:  # 1 = the file's single document was read
        return
    raw = Path(shard.path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        yield Document(0, None, "invalid_utf8", line=1, path=shard.path)
        return
    yield Document(0, text if text.strip() else None, None if text.strip() else "empty_document", path=shard.path)


def _read_json_array(shard: Shard, position: int | None) -> Iterator[Document]:
    try:
        records = json.loads(Path(shard.path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise DataSpecError(
            f"{shard.path}: not a JSON array file ({error}); use .jsonl for one record per line"
        ) from None
    if not isinstance(records, list):
        raise DataSpecError(f"{shard.path}: a .json source must hold a JSON array of records")
    for index in range(position or 0, len(records)):
        text, bad = _text_of(records[index], shard.text_field)
        yield Document(index, text, bad, line=None, path=shard.path if bad else None)


def _read_parquet(shard: Shard, position: int | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(shard.path)
    if shard.text_field not in parquet.schema_arrow.names:
        raise DataSpecError(f"{shard.path}: no column {shard.text_field!r} (columns: {parquet.schema_arrow.names})")
    row = 0
    skip = position or 0
    for batch in parquet.iter_batches(row_groups=list(range(shard.start, shard.end)), columns=[shard.text_field]):
        values = batch.column(0).to_pylist()
        if row + len(values) <= skip:
            row += len(values)
            continue
        for offset, value in enumerate(values):
            if row + offset < skip:
                continue
            text, bad = _text_of({shard.text_field: value} if value is not None else {}, shard.text_field)
            yield Document(row + offset, text, bad, path=shard.path if bad else None)
        row += len(values)


def _read_hf(shard: Shard, position: int | None, source: SourceSpec | None) -> Iterator[Document]:
    if source is None:
        raise ValueError("reading an HF shard needs its SourceSpec")
    dataset = _open_hf(source).shard(num_shards=shard.hf_count, index=shard.hf_index)
    start = position or 0
    if start:
        dataset = dataset.skip(start)  # O(examples in this shard), never O(steps trained)
    for index, record in enumerate(dataset, start=start):
        text, bad = _text_of(record, shard.text_field)
        yield Document(index, text, bad, path=source.label if bad else None)


def line_number(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte ``offset`` (only called for the first few bad records)."""
    count, remaining = 1, offset
    with open(path, "rb") as handle:
        while remaining > 0:
            chunk = handle.read(min(remaining, 1 << 22))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count

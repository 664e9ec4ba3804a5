"""Image sources → shards → raw records: what each kind of image source holds and how to
read it (a [`Catalog`] per source; the spec is in ``image_spec``, Fashion-MNIST's files in ``fashion_mnist``).

Shards (the unit given to a logical stream; never dependent on the world size):

``builtin: fashion-mnist``
    ``max(16, min_shards)`` (train) or ``max(4, min_shards)`` (test) contiguous index ranges of the 60,000 / 10,000
    images, memory-mapped (data_pipeline.fashion_mnist).
``folder``
    Class directories (sorted names → label ids 0..K-1; hidden ones ignored) are walked recursively for image files
    (suffixes in :data:`IMAGE_SUFFIXES`, any case); the list sorted by (class, relative path) is cut into
    ``min(min_shards, images)`` contiguous index ranges. A shard's key holds a digest of its file names, so an added,
    removed or renamed file changes the fingerprint (an image rewritten in place does not).
``tar``
    One shard per tar file (a glob, a single file or a directory of ``*.tar``). Members are grouped into samples by
    key (the member path up to the first dot of its base name, consecutive members), as webdataset does. A
    position is the byte offset of a sample's first member header, so a resume seeks straight to it.
``hf``
    The dataset's native shards (its files); when there are fewer than ``min_shards``, each native shard is read as
    ``ceil(min_shards / native)`` interleaved parts (example ``i`` belongs to part ``i % parts``) — a part skips the
    others' examples without decoding them, but still reads them (prefer datasets with many files). A position is an
    example index in the native shard (resuming there costs a ``skip``, O(examples in the shard), as for text).

Random-access sources (builtin, folder) are read in a per-(seed, source, shard, epoch) permutation inside each shard
(a class-sorted folder would otherwise stream one class at a time); tar and HF shards are read in file order.

Bad records — :data:`BAD_REASONS` — come through with ``bad`` set, so the stream counts them as it passes them.
Label problems are found when the record is read; an undecodable image when it is decoded (after the shuffle buffer,
and also when read until one image of the source has decoded in the stream: ``image_stream.ImageStream._read``).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataSpecError
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_SHARDS, fashion_mnist_paths, memmap_npy
from .image_spec import ImageDataSpec, ImageSourceSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LABEL_SUFFIX = "cls"
BAD_REASONS = (
    "undecodable_image",
    "missing_image",
    "missing_label",
    "invalid_label",
    "label_out_of_range",
    "corrupt_tar",
)


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ImageShard:
    source_index: int
    number: int  # index among its source's shards (used in cursors and buffer references)
    key: str  # stable identifier (fingerprinted)
    reader: str  # "idx" | "folder" | "tar" | "hf"
    path: str | None = None  # a file whose identity is fingerprinted: idx images .npy, tar file
    start: int = 0  # item index range (idx, folder)
    end: int = 0
    hf_index: int = 0  # native HF shard
    hf_count: int = 1
    part: int = 0  # interleaved part of a native HF shard
    parts: int = 1

    @property
    def random_access(self) -> bool:
        return self.reader in ("idx", "folder")

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class RawRecord:
    """One sample as read, not decoded. ``locator`` re-reads it (:meth:`Catalog.fetch`); ``next_position`` is where
    the shard's reading resumes after it. ``payload``: a uint8 array, encoded bytes, a file path or a PIL image."""

    locator: int
    next_position: int
    payload: Any
    label: int | None
    bad: str | None = None
    where: str = ""  # the file a bad record is counted under
    location: str = ""  # where inside it


def check_label(value: Any, num_classes: int | None) -> tuple[int | None, str | None]:
    """(label, bad reason) of a raw label value."""
    if value is None:
        return None, "missing_label"
    if isinstance(value, (bytes, str)):
        try:
            value = int(value.strip())
        except ValueError:
            return None, "invalid_label"
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None, "invalid_label"
    value = int(value)
    if value < 0 or (num_classes is not None and value >= num_classes):
        return None, "label_out_of_range"
    return value, None


class Catalog:
    """What a source holds and how to read it: its shards, their records, and single records by locator."""

    kind = ""
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None

    def shards(self, source_index: int, min_shards: int) -> list[ImageShard]:
        raise NotImplementedError

    def read(
        self, shard: ImageShard, position: int | None, order: np.ndarray | None, num_classes: int | None
    ) -> Iterator[RawRecord]:
        """Records of ``shard`` from ``position``; random-access shards are read in ``order`` (a permutation)."""
        for offset in range(position or 0, shard.size):
            yield self.record(shard.start + int(order[offset]), offset + 1, num_classes)

    def fetch(self, shard: ImageShard, locators: list[int], num_classes: int | None) -> dict[int, RawRecord]:
        """Re-read the records at ``locators`` of ``shard`` (the shuffle buffer on resume)."""
        return {locator: self.record(locator, 0, num_classes) for locator in locators}

    def record(self, index: int, next_position: int, num_classes: int | None) -> RawRecord:
        raise NotImplementedError


def _ranges(count: int, pieces: int) -> list[tuple[int, int]]:
    pieces = max(1, min(pieces, count))
    bounds = [round(i * count / pieces) for i in range(pieces + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(pieces)]


class FashionMnistCatalog(Catalog):
    kind = "idx"
    num_classes = len(FASHION_MNIST_CLASSES)
    class_names = FASHION_MNIST_CLASSES

    def __init__(self, split: str):
        self.split = split
        images, labels = fashion_mnist_paths(split)
        self.images_path, self.labels_path = str(images), str(labels)

    def shards(self, source_index: int, min_shards: int) -> list[ImageShard]:
        count = len(memmap_npy(self.labels_path))
        return [
            ImageShard(
                source_index, n, f"fashion-mnist/{self.split}#{start}-{end}", "idx", self.images_path, start, end
            )
            for n, (start, end) in enumerate(_ranges(count, max(FASHION_MNIST_SHARDS[self.split], min_shards)))
        ]

    def record(self, index: int, next_position: int, num_classes: int | None) -> RawRecord:
        label, bad = check_label(int(memmap_npy(self.labels_path)[index]), num_classes)
        return RawRecord(
            index,
            next_position,
            np.array(memmap_npy(self.images_path)[index]),
            label,
            bad,
            self.images_path,
            f"record {index}",
        )


class FolderCatalog(Catalog):
    kind = "folder"

    def __init__(self, root: str, where: str):
        self.root = os.path.expanduser(root)
        if not os.path.isdir(self.root):
            raise DataSpecError(f"{where}.folder: {root!r} is not a directory")
        classes = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")
        )
        if not classes:
            raise DataSpecError(f"{where}.folder: {root!r} has no class subdirectories (expected DIR/CLASS/image)")
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = []
            for directory, subdirs, files in os.walk(os.path.join(self.root, name), followlinks=True):
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                rel = os.path.relpath(directory, self.root)
                found.extend(
                    os.path.join(rel, f)
                    for f in files
                    if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
                )
            found.sort()
            paths.extend(found)
            labels.extend([label] * len(found))
        if not paths:
            raise DataSpecError(f"{where}.folder: no image files ({', '.join(IMAGE_SUFFIXES)}) under {root!r}")
        self.paths, self.labels = tuple(paths), np.asarray(labels, dtype=np.int64)
        self.class_names, self.num_classes = tuple(classes), len(classes)

    def shards(self, source_index: int, min_shards: int) -> list[ImageShard]:
        shards = []
        for n, (start, end) in enumerate(_ranges(len(self.paths), min_shards)):
            digest = hashlib.sha256("\n".join(self.paths[start:end]).encode()).hexdigest()[:12]
            shards.append(
                ImageShard(source_index, n, f"folder:{self.root}#{start}-{end}@{digest}", "folder", None, start, end)
            )
        return shards

    def record(self, index: int, next_position: int, num_classes: int | None) -> RawRecord:
        label, bad = check_label(int(self.labels[index]), num_classes)
        rel = self.paths[index]
        return RawRecord(
            index,
            next_position,
            os.path.join(self.root, rel),
            label,
            bad,
            os.path.join(self.root, rel.split(os.sep, 1)[0]),
            rel,
        )


class TarCatalog(Catalog):
    kind = "tar"

    def __init__(self, pattern: str, where: str):
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            files = sorted(str(p) for p in Path(expanded).rglob("*.tar"))
        elif any(ch in expanded for ch in "*?["):
            files = sorted(p for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(expanded):
            files = [expanded]
        else:
            raise DataSpecError(f"{where}.tar: {pattern!r} does not exist")
        if not files:
            raise DataSpecError(f"{where}.tar: no files match {pattern!r}")
        self.files = files

    def shards(self, source_index: int, min_shards: int) -> list[ImageShard]:
        return [ImageShard(source_index, n, f"tar:{path}", "tar", path) for n, path in enumerate(self.files)]

    def read(self, shard, position, order, num_classes):
        yield from _read_tar(shard.path, position or 0, num_classes)

    def fetch(self, shard, locators, num_classes):
        return {locator: next(_read_tar(shard.path, locator, num_classes)) for locator in locators}


def _tar_key(name: str) -> tuple[str, str]:
    """webdataset's split of a member path: key = path up to the first dot of the base name; suffix = the rest."""
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix.lower()


def _read_tar(path: str, position: int, num_classes: int | None) -> Iterator[RawRecord]:
    """Samples of a tar file from the byte offset ``position`` (a member header): consecutive members that share a
    key form a sample; its image is the first member with an image suffix, its label the ``.cls`` member."""
    size = os.path.getsize(path)
    if position >= size:
        return
    image_suffixes = {suffix[1:] for suffix in IMAGE_SUFFIXES}

    def sample(key: str, offset: int, members: dict[str, bytes], next_position: int) -> RawRecord:
        location = f"sample {key!r} at byte {offset}"
        image = next((members[s] for s in members if s in image_suffixes), None)
        if LABEL_SUFFIX not in members:
            label, bad = None, "missing_label"
        else:
            label, bad = check_label(members[LABEL_SUFFIX].decode("utf-8", "replace"), num_classes)
        if image is None and bad is None:
            bad = "missing_image"
        return RawRecord(offset, next_position, image, label, bad, path, location)

    with open(path, "rb") as handle:
        handle.seek(position)
        key, offset, members, damage = None, position, {}, None
        try:
            archive = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115  (read member by member below)
            while True:
                member = archive.next()
                if member is None:
                    # tarfile ends quietly at a damaged or truncated header: only zero blocks may follow the data
                    handle.seek(archive.offset)
                    if archive.offset < size and handle.read(512).strip(b"\0"):
                        damage = f"byte {archive.offset}: damaged or truncated member header"
                    break
                if not member.isfile():
                    continue
                member_key, suffix = _tar_key(member.name)
                if key is not None and member_key != key:
                    yield sample(key, offset, members, member.offset)
                    members = {}
                if member_key != key:
                    key, offset = member_key, member.offset
                if suffix in image_suffixes or suffix == LABEL_SUFFIX:
                    data = archive.extractfile(member).read()
                    if len(data) != member.size:
                        damage = f"byte {member.offset}: {member.name} truncated ({len(data)} of {member.size} bytes)"
                        break
                    members.setdefault(suffix, data)
        except (tarfile.TarError, EOFError, OSError) as error:
            damage = f"byte {offset}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        if damage is not None:  # the sample being read is lost with the rest of the file: one bad record
            yield RawRecord(offset, size, None, None, "corrupt_tar", path, damage)
        elif key is not None:
            yield sample(key, offset, members, size)


_HF_DATASETS: dict[tuple, Any] = {}


def _open_hf_images(source: ImageSourceSpec):
    """The streaming dataset of an HF source (image column left undecoded), opened once per process."""
    key = (source.hf, source.config, source.split, source.data_dir, source.data_files, source.image_field)
    if key not in _HF_DATASETS:
        import datasets

        dataset = datasets.load_dataset(
            source.hf,
            source.config,
            split=source.split,
            streaming=True,
            data_dir=source.data_dir,
            data_files=source.data_files,
        )
        features = dataset.features or {}
        if isinstance(features.get(source.image_field), datasets.Image):
            dataset = dataset.cast_column(source.image_field, datasets.Image(decode=False))
        _HF_DATASETS[key] = dataset
    return _HF_DATASETS[key]


class HfCatalog(Catalog):
    kind = "hf"

    def __init__(self, source: ImageSourceSpec, where: str):
        self.source = source
        try:
            dataset = _open_hf_images(source)
        except Exception as error:  # datasets raises many types; the user needs the name and the reason
            raise DataSpecError(f"{where}.hf: cannot open {source.label!r}: {str(error).splitlines()[0]}") from None
        features = dataset.features or {}
        if features and source.image_field not in features:
            raise DataSpecError(
                f"{where}.image_field: {source.image_field!r} is not a column of {source.label!r} "
                f"(columns: {sorted(features)})"
            )
        label_feature = features.get(source.label_field)
        if features and label_feature is None:
            raise DataSpecError(
                f"{where}.label_field: {source.label_field!r} is not a column of {source.label!r} "
                f"(columns: {sorted(features)})"
            )
        names = getattr(label_feature, "names", None)
        if names:
            self.class_names, self.num_classes = tuple(names), len(names)
        self.native = dataset.num_shards

    def shards(self, source_index: int, min_shards: int) -> list[ImageShard]:
        parts = max(1, math.ceil(min_shards / self.native))
        return [
            ImageShard(
                source_index,
                i * parts + part,
                f"hf:{self.source.label}#{i}/{self.native}%{part}/{parts}",
                "hf",
                None,
                hf_index=i,
                hf_count=self.native,
                part=part,
                parts=parts,
            )
            for i in range(self.native)
            for part in range(parts)
        ]

    def _examples(self, shard: ImageShard, start: int) -> Iterator[tuple[int, dict]]:
        dataset = _open_hf_images(self.source)
        if shard.hf_count > 1:
            dataset = dataset.shard(num_shards=shard.hf_count, index=shard.hf_index)
        if start:
            dataset = dataset.skip(start)  # O(examples in this shard), never O(steps trained)
        for index, example in enumerate(dataset, start=start):
            if index % shard.parts == shard.part:
                yield index, example

    def _record(self, shard: ImageShard, index: int, example: dict, num_classes: int | None) -> RawRecord:
        location = f"example {index} of shard {shard.hf_index}"
        image = example.get(self.source.image_field)
        if isinstance(image, dict):  # an undecoded datasets.Image: {"bytes", "path"}
            image = image.get("bytes") or image.get("path")
        label, bad = check_label(example.get(self.source.label_field), num_classes)
        if image is None and bad is None:
            bad = "missing_image"
        return RawRecord(index, index + 1, image, label, bad, self.source.label, location)

    def read(self, shard, position, order, num_classes):
        for index, example in self._examples(shard, position or 0):
            yield self._record(shard, index, example, num_classes)

    def fetch(self, shard, locators, num_classes):
        wanted, found = set(locators), {}
        for index, example in self._examples(shard, min(locators)):
            if index in wanted:
                found[index] = self._record(shard, index, example, num_classes)
                if len(found) == len(wanted):
                    break
        return found


def open_catalog(spec: ImageDataSpec, source_index: int) -> Catalog:
    """The catalog of one source; raises one-line errors for a missing or empty source."""
    source = spec.sources[source_index]
    where = f"data.sources[{source_index}]"
    if source.kind == "builtin":
        try:
            return FashionMnistCatalog(source.split)
        except RuntimeError as error:
            raise DataSpecError(f"{where}.builtin: {error}") from None
    if source.kind == "folder":
        return FolderCatalog(source.folder, where)
    if source.kind == "tar":
        return TarCatalog(source.tar, where)
    return HfCatalog(source, where)

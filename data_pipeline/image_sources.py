"""Image data: the ``data`` section for images, sources → shards → raw records, and the built-in Fashion-MNIST.

```yaml
data:
  image_size: 224             # output side (square)
  split: train                # default split of the built-in and HF sources ("train" | "test")
  train: true                 # augment (random-resized-crop + flip) or the eval transform; default: split == train
  channels: 3                 # 1 or 3, images converted; default 1 when every source is fashion-mnist, else 3
  mean: [0.485, 0.456, 0.406] # per channel; default Fashion-MNIST 0.2860 (1 channel) or ImageNet's (3 channels)
  std: [0.229, 0.224, 0.225]  # default Fashion-MNIST 0.3530 (1 channel) or ImageNet's (3 channels)
  crop_scale: [0.08, 1.0]     # random-resized-crop area fraction
  crop_ratio: [0.75, 1.3333]  # random-resized-crop aspect ratio range
  hflip: true                 # horizontal flip with p 0.5 (train only)
  eval_crop_fraction: 0.875   # eval: shorter side -> round(image_size / this), then a center crop (see image_stream)
  num_classes: 1000           # labels outside [0, num_classes) are bad records; default from the sources
  seed: 0
  streams_per_rank: 2
  shuffle_buffer: 1024        # samples; the cursor keeps references to them, not pixels (see image_stream)
  max_bad_fraction: 0.01
  min_shards: 16              # folder / HF sources are cut into this many shards (see below)
  sources:
    - builtin: fashion-mnist  # Debian dataset-fashion-mnist, decoded once into the cache
    - folder: /data/imagenet/train   # class-per-folder: DIR/CLASS/**/*.jpg, classes sorted -> label ids
      weight: 2
    - tar: /data/shards/train-*.tar  # webdataset-style: members KEY.{png,jpg,jpeg,...} + KEY.cls (an int)
    - hf: imagefolder                # any `datasets` image dataset, streaming=True
      data_dir: /data/pets
      image_field: image
      label_field: label
```

Every error is one line that names the field (``data.sources[1].weight: must be > 0``).

Shards (the unit given to a logical stream; never dependent on the world size):

``builtin: fashion-mnist``
    ``max(16, min_shards)`` (train) or ``max(4, min_shards)`` (test) contiguous index ranges of the 60,000 / 10,000
    images. The IDX files are parsed once and cached as ``.npy`` in ``cache_dir()/datasets/fashion-mnist/``;
    reads memory-map them (O(1) random access).
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
Label problems are found when the record is read; an undecodable image when it is decoded (after the shuffle buffer).
"""

from __future__ import annotations

import functools
import glob as globlib
import gzip
import hashlib
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptFileError, DataSpecError
from .spec import _check_type, normalized_weights

BUILTIN_IMAGE_SOURCES: tuple[str, ...] = ("fashion-mnist",)
SPLITS: tuple[str, ...] = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LABEL_SUFFIX = "cls"
BAD_REASONS = ("undecodable_image", "missing_image", "missing_label", "invalid_label", "label_out_of_range",
               "corrupt_tar")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_SHARDS = {"train": 16, "test": 4}
FASHION_MNIST_COUNTS = {"train": 60_000, "test": 10_000}
_IDX_FILES = {"train": "train", "test": "t10k"}


# ---------------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ImageSourceSpec:
    """One weighted image source. Exactly one of ``builtin``, ``folder``, ``tar`` or ``hf`` is set."""

    builtin: str | None = None
    folder: str | None = None
    tar: str | None = None
    hf: str | None = None
    config: str | None = None  # HF configuration name
    split: str | None = None  # HF / builtin split; default: data.split
    data_dir: str | None = None  # HF `data_dir` (e.g. with hf: imagefolder)
    data_files: str | None = None  # HF `data_files`
    image_field: str = "image"
    label_field: str = "label"
    weight: float = 1.0

    @property
    def kind(self) -> str:
        return next(kind for kind in ("builtin", "folder", "tar", "hf") if getattr(self, kind))

    @property
    def label(self) -> str:
        """A short human name for logs and metrics."""
        if self.kind == "hf":
            return f"{self.hf}{'/' + self.config if self.config else ''}:{self.split or 'train'}"
        name = getattr(self, self.kind)
        return f"{name}:{self.split}" if self.kind == "builtin" else name


@dataclass(frozen=True)
class ImageDataSpec:
    sources: tuple[ImageSourceSpec, ...]
    image_size: int = 224
    split: str = "train"
    train: bool = True
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    eval_crop_fraction: float = 0.875
    num_classes: int | None = None
    seed: int = 0
    streams_per_rank: int = 2
    shuffle_buffer: int = 1024
    max_bad_fraction: float = 0.01
    min_shards: int = 16
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def weights(self) -> list[float]:
        return normalized_weights(self.sources)


def is_image_data(raw: Any) -> bool:
    """Whether a config's ``data`` mapping describes images (``image_size`` set, or a folder / tar / built-in image
    source) rather than text — for commands that accept both."""
    if not isinstance(raw, dict):
        return False
    if "image_size" in raw:
        return True
    for source in raw.get("sources") or []:
        if isinstance(source, str) and source in BUILTIN_IMAGE_SOURCES:
            return True
        if isinstance(source, dict) and (source.get("folder") or source.get("tar")
                                         or source.get("builtin") in BUILTIN_IMAGE_SOURCES):
            return True
    return False


def parse_image_source(raw: Any, where: str, default_split: str) -> ImageSourceSpec:
    if isinstance(raw, str):  # shorthand: a built-in name, a tar file/glob, or a folder
        if raw in BUILTIN_IMAGE_SOURCES:
            raw = {"builtin": raw}
        elif raw.endswith(".tar") or any(ch in raw for ch in "*?["):
            raw = {"tar": raw}
        else:
            raw = {"folder": raw}
    if not isinstance(raw, dict):
        raise DataSpecError(f"{where}: must be a mapping with one of builtin/folder/tar/hf, got {raw!r}")
    allowed = {f.name for f in fields(ImageSourceSpec)}
    for key in raw:
        if key not in allowed:
            raise DataSpecError(f"{where}.{key}: unknown key; allowed keys are {sorted(allowed)}")
    chosen = [key for key in ("builtin", "folder", "tar", "hf") if raw.get(key) is not None]
    if len(chosen) != 1:
        raise DataSpecError(f"{where}: give exactly one of builtin, folder, tar or hf (got {chosen or 'none'})")
    for key in ("builtin", "folder", "tar", "hf", "config", "split", "data_dir", "data_files", "image_field",
                "label_field"):
        if raw.get(key) is not None:
            _check_type(f"{where}.{key}", raw[key], str, "a string")
    weight = raw.get("weight", 1.0)
    _check_type(f"{where}.weight", weight, (int, float), "a number")
    if not weight > 0:
        raise DataSpecError(f"{where}.weight: must be > 0, got {weight!r}")
    kind = chosen[0]
    for key in ("config", "data_dir", "data_files", "image_field", "label_field"):
        if key in raw and kind != "hf":
            raise DataSpecError(f"{where}.{key}: only applies to hf sources")
    if "split" in raw and kind not in ("hf", "builtin"):
        raise DataSpecError(f"{where}.split: only applies to builtin and hf sources")
    values = dict(raw)
    if kind == "builtin":
        if raw["builtin"] not in BUILTIN_IMAGE_SOURCES:
            raise DataSpecError(f"{where}.builtin: unknown built-in image source {raw['builtin']!r}: allowed values "
                                f"are {list(BUILTIN_IMAGE_SOURCES)}")
        values["split"] = raw.get("split") or default_split
        if values["split"] not in SPLITS:
            raise DataSpecError(f"{where}.split: {values['split']!r} is not one of {list(SPLITS)}")
    if kind == "hf":
        values["split"] = raw.get("split") or default_split
    return ImageSourceSpec(**{**values, "weight": float(weight)})


def _number_list(where: str, value: Any, length: int | None) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value or (length is not None and len(value) != length):
        size = f"{length} numbers" if length is not None else "a non-empty list of numbers"
        raise DataSpecError(f"{where}: must be a list of {size}, got {value!r}")
    for item in value:
        _check_type(where, item, (int, float), "a list of numbers")
    return tuple(float(item) for item in value)


def parse_image_data(raw: Any, where: str = "data") -> ImageDataSpec:
    """Validate the ``data`` mapping of an image run config into an [`ImageDataSpec`]."""
    if not isinstance(raw, dict):
        raise DataSpecError(f"{where}: must be a mapping, got {raw!r}")
    allowed = {f.name for f in fields(ImageDataSpec)} - {"extra"}
    for key in raw:
        if key not in allowed:
            raise DataSpecError(f"{where}.{key}: unknown key; allowed keys are {sorted(allowed)}")
    values = {key: raw[key] for key in allowed - {"sources"} if key in raw}
    split = values.get("split", "train")
    _check_type(f"{where}.split", split, str, "a string")
    if split not in SPLITS:
        raise DataSpecError(f"{where}.split: {split!r} is not one of {list(SPLITS)}")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise DataSpecError(f"{where}.sources: must be a non-empty list of sources")
    parsed = tuple(parse_image_source(source, f"{where}.sources[{i}]", split) for i, source in enumerate(sources))
    positive = ("image_size", "streams_per_rank", "min_shards")
    for key in positive + ("seed", "shuffle_buffer", "channels", "num_classes"):
        if values.get(key) is not None:
            _check_type(f"{where}.{key}", values[key], int, "an integer")
    for key in positive + ("num_classes",):
        if values.get(key) is not None and values[key] < 1:
            raise DataSpecError(f"{where}.{key}: must be >= 1, got {values[key]}")
    if values.get("shuffle_buffer", 0) < 0:
        raise DataSpecError(f"{where}.shuffle_buffer: must be >= 0, got {values['shuffle_buffer']}")
    for key in ("train", "hflip"):
        if key in values:
            _check_type(f"{where}.{key}", values[key], bool, "true or false")
    values.setdefault("train", split == "train")
    if values.get("channels") is None:
        values["channels"] = 1 if all(s.builtin == "fashion-mnist" for s in parsed) else 3
    channels = values["channels"]
    if channels not in (1, 3):
        raise DataSpecError(f"{where}.channels: must be 1 or 3, got {channels}")
    grey = channels == 1
    for key, default in (("mean", FASHION_MNIST_MEAN if grey else IMAGENET_MEAN),
                         ("std", FASHION_MNIST_STD if grey else IMAGENET_STD)):
        values[key] = _number_list(f"{where}.{key}", values[key], channels) if values.get(key) is not None else default
    if any(s <= 0 for s in values["std"]):
        raise DataSpecError(f"{where}.std: must be > 0, got {list(values['std'])}")
    if "crop_scale" in values:
        low, high = values["crop_scale"] = _number_list(f"{where}.crop_scale", values["crop_scale"], 2)
        if not 0 < low <= high <= 1:
            raise DataSpecError(f"{where}.crop_scale: need 0 < min <= max <= 1, got {[low, high]}")
    if "crop_ratio" in values:
        low, high = values["crop_ratio"] = _number_list(f"{where}.crop_ratio", values["crop_ratio"], 2)
        if not 0 < low <= high:
            raise DataSpecError(f"{where}.crop_ratio: need 0 < min <= max, got {[low, high]}")
    for key, low, high in (("eval_crop_fraction", 0.0, 1.0), ("max_bad_fraction", 0.0, 1.0)):
        if key in values:
            _check_type(f"{where}.{key}", values[key], (int, float), "a number")
            if not low <= values[key] <= high or (key == "eval_crop_fraction" and values[key] == 0):
                raise DataSpecError(f"{where}.{key}: must be in {'(' if key == 'eval_crop_fraction' else '['}"
                                    f"{low}, {high}], got {values[key]}")
    return ImageDataSpec(sources=parsed, **values)


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode an IDX file (two zero bytes, a dtype byte, a dimension count, big-endian uint32 sizes, raw data)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CorruptFileError(f"{name}: not an IDX file (bad magic {data[:4].hex()})")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES:
        raise CorruptFileError(f"{name}: unknown IDX data type 0x{dtype:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptFileError(f"{name}: truncated IDX header")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=_IDX_DTYPES[dtype], offset=header)
    if array.size != math.prod(shape):
        raise CorruptFileError(f"{name}: IDX header says {shape} ({math.prod(shape)} values), the file holds {array.size}")
    return array.reshape(shape).astype(array.dtype.newbyteorder("="), copy=False)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        np.save(tmp, array)
    os.chmod(tmp.name, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp.name, path)


def fashion_mnist_paths(split: str) -> tuple[Path, Path]:
    """``(images.npy, labels.npy)`` of a Fashion-MNIST split in the cache, decoding the IDX files on first use."""
    from .fetch import cache_dir, fetch_fashion_mnist

    if split not in SPLITS:
        raise DataSpecError(f"fashion-mnist: unknown split {split!r}: allowed values are {list(SPLITS)}")
    target = cache_dir() / "datasets" / "fashion-mnist"
    images, labels = target / f"{split}-images.npy", target / f"{split}-labels.npy"
    if images.is_file() and labels.is_file():
        return images, labels
    target.mkdir(parents=True, exist_ok=True)
    raw = fetch_fashion_mnist()
    prefix = _IDX_FILES[split]
    for kind, out, ndim in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
        source = raw / f"{prefix}-{kind}-ubyte.gz"
        array = parse_idx(gzip.decompress(source.read_bytes()), str(source))
        if array.ndim != ndim or array.shape[0] != FASHION_MNIST_COUNTS[split]:
            raise CorruptFileError(f"{source}: unexpected shape {array.shape}")
        _atomic_save(out, np.ascontiguousarray(array, dtype=np.uint8))
    return images, labels


@functools.lru_cache(maxsize=8)
def _memmap(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped ``(images uint8 (N, 28, 28), labels uint8 (N,))`` of a Fashion-MNIST split."""
    images, labels = fashion_mnist_paths(split)
    return _memmap(str(images)), _memmap(str(labels))


# A coarser label set over the same images: a new task for transfer tests and demos (fine-tune or linear-probe a
# Fashion-MNIST model on 3 classes it was never trained to name).
FASHION_MNIST_COARSE = {"tops": (0, 2, 4, 6), "bottoms-and-dresses": (1, 3), "footwear-and-bags": (5, 7, 8, 9)}


def export_fashion_mnist_folder(out: str | os.PathLike, split: str = "train", limit: int | None = None,
                                coarse: bool = False) -> dict[str, int]:
    """Write Fashion-MNIST ``split`` as an image folder ``out/CLASS/NNNNN.png`` (the ``folder`` source layout), with
    its 10 classes or the 3 of [`FASHION_MNIST_COARSE`]; ``limit`` caps the images (the split's first ones). The
    folder is written beside ``out`` and moved into place. Returns the images per class."""
    from PIL import Image

    images, labels = fashion_mnist(split)
    count = len(labels) if limit is None else min(limit, len(labels))
    if coarse:
        names = {fine: name for name, fines in FASHION_MNIST_COARSE.items() for fine in fines}
    else:
        names = {index: f"{index}-{name.replace('/', '-')}" for index, name in enumerate(FASHION_MNIST_CLASSES)}
    out = Path(out)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    counts: dict[str, int] = {}
    for index in range(count):
        name = names[int(labels[index])]
        (staging / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[index]), mode="L").save(staging / name / f"{index:05d}.png")
        counts[name] = counts.get(name, 0) + 1
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return dict(sorted(counts.items()))


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

    def read(self, shard: ImageShard, position: int | None, order: np.ndarray | None,
             num_classes: int | None) -> Iterator[RawRecord]:
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
        count = len(_memmap(self.labels_path))
        return [ImageShard(source_index, n, f"fashion-mnist/{self.split}#{start}-{end}", "idx", self.images_path,
                           start, end)
                for n, (start, end) in enumerate(_ranges(count, max(FASHION_MNIST_SHARDS[self.split], min_shards)))]

    def record(self, index: int, next_position: int, num_classes: int | None) -> RawRecord:
        label, bad = check_label(int(_memmap(self.labels_path)[index]), num_classes)
        return RawRecord(index, next_position, np.array(_memmap(self.images_path)[index]), label, bad,
                         self.images_path, f"record {index}")


class FolderCatalog(Catalog):
    kind = "folder"

    def __init__(self, root: str, where: str):
        self.root = os.path.expanduser(root)
        if not os.path.isdir(self.root):
            raise DataSpecError(f"{where}.folder: {root!r} is not a directory")
        classes = sorted(entry.name for entry in os.scandir(self.root)
                         if entry.is_dir() and not entry.name.startswith("."))
        if not classes:
            raise DataSpecError(f"{where}.folder: {root!r} has no class subdirectories (expected DIR/CLASS/image)")
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = []
            for directory, subdirs, files in os.walk(os.path.join(self.root, name), followlinks=True):
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                rel = os.path.relpath(directory, self.root)
                found.extend(os.path.join(rel, f) for f in files
                             if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)
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
            shards.append(ImageShard(source_index, n, f"folder:{self.root}#{start}-{end}@{digest}", "folder", None,
                                     start, end))
        return shards

    def record(self, index: int, next_position: int, num_classes: int | None) -> RawRecord:
        label, bad = check_label(int(self.labels[index]), num_classes)
        rel = self.paths[index]
        return RawRecord(index, next_position, os.path.join(self.root, rel), label, bad,
                         os.path.join(self.root, rel.split(os.sep, 1)[0]), rel)


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
            archive = tarfile.open(fileobj=handle, mode="r:")
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

        dataset = datasets.load_dataset(source.hf, source.config, split=source.split, streaming=True,
                                        data_dir=source.data_dir, data_files=source.data_files)
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
            raise DataSpecError(f"{where}.image_field: {source.image_field!r} is not a column of {source.label!r} "
                                f"(columns: {sorted(features)})")
        label_feature = features.get(source.label_field)
        if features and label_feature is None:
            raise DataSpecError(f"{where}.label_field: {source.label_field!r} is not a column of {source.label!r} "
                                f"(columns: {sorted(features)})")
        names = getattr(label_feature, "names", None)
        if names:
            self.class_names, self.num_classes = tuple(names), len(names)
        self.native = dataset.num_shards

    def shards(self, source_index: int, min_shards: int) -> list[ImageShard]:
        parts = max(1, math.ceil(min_shards / self.native))
        return [ImageShard(source_index, i * parts + part, f"hf:{self.source.label}#{i}/{self.native}%{part}/{parts}",
                           "hf", None, hf_index=i, hf_count=self.native, part=part, parts=parts)
                for i in range(self.native) for part in range(parts)]

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

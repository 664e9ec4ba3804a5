"""Fashion-MNIST, the built-in image source: Debian's ``dataset-fashion-mnist`` IDX files decoded once into the cache,
read memory-mapped, and exported as an image folder (for the ``folder`` source, or a coarser 3-class task).

The IDX files are parsed once and cached as ``.npy`` in ``cache_dir()/datasets/fashion-mnist/``; reads memory-map
them (O(1) random access).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from pathlib import Path

import numpy as np

from .errors import CorruptFileError, DataSpecError
from .files import atomic_file, write_directory
from .image_spec import SPLITS

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SHARDS = {"train": 16, "test": 4}
FASHION_MNIST_COUNTS = {"train": 60_000, "test": 10_000}
_IDX_FILES = {"train": "train", "test": "t10k"}

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
        raise CorruptFileError(
            f"{name}: IDX header says {shape} ({math.prod(shape)} values), the file holds {array.size}"
        )
    return array.reshape(shape).astype(array.dtype.newbyteorder("="), copy=False)


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
        with atomic_file(out) as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.uint8))
    return images, labels


@functools.lru_cache(maxsize=8)
def memmap_npy(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped ``(images uint8 (N, 28, 28), labels uint8 (N,))`` of a Fashion-MNIST split."""
    images, labels = fashion_mnist_paths(split)
    return memmap_npy(str(images)), memmap_npy(str(labels))


# A coarser label set over the same images: a new task for transfer tests and demos (fine-tune or linear-probe a
# Fashion-MNIST model on 3 classes it was never trained to name).
FASHION_MNIST_COARSE = {"tops": (0, 2, 4, 6), "bottoms-and-dresses": (1, 3), "footwear-and-bags": (5, 7, 8, 9)}


def export_fashion_mnist_folder(
    out: str | os.PathLike, split: str = "train", limit: int | None = None, coarse: bool = False
) -> dict[str, int]:
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
    counts: dict[str, int] = {}

    def write(staging: Path) -> None:
        staging.mkdir(parents=True)
        for index in range(count):
            name = names[int(labels[index])]
            (staging / name).mkdir(exist_ok=True)
            Image.fromarray(np.asarray(images[index]), mode="L").save(staging / name / f"{index:05d}.png")
            counts[name] = counts.get(name, 0) + 1

    write_directory(out, write)
    return dict(sorted(counts.items()))

"""The streaming image pipeline: decode, augment or eval-transform, normalise, shard, mix, shuffle, resume exactly.

Layout, mixing, the shuffle buffer's slots, the cursor and the loader are ``stream``'s, shared with text. Shards
never depend on the world size (see ``image_sources``), so the set of samples of an epoch is the same for any number
of ranks and workers.

Shuffle buffer. ``shuffle_buffer`` samples are held between reading and decoding. In memory an entry is the
undecoded record (a file path for folders, 784 bytes for Fashion-MNIST, the encoded bytes for tar and HF sources);
**in the cursor it is only a reference** ``(source, shard number, locator, source epoch)`` — an int64 array of
``(n, 4)``, 32 bytes a sample whatever the image size. Resuming re-reads the referenced records: O(1) each for
builtin / folder / tar (an index, a path, a byte offset), one pass over the shard up to the newest reference for
HF. The buffer therefore holds exactly what it held, in the same slots, and the resumed stream is bit-identical.

Randomness. All of it is counter-based: the mixing draw, the buffer slot (``uniform(seed, stream, emitted, 2)``)
and the augmentation of the ``n``-th sample a stream emits (``uniform(seed, stream, n, 3, k)`` for its k-th draw).
No RNG state is saved, and a resumed stream draws the same crops and flips.

Transforms (no torchvision; PIL + numpy, bilinear resampling with PIL's antialiasing):

* train (``data.train``): random-resized-crop exactly as torchvision's ``RandomResizedCrop`` — up to 10 tries of an
  area fraction in ``crop_scale`` and a log-uniform aspect ratio in ``crop_ratio``, else a center crop clamped to the
  ratio range — resized to ``image_size`` squared, then a horizontal flip with p 0.5 (``hflip``);
* eval: resize the shorter side to ``round(image_size / eval_crop_fraction)`` (224 → 256), keeping the aspect
  ratio, then cut the center ``image_size`` square (offset: the floor of half the margin, as HF's image processors
  crop, so that the processor saved with an export reproduces this transform exactly). **Rule for small images:**
  when the shorter side is already ``<= image_size`` the margin is not added — the shorter side goes to exactly
  ``image_size`` — so an image of the output size (Fashion-MNIST at ``image_size: 28``) passes through unchanged,
  and a small image is never cropped beyond its aspect ratio.
* both: convert to ``channels`` (L or RGB), scale to [0, 1], normalise with ``mean`` / ``std``: ``(C, H, W)``
  float32.

Bad records (``image_sources.BAD_REASONS``) are skipped and counted per reason and per file with the first few
locations — label problems when read, undecodable images when decoded (after the buffer; and when read, until one
image of the source has decoded, so that a source of undecodable images yields nothing) — and a stream stops with
[`BadDataError`] when they exceed ``max_bad_fraction`` of its records (once it has passed 200), or when a whole
epoch of one of its sources yields no usable sample (it would loop forever).

Cursor. After every batch the stream's state is attached: per source ``(epoch, shard index, position, decodable)``
(the position: an offset in the shard's permutation, a tar byte offset, or an HF example index; decodable: whether
one of its images has decoded in this stream), the mixing and emission counters, the buffer references and the
counts. [`ImageLoader`] keeps the state of the last batch of each stream; resuming costs O(1) in the step (no
replay), at any world size that divides the run's logical streams (``stream``'s layout). A changed transform,
number of logical streams or source (fingerprint) is refused with a one-line error.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .data_spec import is_image_data
from .errors import BadDataError, DataSpecError
from .image_sources import Catalog, ImageShard, RawRecord, open_catalog
from .image_spec import ImageDataSpec, parse_image_data
from .sources import fingerprint
from .stream import (
    MixedStream,
    StreamAssignment,
    StreamLoader,
    check_every_stream_gets_data,
    inspect_tail,
    logical_streams,
    merge_stats,
    uniform,
)

__all__ = [
    "ImageDataSpec",
    "ImageLoader",
    "ImagePlan",
    "ImageStream",
    "BadDataError",
    "build_image_plan",
    "parse_image_data",
    "eval_transform",
    "train_transform",
    "random_resized_crop_box",
    "eval_resize_shape",
    "decode_image",
    "inspect_images",
    "merge_image_stats",
    "is_image_data",
]

RRC_ATTEMPTS = 10


# ---------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ImagePlan(StreamAssignment):
    """Everything fixed at start: validated spec, source catalogs and shards, class count, fingerprint."""

    spec: ImageDataSpec
    catalogs: tuple[Catalog, ...]
    shards: tuple[tuple[ImageShard, ...], ...]
    fingerprint: str
    world_size: int
    num_classes: int
    num_streams: int  # the run's logical streams (stream.logical_streams)


def build_image_plan(spec: ImageDataSpec, world_size: int) -> ImagePlan:
    """Open the sources, cut them into shards and check that every stream gets data; one-line errors name the field."""
    catalogs = tuple(open_catalog(spec, i) for i in range(len(spec.sources)))
    shards = tuple(tuple(catalog.shards(i, spec.min_shards)) for i, catalog in enumerate(catalogs))
    num_streams = logical_streams(spec, world_size)
    check_every_stream_gets_data(spec, shards, world_size, num_streams)
    known = [catalog.num_classes for catalog in catalogs if catalog.num_classes is not None]
    if spec.num_classes is not None:
        for index, catalog in enumerate(catalogs):
            if catalog.num_classes is not None and catalog.num_classes > spec.num_classes:
                raise DataSpecError(
                    f"data.num_classes: {spec.num_classes}, but data.sources[{index}] "
                    f"({spec.sources[index].label!r}) has {catalog.num_classes} classes"
                )
        num_classes = spec.num_classes
    elif len(known) == len(catalogs):
        num_classes = max(known)
    else:
        index = next(i for i, catalog in enumerate(catalogs) if catalog.num_classes is None)
        raise DataSpecError(
            f"data.num_classes: required, since data.sources[{index}] ({spec.sources[index].label!r}) "
            f"does not say how many classes it has (labels are checked against it)"
        )
    shards_fingerprint = fingerprint(spec, [list(s) for s in shards])
    return ImagePlan(spec, catalogs, shards, shards_fingerprint, world_size, num_classes, num_streams)


# ---------------------------------------------------------------------------------------------------- transforms


def decode_image(payload, channels: int) -> Image.Image:
    """A loaded PIL image in mode L (1 channel) or RGB (3) from a record payload; raises on undecodable data."""
    mode = "L" if channels == 1 else "RGB"

    def converted(image: Image.Image) -> Image.Image:
        if image.mode == mode:
            return image
        if mode == "RGB" and image.mode in ("P", "PA", "LA"):
            image = image.convert("RGBA")  # palette transparency, grey + alpha: through RGBA
        return image.convert(mode)

    if isinstance(payload, np.ndarray):
        return converted(Image.fromarray(payload))
    if isinstance(payload, Image.Image):
        return converted(payload)
    with Image.open(io.BytesIO(payload) if isinstance(payload, (bytes, bytearray)) else payload) as opened:
        opened.load()
        return opened.convert(mode) if opened.mode == mode else converted(opened)  # a copy outlives the file


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], draw
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of torchvision's RandomResizedCrop; ``draw(k)`` gives the k-th uniform in [0, 1)."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(RRC_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * draw(4 * attempt))
        aspect = math.exp(log_low + (log_high - log_low) * draw(4 * attempt + 1))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(draw(4 * attempt + 2) * (height - h + 1))
            left = int(draw(4 * attempt + 3) * (width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_resize_shape(width: int, height: int, image_size: int, crop_fraction: float = 0.875) -> tuple[int, int]:
    """``(width, height)`` the eval transform resizes to before its center crop (see the module doc's rule)."""
    short, long = min(width, height), max(width, height)
    side = image_size if short <= image_size else max(image_size, round(image_size / crop_fraction))
    other = side if short == long else int(side * long / short)
    return (side, other) if width <= height else (other, side)


def _normalise(image: Image.Image, spec: ImageDataSpec) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    scale = (1.0 / (255.0 * np.asarray(spec.std, dtype=np.float32)))[:, None, None]
    return np.ascontiguousarray((pixels - 255.0 * mean) * scale)


def eval_transform(image: Image.Image, spec: ImageDataSpec) -> np.ndarray:
    """Deterministic resize + center crop + normalise: ``(C, image_size, image_size)`` float32."""
    size = spec.image_size
    shape = eval_resize_shape(image.width, image.height, size, spec.eval_crop_fraction)
    if shape != image.size:
        image = image.resize(shape, Image.Resampling.BILINEAR)
    if image.size != (size, size):
        # Floor of half the margin, as HF image processors crop: inference on an export sees the same pixels.
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return _normalise(image, spec)


def train_transform(image: Image.Image, spec: ImageDataSpec, stream: int, index: int) -> np.ndarray:
    """Random-resized-crop + flip + normalise, its randomness drawn from ``(seed, stream, index)`` (no state)."""

    def draw(k: int) -> float:
        return uniform(spec.seed, stream, index, 3, k)

    left, top, w, h = random_resized_crop_box(image.width, image.height, spec.crop_scale, spec.crop_ratio, draw)
    size = spec.image_size
    if (left, top, w, h) != (0, 0, size, size) or image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    pixels = _normalise(image, spec)
    if spec.hflip and draw(4 * RRC_ATTEMPTS) < 0.5:
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])
    return pixels


# ---------------------------------------------------------------------------------------------------- one stream


IMAGE_COUNTERS = ("images",)


def merge_image_stats(all_stats: list[dict]) -> dict:
    """Sum the statistics of several image streams (or ranks)."""
    return merge_stats(all_stats, IMAGE_COUNTERS)


def _shard_order(size: int, seed: int, source: int, shard: int, epoch: int) -> np.ndarray:
    """The reading order inside a random-access shard in one epoch of its source."""
    return np.random.Generator(np.random.PCG64([seed, source, shard, epoch, 1])).permutation(size)


class ImageStream(MixedStream):
    """One logical stream ``g`` of images: its sources' shards, mixed by weight, optionally shuffled, decoded and
    transformed. Its items are well-labelled undecoded records ``(record, shard, source epoch)``."""

    COUNTERS = IMAGE_COUNTERS
    GOOD = "images"
    ITEM = "sample"

    def __init__(self, plan: ImagePlan, stream: int, state: dict | None = None):
        self._orders: dict[int, tuple[tuple[int, int], np.ndarray]] = {}
        super().__init__(plan, stream, state)

    def initial_state(self) -> dict:
        state = super().initial_state()
        for cursor in state["sources"]:
            cursor["decodable"] = False  # no image of the source has decoded in this stream yet (see _read)
        return state

    def _buffer_state(self, buffer: list) -> dict:
        refs = [(j, shard.number, record.locator, epoch) for (record, shard, epoch), j in buffer]
        return {"buffer": np.asarray(refs, dtype=np.int64).reshape(-1, 4)}  # (source, shard, locator, epoch)

    def _restore_buffer(self, state: dict) -> list:
        """Re-read the buffered records from their references (grouped per shard: one pass per shard)."""
        refs = np.asarray(state["buffer"], dtype=np.int64).reshape(-1, 4).tolist()  # a tensor after a worker
        wanted: dict[tuple[int, int], list[int]] = {}
        for source, shard, locator, _ in refs:
            wanted.setdefault((source, shard), []).append(locator)
        found = {
            key: self.plan.catalogs[key[0]].fetch(self.plan.shards[key[0]][key[1]], locators, self.plan.num_classes)
            for key, locators in wanted.items()
        }
        buffer = []
        for source, shard, locator, epoch in refs:
            record = found[(source, shard)].get(locator)
            if record is None or record.bad is not None:
                raise DataSpecError(
                    f"data cursor: buffered sample {locator} of {self.plan.shards[source][shard].key} "
                    f"cannot be read back; the source changed since the checkpoint"
                )
            buffer.append(((record, self.plan.shards[source][shard], epoch), source))
        return buffer

    def _order(self, shard: ImageShard, epoch: int) -> np.ndarray | None:
        if not shard.random_access:
            return None
        key = (shard.number, epoch)
        cached = self._orders.get(shard.source_index)
        if cached is None or cached[0] != key:  # one per source: the shard being read
            cached = self._orders[shard.source_index] = (
                key,
                _shard_order(shard.size, self.spec.seed, shard.source_index, *key),
            )
        return cached[1]

    def _read(self, j: int, shard: ImageShard, cursor: dict) -> Iterator[tuple[RawRecord, ImageShard, int]]:
        within = self._order(shard, cursor["epoch"])
        for record in self.plan.catalogs[j].read(shard, cursor["position"], within, self.plan.num_classes):
            cursor["position"] = record.next_position
            # Images are decoded after the shuffle buffer, so a source none of whose images decodes would keep the
            # stream looping. Until one image of the source has decoded, each is decoded here too: such a source
            # then yields nothing in a whole epoch and stops with a one-line error. (A cursor saved before this
            # check has no "decodable": it reads on as it did.)
            if record.bad is None and not cursor.get("decodable", True):
                if self._decoded(record) is None:
                    record.bad = "undecodable_image"
                else:
                    cursor["decodable"] = True
            if record.bad is not None:
                self.count_bad(record.bad, record.where, record.location)
                continue
            yield record, shard, cursor["epoch"]

    def _decoded(self, record: RawRecord) -> Image.Image | None:
        """The record's image, or ``None`` if it cannot be decoded."""
        try:
            return decode_image(record.payload, self.spec.channels)
        except Exception:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, ...)
            return None

    def next_record(self) -> tuple[tuple[int, int, int, int], RawRecord]:
        """The next ``((source, shard number, locator, epoch), record)`` after mixing and shuffling, undecoded."""
        (record, shard, epoch), j, _ = self.next_item()
        return (j, shard.number, record.locator, epoch), record

    def next_sample(self) -> tuple[np.ndarray, int, int, int]:
        """``(pixels (C, H, W) float32, label, source, source epoch)`` of the next good sample."""
        while True:
            (record, _, epoch), j, index = self.next_item()
            image = self._decoded(record)
            if image is None:
                record.bad = "undecodable_image"
                self.count_bad(record.bad, record.where, record.location)
                continue
            self.state["stats"]["images"] += 1
            pixels = (
                train_transform(image, self.spec, self.stream, index)
                if self.spec.train
                else eval_transform(image, self.spec)
            )
            return pixels, record.label, j, epoch

    def next_batch(self, micro_batch_size: int) -> dict:
        pixels, labels, sources, epochs = zip(*(self.next_sample() for _ in range(micro_batch_size)), strict=True)
        return {
            "pixel_values": torch.from_numpy(np.stack(pixels)),
            "labels": torch.tensor(labels, dtype=torch.long),
            "source": torch.tensor(sources),
            "epoch": torch.tensor(epochs),
            "stream": self.stream,
            "state": self.batch_cursor(),
        }


# ---------------------------------------------------------------------------------------------------- a rank's loader


class ImageLoader(StreamLoader):
    """A rank's image batches: ``{"pixel_values": FloatTensor (B, C, H, W), "labels": LongTensor (B,), "source",
    "epoch"}`` forever (per sample: the source it came from and that source's epoch in its stream). See
    [`StreamLoader`] for the cursor; ``stats()``: images and bad records passed so far."""

    OUTPUT_KEYS = ("pixel_values", "labels", "source", "epoch")
    COUNTERS = IMAGE_COUNTERS
    _new_stream = ImageStream

    def _specific_meta(self) -> dict:
        spec = self.plan.spec
        return {"image_size": spec.image_size, "channels": spec.channels, "train": spec.train}


# ---------------------------------------------------------------------------------------------------- inspect


def inspect_images(spec: ImageDataSpec, world_size: int = 1, samples: int = 3, seconds: float = 3.0) -> str:
    """``crate data inspect`` for an image spec: sources and shards, a few samples, throughput, bad records."""
    plan = build_image_plan(spec, world_size)
    transform = (
        f"train: random-resized-crop scale {list(spec.crop_scale)} ratio "
        f"[{spec.crop_ratio[0]:.3f}, {spec.crop_ratio[1]:.3f}]{' + hflip' if spec.hflip else ''}"
        if spec.train
        else f"eval: resize (crop fraction {spec.eval_crop_fraction}) + center crop"
    )
    lines = [
        f"fingerprint {plan.fingerprint}; {spec.channels}x{spec.image_size}x{spec.image_size}, {transform}; "
        f"mean {list(spec.mean)} std {list(spec.std)}; {plan.num_classes} classes",
        f"{plan.num_streams} streams (world size {world_size} x {plan.streams_per_rank}); shuffle buffer "
        f"{spec.shuffle_buffer} samples",
    ]
    for index, (source, weight) in enumerate(zip(spec.sources, spec.weights, strict=True)):
        catalog = plan.catalogs[index]
        names = catalog.class_names
        classes = (
            f"{len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            if names
            else "classes unnamed"
        )
        lines.append(
            f"source {index}: {source.label} ({source.kind}, weight {weight:.3f}): "
            f"{len(plan.shards[index])} shards; stream 0 reads {len(plan.stream_shards(0, index))}; {classes}"
        )
    stream = ImageStream(plan, 0)
    for number in range(samples):
        pixels, label, source, epoch = stream.next_sample()
        names = plan.catalogs[source].class_names
        name = f" ({names[label]})" if names and label < len(names) else ""
        lines.append(
            f"sample {number}: label {label}{name}, source {source}, epoch {epoch}, shape "
            f"{list(pixels.shape)}, mean {pixels.mean():+.3f} std {pixels.std():.3f} min {pixels.min():+.3f} "
            f"max {pixels.max():+.3f}"
        )
    lines += inspect_tail(
        stream,
        stream.next_sample,
        seconds,
        lambda n, elapsed: f"{n / elapsed:,.0f} images/s",
        lambda stats: f"{stats['images']:,} images, {sum(stats['bad'].values())} bad records {stats['bad'] or ''}",
    )
    return "\n".join(lines)

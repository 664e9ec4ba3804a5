"""The ``data`` section of an image classification run, validated into an [`ImageDataSpec`].

```yaml
data:
  kind: image                 # inferred when left out (see data_pipeline.data_spec)
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
  num_streams: null           # as for text: fixed for the run's life (default streams_per_rank x first world size)
  shuffle_buffer: 1024        # samples; the cursor keeps references to them, not pixels (see image_stream)
  max_bad_fraction: 0.01
  min_shards: 16              # folder / HF sources are cut into this many shards (see image_catalogs)
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

Defaults that depend on other fields are resolved here, once: a builtin or HF source's ``split`` is ``data.split``;
``train`` is ``split == "train"``; ``channels``, ``mean`` and ``std`` follow the sources and the channel count.
Every error is one line that names the field (``data.sources[1].weight: must be > 0, got 0``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .spec import (
    DataModel,
    SourceModel,
    check_in_range,
    field_error,
    is_number,
    normalized_weights,
    require_mapping,
    source_list,
    validate_spec,
    with_default_split,
)

BUILTIN_IMAGE_SOURCES: tuple[str, ...] = ("fashion-mnist",)
SPLITS: tuple[str, ...] = ("train", "test")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_HF_ONLY = ("config", "data_dir", "data_files", "image_field", "label_field")


class ImageSourceSpec(SourceModel):
    """One weighted image source. Exactly one of ``builtin``, ``folder``, ``tar`` or ``hf`` is set."""

    ORIGINS = ("builtin", "folder", "tar", "hf")

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
    weight: float = Field(default=1.0, gt=0)

    @classmethod
    def check_raw(cls, raw: Any) -> Any:
        """Keys given (even at their default value) that the source's origin has no use for are errors."""
        raw = super().check_raw(raw)
        origin = next(key for key in cls.ORIGINS if raw.get(key) is not None)
        for key in _HF_ONLY:
            if key in raw and origin != "hf":
                raise field_error(key, "only applies to hf sources")
        if "split" in raw and origin not in ("hf", "builtin"):
            raise field_error("split", "only applies to builtin and hf sources")
        return raw

    @field_validator("builtin")
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        if value is not None and value not in BUILTIN_IMAGE_SOURCES:
            raise ValueError(
                f"unknown built-in image source {value!r}: allowed values are {list(BUILTIN_IMAGE_SOURCES)}"
            )
        return value

    @model_validator(mode="after")
    def _builtin_split(self):
        if self.builtin is not None and self.split is not None and self.split not in SPLITS:
            raise field_error("split", f"{self.split!r} is not one of {list(SPLITS)}")
        return self

    @property
    def label(self) -> str:
        """A short human name for logs and metrics."""
        if self.kind == "hf":
            return f"{self.hf}{'/' + self.config if self.config else ''}:{self.split or 'train'}"
        name = getattr(self, self.kind)
        return f"{name}:{self.split}" if self.kind == "builtin" else name


def _image_shorthand(name: str) -> dict:
    """A source given as a string: a built-in name, a tar file or glob, or a folder."""
    if name in BUILTIN_IMAGE_SOURCES:
        return {"builtin": name}
    if name.endswith(".tar") or any(ch in name for ch in "*?["):
        return {"tar": name}
    return {"folder": name}


def _numbers(value: Any, length: int) -> tuple[float, ...]:
    """A list of ``length`` numbers as a tuple of floats (the message names the length wanted)."""
    if not isinstance(value, (list, tuple)) or len(value) != length or not all(is_number(item) for item in value):
        raise ValueError(f"must be a list of {length} numbers, got {value!r}")
    return tuple(float(item) for item in value)


class ImageDataSpec(DataModel):
    """The ``data`` section of an image classification run (the module doc lists the keys)."""

    kind: Literal["image"] = "image"
    split: str = "train"
    sources: tuple[ImageSourceSpec, ...]
    image_size: int = Field(default=224, ge=1)
    train: bool | None = Field(default=None, validate_default=True)
    channels: int | None = Field(default=None, validate_default=True)
    mean: tuple[float, ...] | None = Field(default=None, validate_default=True, strict=False)
    std: tuple[float, ...] | None = Field(default=None, validate_default=True, strict=False)
    crop_scale: tuple[float, float] = Field(default=(0.08, 1.0), strict=False)
    crop_ratio: tuple[float, float] = Field(default=(3 / 4, 4 / 3), strict=False)
    hflip: bool = True
    eval_crop_fraction: float = 0.875
    num_classes: int | None = Field(default=None, ge=1)
    seed: int = 0
    streams_per_rank: int = Field(default=2, ge=1)
    num_streams: int | None = Field(default=None, ge=1)  # logical streams of the run, fixed for its life
    shuffle_buffer: int = Field(default=1024, ge=0)
    max_bad_fraction: float = 0.01
    min_shards: int = Field(default=16, ge=1)

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: str) -> str:
        if value not in SPLITS:
            raise ValueError(f"{value!r} is not one of {list(SPLITS)}")
        return value

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        return source_list(value, _image_shorthand)

    @field_validator("sources")
    @classmethod
    def _default_split(cls, sources: tuple[ImageSourceSpec, ...], info: ValidationInfo):
        return with_default_split(sources, info.data.get("split", "train"), ("builtin", "hf"))

    @field_validator("train")
    @classmethod
    def _default_train(cls, value: bool | None, info: ValidationInfo) -> bool:
        return info.data.get("split", "train") == "train" if value is None else value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: int | None, info: ValidationInfo) -> int:
        if value is None:
            sources = info.data.get("sources", ())
            value = 1 if sources and all(source.builtin == "fashion-mnist" for source in sources) else 3
        if value not in (1, 3):
            raise ValueError(f"must be 1 or 3, got {value}")
        return value

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _per_channel(cls, value: Any, info: ValidationInfo) -> tuple[float, ...]:
        channels = info.data.get("channels", 3)
        if value is None:
            grey = channels == 1
            return {
                "mean": FASHION_MNIST_MEAN if grey else IMAGENET_MEAN,
                "std": FASHION_MNIST_STD if grey else IMAGENET_STD,
            }[info.field_name]
        value = _numbers(value, channels)
        if info.field_name == "std" and any(s <= 0 for s in value):
            raise ValueError(f"must be > 0, got {list(value)}")
        return value

    @field_validator("crop_scale", mode="before")
    @classmethod
    def _crop_scale(cls, value: Any) -> tuple[float, float]:
        low, high = _numbers(value, 2)
        if not 0 < low <= high <= 1:
            raise ValueError(f"need 0 < min <= max <= 1, got {[low, high]}")
        return low, high

    @field_validator("crop_ratio", mode="before")
    @classmethod
    def _crop_ratio(cls, value: Any) -> tuple[float, float]:
        low, high = _numbers(value, 2)
        if not 0 < low <= high:
            raise ValueError(f"need 0 < min <= max, got {[low, high]}")
        return low, high

    @field_validator("eval_crop_fraction", mode="before")
    @classmethod
    def _crop_fraction(cls, value: Any) -> Any:
        return check_in_range(value, 0.0, 1.0, "(]")

    @field_validator("max_bad_fraction", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        return check_in_range(value, 0.0, 1.0)

    @property
    def weights(self) -> list[float]:
        return normalized_weights(self.sources)


def parse_image_data(raw: Any, where: str = "data") -> ImageDataSpec:
    """Validate the ``data`` mapping of an image run config into an [`ImageDataSpec`]."""
    return validate_spec(ImageDataSpec, require_mapping(raw, where), where)

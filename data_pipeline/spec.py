"""The data section of a run config: validated pydantic models, one per kind of data, and the text stream's.

```yaml
data:
  kind: text                  # text | image | labelled (data_pipeline.data_spec); inferred when left out
  seq_len: 1024               # tokens per packed block
  seed: 0
  streams_per_rank: 2         # logical streams per rank (DataLoader workers execute them; see stream.py)
  num_streams: null           # logical streams of the run, fixed for its life (default: streams_per_rank x the
                              # first start's world size); set it and a run reads the same data at any world size
  open_shards: 16             # shards of each source read at once, each block drawn from one of them
  shuffle_buffer: 256         # blocks; 0 disables; its contents are saved in the cursor (exact resume)
  max_bad_fraction: 0.01      # a stream whose bad records exceed this fraction stops the run
  min_shards: 16              # line-oriented files are split into at least this many byte ranges
  sources:
    - builtin: shakespeare    # prepared into the cache on first use (data_pipeline.builtin)
      weight: 1.0
    - path: corpus/*.jsonl    # files, directories or globs: .jsonl .json .txt .parquet
      text_field: text
      weight: 2.0
    - hf: wikitext            # any `datasets` dataset, opened with streaming=True
      config: wikitext-2-raw-v1
      split: train
      text_field: text
```

Every error is one line that names the field (``data.sources[1].weight: must be > 0, got 0``): the key dotted, list
indices in brackets. This module also holds what the three kinds' models share: [`DataModel`] (frozen, strict,
unknown keys refused), [`SourceModel`] (a source's dump leaves its fields at their defaults out) and
[`validate_spec`], which turns pydantic's first error into that one line.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from .errors import DataSpecError

FORMATS = ("jsonl", "json", "txt", "parquet")
TXT_UNITS = ("file", "line")

# pydantic's type errors, in the words the messages have always used
_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
}
_FIELD_ERROR = "data_field"  # an error a model validator reports on one of its fields (ctx: field, message)


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error about ``field`` raised by a validator of the model holding it (its key goes into the location)."""
    return PydanticCustomError(_FIELD_ERROR, "{message}", {"field": field, "message": message})


def _key(where: str, loc: tuple) -> str:
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _one_line(error: ValidationError, where: str) -> str:
    """``key: what is wrong`` of the first error."""
    detail = error.errors()[0]
    loc, kind, got, ctx = tuple(detail["loc"]), detail["type"], detail.get("input"), detail.get("ctx") or {}
    if kind == _FIELD_ERROR:
        loc, message = loc + (ctx["field"],), ctx["message"]
    elif kind in _TYPE_WORDS:
        message = f"must be {_TYPE_WORDS[kind]}, got {got!r}"
    elif kind == "greater_than_equal":
        message = f"must be >= {ctx['ge']:g}, got {got!r}"
    elif kind == "greater_than":
        message = f"must be > {ctx['gt']:g}, got {got!r}"
    elif kind == "value_error":
        message = str(ctx["error"])
    else:
        message = f"{detail['msg']}, got {got!r}"
    return f"{_key(where, loc)}: {message}"


Model = TypeVar("Model", bound=BaseModel)


def validate_spec(model: type[Model], raw: Any, where: str = "data") -> Model:
    """``model.model_validate(raw)``, its first error raised as a one-line [`DataSpecError`] naming the key."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise DataSpecError(_one_line(error, where)) from None


class DataModel(BaseModel):
    """A part of a data section: frozen, strict types, unknown keys refused (by name, with the allowed ones)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _check_raw_input(cls, raw: Any) -> Any:
        return raw if isinstance(raw, cls) else cls.check_raw(raw)

    @classmethod
    def check_raw(cls, raw: Any) -> Any:
        """Checks of the raw input before its fields are validated; subclasses extend it (in this order)."""
        if isinstance(raw, dict):
            allowed = sorted(cls.model_fields)
            for key in raw:
                if key not in allowed:
                    raise field_error(key, f"unknown key; allowed keys are {allowed}")
        return raw


class SourceModel(DataModel):
    """One weighted source; exactly one of the fields in ``ORIGINS`` says where its data is."""

    ORIGINS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_raw(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise ValueError(f"must be a mapping with one of {'/'.join(cls.ORIGINS)}, got {raw!r}")
        raw = super().check_raw(raw)
        chosen = [key for key in cls.ORIGINS if raw.get(key) is not None]
        if len(chosen) != 1:
            names = f"{', '.join(cls.ORIGINS[:-1])} or {cls.ORIGINS[-1]}"
            raise ValueError(f"give exactly one of {names} (got {chosen or 'none'})")
        return raw

    @property
    def kind(self) -> str:
        """Which of ``ORIGINS`` is set."""
        return next(origin for origin in self.ORIGINS if getattr(self, origin) is not None)

    @model_serializer(mode="wrap")
    def _without_defaults(self, handler) -> dict:
        """The fields at their defaults are left out (a short config.yaml, and no field of another origin)."""
        fields = type(self).model_fields
        return {key: value for key, value in handler(self).items() if getattr(self, key) != fields[key].default}


def source_list(value: Any, shorthand) -> Any:
    """A ``sources`` list as a tuple, each string replaced by ``shorthand(string)`` (a mapping)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("must be a non-empty list of sources")
    return tuple(shorthand(item) if isinstance(item, str) else item for item in value)


def with_default_split(sources: tuple, split: str, origins: tuple[str, ...]) -> tuple:
    """The sources with ``split`` set where it was not given, for the origins that have splits."""
    return tuple(
        source.model_copy(update={"split": split}) if source.split is None and source.kind in origins else source
        for source in sources
    )


def normalized_weights(sources) -> list[float]:
    """Source weights scaled to sum to one."""
    total = sum(source.weight for source in sources)
    return [source.weight / total for source in sources]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_in_range(value: Any, low: float, high: float, brackets: str = "[]") -> Any:
    """A before-validator's range check of a number, the value as given in the message (the type is checked next)."""
    inside = (low <= value if brackets[0] == "[" else low < value) and value <= high
    if is_number(value) and not inside:
        raise ValueError(f"must be in {brackets[0]}{low}, {high}{brackets[1]}, got {value}")
    return value


class SourceSpec(SourceModel):
    """One weighted text source. Exactly one of ``builtin``, ``path`` or ``hf`` is set."""

    ORIGINS = ("builtin", "path", "hf")

    builtin: str | None = None
    path: str | None = None
    hf: str | None = None
    config: str | None = None  # HF dataset configuration name
    split: str = "train"
    text_field: str = "text"
    format: str | None = None  # inferred from the file suffix when not given
    txt_unit: str = "file"  # a .txt document is a whole file, or one line
    weight: float = Field(default=1.0, gt=0)
    data_dir: str | None = None  # HF `data_dir`
    data_files: str | None = None  # HF `data_files` (a path or glob), e.g. with hf: json / parquet / text

    @field_validator("builtin")
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        from .builtin import BUILTIN_SOURCES

        if value is not None and value not in BUILTIN_SOURCES:
            raise ValueError(f"unknown built-in source {value!r}: allowed values are {list(BUILTIN_SOURCES)}")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value not in FORMATS:
            raise ValueError(f"{value!r} is not one of {list(FORMATS)}")
        return value

    @field_validator("txt_unit")
    @classmethod
    def _known_unit(cls, value: str) -> str:
        if value not in TXT_UNITS:
            raise ValueError(f"{value!r} is not one of {list(TXT_UNITS)}")
        return value

    @property
    def label(self) -> str:
        """A short human name for logs and metrics."""
        if self.builtin:
            return self.builtin
        if self.path:
            return self.path
        return f"{self.hf}{'/' + self.config if self.config else ''}:{self.split}"


def _text_shorthand(name: str) -> dict:
    """A source given as a string: a built-in name or a path."""
    from .builtin import BUILTIN_SOURCES

    return {"builtin": name} if name in BUILTIN_SOURCES else {"path": name}


class TextDataSpec(DataModel):
    """The ``data`` section of a pretraining run: a packed, mixed, sharded token stream."""

    kind: Literal["text"] = "text"
    sources: tuple[SourceSpec, ...]
    seq_len: int = Field(default=1024, ge=1)
    seed: int = 0
    streams_per_rank: int = Field(default=2, ge=1)
    num_streams: int | None = Field(default=None, ge=1)  # logical streams of the run, fixed for its life
    open_shards: int = Field(default=16, ge=1)  # shards of a source read at once, blocks drawn among them
    shuffle_buffer: int = Field(default=256, ge=0)
    max_bad_fraction: float = 0.01
    min_shards: int = Field(default=16, ge=1)
    tokenize_batch_docs: int = Field(default=64, ge=1)

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        return source_list(value, _text_shorthand)

    @field_validator("max_bad_fraction", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        return check_in_range(value, 0, 1)

    @property
    def weights(self) -> list[float]:
        return normalized_weights(self.sources)


def parse_text_data(raw: Any, where: str = "data") -> TextDataSpec:
    """Validate the ``data`` mapping of a run config into a [`TextDataSpec`]."""
    return validate_spec(TextDataSpec, require_mapping(raw, where), where)


def require_mapping(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise DataSpecError(f"{where}: must be a mapping, got {raw!r}")
    return raw

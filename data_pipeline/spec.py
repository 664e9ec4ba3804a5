"""The data section of a run config: a list of weighted sources and how to stream them, validated once.

```yaml
data:
  seq_len: 1024               # tokens per packed block
  seed: 0
  streams_per_rank: 2         # logical streams per rank (DataLoader workers execute them; see text_stream.py)
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

Every error is one line that names the field (``data.sources[1].weight: must be > 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import DataSpecError

FORMATS = ("jsonl", "json", "txt", "parquet")
TXT_UNITS = ("file", "line")


@dataclass(frozen=True)
class SourceSpec:
    """One weighted source. Exactly one of ``builtin``, ``path`` or ``hf`` is set."""

    builtin: str | None = None
    path: str | None = None
    hf: str | None = None
    config: str | None = None  # HF dataset configuration name
    split: str = "train"
    text_field: str = "text"
    format: str | None = None  # inferred from the file suffix when not given
    txt_unit: str = "file"  # a .txt document is a whole file, or one line
    weight: float = 1.0
    data_dir: str | None = None  # HF `data_dir`
    data_files: str | None = None  # HF `data_files` (a path or glob), e.g. with hf: json / parquet / text

    @property
    def kind(self) -> str:
        return "builtin" if self.builtin else "path" if self.path else "hf"

    @property
    def label(self) -> str:
        """A short human name for logs and metrics."""
        if self.builtin:
            return self.builtin
        if self.path:
            return self.path
        return f"{self.hf}{'/' + self.config if self.config else ''}:{self.split}"


@dataclass(frozen=True)
class TextDataSpec:
    sources: tuple[SourceSpec, ...]
    seq_len: int = 1024
    seed: int = 0
    streams_per_rank: int = 2
    shuffle_buffer: int = 256
    max_bad_fraction: float = 0.01
    min_shards: int = 16
    tokenize_batch_docs: int = 64
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def weights(self) -> list[float]:
        return normalized_weights(self.sources)


def normalized_weights(sources) -> list[float]:
    """Source weights scaled to sum to one."""
    total = sum(source.weight for source in sources)
    return [source.weight / total for source in sources]


def _check_type(where: str, value: Any, kind: type | tuple[type, ...], text: str) -> None:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise DataSpecError(f"{where}: must be {text}, got {value!r}")
    if not isinstance(value, kind):
        raise DataSpecError(f"{where}: must be {text}, got {value!r}")


def parse_source(raw: Any, where: str) -> SourceSpec:
    if isinstance(raw, str):  # shorthand: a built-in name or a path
        from .builtin import BUILTIN_SOURCES

        raw = {"builtin": raw} if raw in BUILTIN_SOURCES else {"path": raw}
    if not isinstance(raw, dict):
        raise DataSpecError(f"{where}: must be a mapping with one of builtin/path/hf, got {raw!r}")
    allowed = {f.name for f in fields(SourceSpec)}
    for key in raw:
        if key not in allowed:
            raise DataSpecError(f"{where}.{key}: unknown key; allowed keys are {sorted(allowed)}")
    chosen = [key for key in ("builtin", "path", "hf") if raw.get(key) is not None]
    if len(chosen) != 1:
        raise DataSpecError(f"{where}: give exactly one of builtin, path or hf (got {chosen or 'none'})")
    for key in ("builtin", "path", "hf", "config", "split", "text_field", "format", "txt_unit", "data_dir",
                "data_files"):
        if raw.get(key) is not None:
            _check_type(f"{where}.{key}", raw[key], str, "a string")
    weight = raw.get("weight", 1.0)
    _check_type(f"{where}.weight", weight, (int, float), "a number")
    if not weight > 0:
        raise DataSpecError(f"{where}.weight: must be > 0, got {weight!r}")
    if raw.get("format") is not None and raw["format"] not in FORMATS:
        raise DataSpecError(f"{where}.format: {raw['format']!r} is not one of {list(FORMATS)}")
    if raw.get("txt_unit", "file") not in TXT_UNITS:
        raise DataSpecError(f"{where}.txt_unit: {raw['txt_unit']!r} is not one of {list(TXT_UNITS)}")
    if raw.get("builtin") is not None:
        from .builtin import BUILTIN_SOURCES

        if raw["builtin"] not in BUILTIN_SOURCES:
            raise DataSpecError(f"{where}.builtin: unknown built-in source {raw['builtin']!r}: allowed values are "
                                f"{list(BUILTIN_SOURCES)}")
    return SourceSpec(**{**raw, "weight": float(weight)})


def parse_text_data(raw: Any, where: str = "data") -> TextDataSpec:
    """Validate the ``data`` mapping of a run config into a [`TextDataSpec`]."""
    if not isinstance(raw, dict):
        raise DataSpecError(f"{where}: must be a mapping, got {raw!r}")
    allowed = {f.name for f in fields(TextDataSpec)} - {"extra"}
    for key in raw:
        if key not in allowed:
            raise DataSpecError(f"{where}.{key}: unknown key; allowed keys are {sorted(allowed)}")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise DataSpecError(f"{where}.sources: must be a non-empty list of sources")
    parsed = tuple(parse_source(source, f"{where}.sources[{i}]") for i, source in enumerate(sources))
    values = {key: raw[key] for key in allowed - {"sources"} if key in raw}
    positive = ("seq_len", "streams_per_rank", "min_shards", "tokenize_batch_docs")
    for key in positive + ("seed", "shuffle_buffer"):
        if key in values:
            _check_type(f"{where}.{key}", values[key], int, "an integer")
    for key in positive:
        if key in values and values[key] < 1:
            raise DataSpecError(f"{where}.{key}: must be >= 1, got {values[key]}")
    if values.get("shuffle_buffer", 0) < 0:
        raise DataSpecError(f"{where}.shuffle_buffer: must be >= 0, got {values['shuffle_buffer']}")
    if "max_bad_fraction" in values:
        _check_type(f"{where}.max_bad_fraction", values["max_bad_fraction"], (int, float), "a number")
        if not 0 <= values["max_bad_fraction"] <= 1:
            raise DataSpecError(f"{where}.max_bad_fraction: must be in [0, 1], got {values['max_bad_fraction']}")
    return TextDataSpec(sources=parsed, **values)

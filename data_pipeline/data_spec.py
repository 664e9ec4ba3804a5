"""A run's ``data`` (or ``eval_data``) section of any kind: one discriminated union on ``kind``.

``kind: text`` is a pretraining token stream ([`TextDataSpec`]), ``kind: image`` an image classification stream
([`ImageDataSpec`]), ``kind: labelled`` labelled text for sequence classification ([`LabelledTextSpec`]).

A mapping without ``kind`` (the configs, run directories and checkpoint manifests written before ``kind`` existed)
gets it from the old inference rule, here and nowhere else ([`infer_kind`]):

1. ``image`` when ``image_size`` is set or a source is a ``folder``, a ``tar`` or a built-in image source
   (``fashion-mnist``, also as a plain string);
2. else ``labelled`` when ``max_length``, ``label_field`` or ``labels`` is set, or a source is a labelled built-in
   (``rotten-tomatoes``);
3. else ``text``.

Dumping a spec (``spec.model_dump(mode="json")``) always writes ``kind``, and the dump parses back to an equal
spec.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from .errors import DataSpecError
from .image_spec import BUILTIN_IMAGE_SOURCES, ImageDataSpec
from .labelled import LABELLED_BUILTINS, LabelledTextSpec
from .spec import TextDataSpec, require_mapping, validate_spec

KINDS = {"text": TextDataSpec, "image": ImageDataSpec, "labelled": LabelledTextSpec}
DATA_SPECS = tuple(KINDS.values())


def is_image_data(raw: Any) -> bool:
    """Rule 1 of [`infer_kind`]: a ``data`` mapping that describes images."""
    if not isinstance(raw, dict):
        return False
    if "image_size" in raw:
        return True
    for source in raw.get("sources") or []:
        if isinstance(source, str) and source in BUILTIN_IMAGE_SOURCES:
            return True
        if isinstance(source, dict) and (
            source.get("folder") or source.get("tar") or source.get("builtin") in BUILTIN_IMAGE_SOURCES
        ):
            return True
    return False


def is_labelled_text(raw: Any) -> bool:
    """Rule 2 of [`infer_kind`]: a ``data`` mapping that describes labelled text."""
    if not isinstance(raw, dict):
        return False
    if any(key in raw for key in ("max_length", "label_field", "labels")):
        return True
    for source in raw.get("sources") or []:
        name = source if isinstance(source, str) else source.get("builtin") if isinstance(source, dict) else None
        if name in LABELLED_BUILTINS:
            return True
    return False


def infer_kind(raw: Any) -> str:
    """The ``kind`` of a data mapping: its own, else the one the old rule (module doc) infers."""
    if isinstance(raw, dict) and raw.get("kind") is not None:
        return raw["kind"]
    return "image" if is_image_data(raw) else "labelled" if is_labelled_text(raw) else "text"


def _with_kind(raw: Any) -> Any:
    return {**raw, "kind": infer_kind(raw)} if isinstance(raw, dict) else raw


DataSpec = Annotated[
    TextDataSpec | ImageDataSpec | LabelledTextSpec, Field(discriminator="kind"), BeforeValidator(_with_kind)
]
"""The type of a run's ``data`` field: a mapping without ``kind`` gets the inferred one."""


def parse_data(raw: Any, where: str = "data") -> TextDataSpec | ImageDataSpec | LabelledTextSpec:
    """A ``data`` mapping of any kind, validated by its kind's model; one-line errors name the key."""
    kind = infer_kind(require_mapping(raw, where))
    if kind not in KINDS:
        raise DataSpecError(f"{where}.kind: {kind!r} is not one of {list(KINDS)}")
    return validate_spec(KINDS[kind], {**raw, "kind": kind}, where)

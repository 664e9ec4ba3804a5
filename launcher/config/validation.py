"""Pydantic validation as the project's one-line errors: ``KEY: MESSAGE (got VALUE)``, raised as ``ConfigError``.

Every config the launcher reads (run configs, sweep files, Slurm job options) is a pydantic model; its first problem
becomes one line naming the key. A caller chooses how a key is spelt (``name``: dotted for files, ``--flag`` for the
command line). A validator that raises ``ConfigError`` instead of ``ValueError`` writes the whole message itself (the
value included, where it belongs), so nothing is added but the key.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from launcher.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def dotted(loc: tuple) -> str:
    """A location as a dotted key: ``("train", "max_steps")`` -> ``train.max_steps``."""
    return ".".join(str(part) for part in loc)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names of the (sub)model at ``loc``, or None where ``loc`` leads out of models."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        candidates = (field.annotation, *typing.get_args(field.annotation)) if field else ()
        model = next((item for item in candidates if isinstance(item, type) and issubclass(item, BaseModel)), None)
        if model is None:
            return None
    return list(model.model_fields)


def first_error(
    error: ValidationError, name: Callable[[tuple], str] = dotted, model: type[BaseModel] | None = None
) -> str:
    """The first problem as one line. With ``model``, an unknown key's message lists the keys allowed there."""
    detail = error.errors()[0]
    where = name(detail["loc"])
    cause = detail.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):  # the validator's own complete message
        return f"{where}: {cause}" if where else str(cause)
    message = detail["msg"].removeprefix("Value error, ")
    if detail["type"] == "extra_forbidden":
        allowed = _fields_at(model, detail["loc"][:-1]) if model is not None else None
        message = f"unknown key; allowed keys are {sorted(allowed)}" if allowed else "unknown key"
    elif detail["type"] == "missing":
        message = "required"
    got = detail.get("input")
    suffix = (
        f" (got {got!r})" if detail["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict) else ""
    )
    return f"{where or 'config'}: {message}{suffix}"


def validate(model: type[M], raw: Any, source: str | None = None, name: Callable[[tuple], str] = dotted) -> M:
    """``model.model_validate(raw)``; its first problem as a ``ConfigError``, ``SOURCE: KEY: MESSAGE``."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        message = first_error(error, name, model)
        raise ConfigError(f"{source}: {message}" if source else message) from None

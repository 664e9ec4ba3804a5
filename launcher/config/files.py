"""Reading config files: YAML with one-line errors that name the file and line."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from launcher.errors import ConfigError, MissingInputError


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``3e-4`` is a float as in YAML 1.2 (YAML 1.1 reads it as a string)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml_value(text: str):
    """A YAML scalar or collection (a dotted override's value), with the loader above."""
    return yaml.load(text, Loader=YamlLoader)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such config file")
    try:
        data = yaml.load(path.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` merged into ``base`` (in place): nested mappings merge, anything else replaces."""
    for key, value in update.items():
        base[key] = (
            deep_merge(base.get(key, {}), value)
            if isinstance(value, dict) and isinstance(base.get(key), dict)
            else value
        )
    return base


def load_config_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config whose optional ``base: other.yaml`` (relative to the file) is read first and overridden by the
    file's own keys — so the published-size configs share one recipe file."""
    path = Path(path)
    raw = load_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be a path to another YAML config (got {base!r})")
    base_path = (path.parent / base).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base: {base} includes itself")
    return deep_merge(load_config_tree(base_path, (*_seen, path.resolve())), raw)

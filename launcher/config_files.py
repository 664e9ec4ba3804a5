"""Reading config files: YAML with one-line errors that name the file and line."""

from __future__ import annotations

from pathlib import Path

import yaml


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return data

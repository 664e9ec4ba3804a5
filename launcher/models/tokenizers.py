"""Resolve the ``tokenizer`` of a run config:

- ``gpt2``: GPT-2's exact BPE (50257 tokens), rebuilt offline;
- a directory holding an HF tokenizer (``AutoTokenizer.from_pretrained``);
- ``bpe:N``: a byte-level BPE of N tokens trained on the run's own training text (the first ``BPE_TRAINING_BYTES``
  of its shards, in plan order) when the run starts, saved in ``<output_dir>/tokenizer/`` and reused from there on
  resume and by the export. Small models on small corpora train far faster with it than with GPT-2's vocabulary,
  whose output layer would dominate their FLOPs.
"""

from __future__ import annotations

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
    from crate_lm.tokenization import train_bpe_tokenizer
    from data_pipeline.sources import read_shard
    from data_pipeline.text_stream import build_plan

    plan = build_plan(data_spec, 1)
    saved.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=saved.parent, prefix=".tokenizer-") as scratch:
        corpus = Path(scratch) / "corpus.txt"
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
        tokenizer = train_bpe_tokenizer([corpus], int(match.group(1)))
        staging = Path(scratch) / "tokenizer"
        tokenizer.save_pretrained(staging)
        staging.replace(saved)  # atomic: a crash never leaves a half-written tokenizer to be reused


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

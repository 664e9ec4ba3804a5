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


def trained_tokenizer_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "tokenizer"


def prepare_tokenizer(name: str, output_dir: str | Path, data_spec) -> None:
    """Train and save a ``bpe:N`` tokenizer unless the run already has one; other names need nothing. Call from one
    process (the launcher, or rank 0 before a barrier)."""
    match = BPE_PATTERN.match(name)
    saved = trained_tokenizer_dir(output_dir)
    if not match or (saved / "tokenizer.json").is_file():
        return
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
            raise ConfigError(f"{where}: {name!r} has not been trained for this run yet ({saved} is missing)")
        return AutoTokenizer.from_pretrained(saved)
    if not Path(name).is_dir():
        raise ConfigError(f"{where}: {name!r} is neither 'gpt2', bpe:N nor a directory holding a tokenizer")
    return AutoTokenizer.from_pretrained(name)

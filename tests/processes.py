"""Watching real processes from tests (the ranks of a run, a launcher's children)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil


def ended(pid: int) -> bool:
    """Exited: gone, or a zombie waiting for whoever adopted it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition()`` holds within ``seconds`` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    return condition()


def children_of(parent: int) -> list[int]:
    """The process ids of ``parent``'s children (Linux), in the order they were started."""
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []

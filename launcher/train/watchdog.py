"""The progress watchdog: a rank that makes no progress for ``train.collective_timeout_minutes`` stops with one line.

A hung or dead peer leaves every other rank blocked inside a collective, in C code that neither returns nor lets a
signal handler run. The loop ``pet``s the watchdog at each phase boundary (the setup's parts, each optimizer step,
each side job — an evaluation, a checkpoint save —, the final barrier); a daemon thread checks the time since the
last pet and, past the timeout, prints ``rank R: no progress for N min in PHASE (step S); a rank is hung or dead -
stopping (train.collective_timeout_minutes)`` to stderr and ends the process with ``HUNG_EXIT_CODE`` (``os._exit``:
the main thread is stuck and would never unwind). Each phase has the whole timeout to itself, so the longest
legitimate one (the first step's compile, a large save or evaluation) must fit in it.

The process group's own collective timeout (gloo and NCCL honour it) is ``PROCESS_GROUP_MARGIN`` longer: the backstop
should this thread not get to run, and late enough that the watchdog's line comes first.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

HUNG_EXIT_CODE = 124  # timeout(1)'s code: distinct from an error (1), a user's mistake (2) and Ctrl-C (130)
PROCESS_GROUP_MARGIN = timedelta(minutes=1)


def process_group_timeout(timeout_minutes: float) -> timedelta:
    """The collective timeout to give the process group: the watchdog's plus a margin, so the watchdog speaks first."""
    return timedelta(minutes=timeout_minutes) + PROCESS_GROUP_MARGIN


class Watchdog:
    """Ends this rank when ``pet`` has not been called for ``timeout_minutes``; a context manager (the thread runs
    inside the ``with`` block)."""

    def __init__(self, timeout_minutes: float, rank: int):
        self.timeout_minutes = timeout_minutes
        self.rank = rank
        self._progress = (time.monotonic(), "the start", 0)  # one tuple, replaced whole: no lock between the threads
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="crate-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def pet(self, phase: str, step: int) -> None:
        """Progress: the rank enters ``phase`` (after ``step`` optimizer steps); the timeout starts again."""
        self._progress = (time.monotonic(), phase, step)

    def _watch(self) -> None:
        timeout = 60 * self.timeout_minutes
        while not self._done.wait(min(5.0, timeout / 10)):
            since, phase, step = self._progress
            if time.monotonic() - since > timeout:
                self._stop_the_process(phase, step)

    def _stop_the_process(self, phase: str, step: int) -> None:
        sys.stdout.flush()
        sys.stderr.write(
            f"rank {self.rank}: no progress for {self.timeout_minutes:g} min in {phase} (step {step}); a rank is hung "
            "or dead - stopping (train.collective_timeout_minutes)\n"
        )
        sys.stderr.flush()
        os._exit(HUNG_EXIT_CODE)

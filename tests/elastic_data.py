"""Helpers for the world-size-independent data order: run a loader's ranks in one process in the global order, and
resume across world sizes the way a run does (every rank's cursor merged, ``data_pipeline.stream.merge_cursors``).

``make(rank, world, state)`` builds one rank's loader (a stream loader or the labelled ``ExampleLoader``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from data_pipeline.stream import merge_cursors

MakeLoader = Callable[[int, int, dict | None], object]


def global_batches(make: MakeLoader, world: int, count: int, state: dict | None = None) -> tuple[list, list[dict]]:
    """The run's next ``count`` micro-batches at ``world`` ranks (the ``m``-th from rank ``m % world``), from
    ``state``, and every rank's cursor after them."""
    loaders = [make(rank, world, state) for rank in range(world)]
    iterators = [iter(loader) for loader in loaders]
    batches = [next(iterators[m % world]) for m in range(count)]
    return batches, [loader.state_dict() for loader in loaders]


def resumed_across(make: MakeLoader, segments: list[tuple[int, int]]) -> list:
    """The run's micro-batches when it runs ``(world, count)`` segment after segment, each resumed from the merged
    cursors of the one before."""
    got, state = [], None
    for world, count in segments:
        batches, cursors = global_batches(make, world, count, state)
        got += batches
        state = merge_cursors(cursors)
    return got


def same_batches(got: list, expected: list, key: str) -> bool:
    return len(got) == len(expected) and all(torch.equal(a[key], b[key]) for a, b in zip(got, expected))


def check_refusals(make: MakeLoader, error: type[Exception]) -> None:
    """A world size that does not divide the run's 4 logical streams, and a rank's cursor left out, are refused."""
    _, cursors = global_batches(make, 2, 6)
    with pytest.raises(error, match="do not divide among 3 ranks"):
        make(0, 3, merge_cursors(cursors))
    with pytest.raises(error, match="crate_rank"):
        make(0, 1, merge_cursors(cursors[:1]))

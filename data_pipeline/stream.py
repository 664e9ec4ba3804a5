"""One resumable, mixed, sharded stream, for every kind of data; the kinds only say how a shard is read and decoded.

Layout. A run has ``L`` *logical streams*, fixed for its whole life: ``data.num_streams``, else
``streams_per_rank`` x the world size of its first start (recorded in the cursor). Stream ``g`` owns shard ``i`` of
every source when ``i % L == g``. Micro-batches are numbered globally: the run's ``m``-th micro-batch (over all
ranks, ``m = M + c * W + r`` for the ``c``-th micro-batch of rank ``r`` of ``W`` after ``M`` were consumed) is the
next batch of stream ``m % L``. So rank ``r`` serves the ``L / W`` streams ``g = b + W * s`` with
``b = (M + r) % W`` (*interleaved*; ``W`` must divide ``L``), round-robin, and step ``n`` of a run with a fixed
global batch reads the same blocks from the same streams at any world size (in another order inside the step
only). On resume at another world size each rank takes its streams' cursors from whichever rank saved them
([`merge_cursors`]). DataLoader workers only execute a rank's streams (worker ``w`` of ``K`` runs every ``K``-th
of them), so the number of workers never changes the data either. Shards never depend on the world size, so the
set of items of an epoch is the same for any number of ranks and workers. (Cursors written before this layout
number streams contiguously, ``g = r * S + s``, and resume only on their own world size.)

Mixing. A stream draws each item (a text block, an image record) from source ``j`` with the configured weights, by
the counter-based hash ``uniform(seed, stream, mixed, 1)``; each source loops over its shards epoch after epoch
(shard order permuted per epoch with ``epoch_order``), so streams never run dry and every rank yields a batch at
every step. A stream whose source yields nothing in a whole epoch stops with [`BadDataError`] (it would loop on
forever).

Shuffle buffer. ``shuffle_buffer`` items are held between the sources and the output; the slot an item leaves from
is ``uniform(seed, stream, emitted, 2)``. The buffer is part of the cursor, in the form each kind chooses (text:
the blocks; images: references that are read back on resume).

Cursor. After every batch the stream's state is attached: per source ``(epoch, shard index, position, ...)``, the
mixing and emission counters and the statistics (bad records per reason and per file, with the first few
locations) — and of the shuffle buffer only the slots the batch changed (``buffer_delta``: about a batch's worth of
items, however large the buffer). [`StreamLoader`] keeps, per stream, the state of the last batch consumed and the
buffer patched slot by slot; the whole cursor is copied out only when a checkpoint asks for it (``state_dict``).
Resuming seeks to those positions: O(1) in the step, no replay. Resuming with another source (fingerprint), seed,
weights, micro-batch size or number of logical streams is refused with a one-line error; another world size is not.

A kind is a [`MixedStream`] subclass (``text_stream.LogicalStream``, ``image_stream.ImageStream``) and a
[`StreamLoader`] subclass (``TextLoader``, ``ImageLoader``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import BadDataError, DataError, DataSpecError

FIRST_BAD_LOCATIONS = 5  # kept per file in the statistics
SHOWN_BAD_LOCATIONS = 3  # of them, in a run's metrics and warnings
SHOWN_BAD_SOURCES = 10  # files named in a run's metrics and warnings (the others summed in one entry)
MIN_RECORDS_FOR_BAD_FRACTION = 200
DATA_ERROR = "data_error"  # the key of the item that carries a stream's DataError out of a DataLoader worker
INTERLEAVED, CONTIGUOUS = "interleaved", "contiguous"  # stream layouts (module doc); contiguous: old cursors only


# ---------------------------------------------------------------------------------------------------- plan


class StreamAssignment:
    """Shard ``i`` of a source belongs to logical stream ``i % num_streams`` (a mixin of the text and image plans,
    which provide ``spec``, ``shards``, ``world_size`` and ``num_streams``)."""

    @property
    def streams_per_rank(self) -> int:
        return self.num_streams // self.world_size

    def stream_shards(self, stream: int, source_index: int) -> list:
        return [shard for i, shard in enumerate(self.shards[source_index]) if i % self.num_streams == stream]

    def with_streams(self, num_streams: int):
        """This plan with the ``num_streams`` logical streams of a run being resumed (checked like a new one)."""
        if num_streams == self.num_streams:
            return self
        check_every_stream_gets_data(self.spec, self.shards, self.world_size, num_streams)
        return dataclasses.replace(self, num_streams=num_streams)


def logical_streams(spec, world_size: int, saved: int | None = None) -> int:
    """The run's number of logical streams: ``saved`` (a resumed run's, fixed at its first start), else
    ``data.num_streams``, else ``streams_per_rank x world_size``; one-line errors when it cannot be honoured."""
    if world_size < 1:
        raise DataSpecError(f"world_size must be >= 1, got {world_size}")
    if saved is not None and spec.num_streams is not None and spec.num_streams != saved:
        raise DataSpecError(
            f"data.num_streams: the run has {saved} logical streams, fixed at its first start (they decide the data "
            f"order); it cannot change to {spec.num_streams}: leave data.num_streams out or set it to {saved}"
        )
    streams = saved or spec.num_streams or world_size * spec.streams_per_rank
    if streams % world_size:
        raise DataSpecError(
            f"data.num_streams: the run's {streams} logical streams do not divide among {world_size} ranks; use a "
            f"world size that divides {streams} (each rank serves the same number of streams)"
        )
    return streams


def check_every_stream_gets_data(spec, shards, world_size: int, num_streams: int) -> None:
    """One-line error, before training, when a source has fewer shards than the run has logical streams."""
    for index, source_shards in enumerate(shards):
        if len(source_shards) < num_streams:
            raise DataSpecError(
                f"data.sources[{index}]: {spec.sources[index].label!r} has {len(source_shards)} shards but the run "
                f"has {num_streams} logical streams (world size {world_size} x {num_streams // world_size} per "
                f"rank); lower data.num_streams or data.streams_per_rank, raise data.min_shards, or add files"
            )


def rank_streams(layout: str, rank: int, world_size: int, per_rank: int, consumed: int) -> tuple[list[int], int]:
    """The logical streams rank ``rank`` serves after the run consumed ``consumed`` micro-batches (all ranks), in
    round-robin order, and the position in that order of the stream its next micro-batch comes from (module doc)."""
    after = consumed + rank
    first = (after // world_size) % per_rank
    if layout == CONTIGUOUS:
        return [rank * per_rank + s for s in range(per_rank)], first
    return [after % world_size + world_size * s for s in range(per_rank)], first


def stream_batches(stream: int, num_streams: int, consumed: int) -> int:
    """How many of the first ``consumed`` global micro-batches came from ``stream`` (interleaved layout)."""
    return max(0, (consumed - stream + num_streams - 1) // num_streams)


def merge_cursors(cursors: list[dict]) -> dict:
    """One run-wide data cursor from every rank's (``state_dict()`` of each rank's loader): the streams' states
    united, what every rank must agree on checked. A cursor without streams (the labelled loader's) is the same
    on every rank, and is returned as it is."""
    first = cursors[0]
    if "streams" not in first:
        if any(cursor != first for cursor in cursors):
            raise DataSpecError("data cursor: the ranks' cursors differ; the checkpoint is inconsistent")
        return first
    if any(cursor.get("meta", {}).get("layout") != INTERLEAVED for cursor in cursors):
        raise DataSpecError(
            f"data cursor: written before the interleaved stream layout, so each rank's streams are its own: it "
            f"resumes only on its own world size ({len(cursors)} ranks); see docs/data.md"
        )
    for key in ("meta", "consumed"):
        if any(cursor[key] != first[key] for cursor in cursors):
            raise DataSpecError(f"data cursor: the ranks' {key!r} differ; the checkpoint is inconsistent")
    streams: dict = {}
    for cursor in cursors:
        streams.update(cursor["streams"])
    return {**first, "streams": streams}


# ---------------------------------------------------------------------------------------------------- randomness


def uniform(*keys: int) -> float:
    """A deterministic uniform number in [0, 1) from integer keys (counter-based: no state to save)."""
    digest = hashlib.blake2b(np.array(keys, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def epoch_order(count: int, seed: int, source: int, stream: int, epoch: int) -> list[int]:
    rng = np.random.Generator(np.random.PCG64([seed, source, stream, epoch]))
    return rng.permutation(count).tolist()


# ---------------------------------------------------------------------------------------------------- statistics


def new_stats(counters: tuple[str, ...]) -> dict:
    """Zeroed statistics: the kind's ``counters``, bad records per reason and per file."""
    return {**dict.fromkeys(counters, 0), "bad": {}, "bad_files": {}}


def count_bad(stats: dict, reason: str, where: str, location: str) -> None:
    """Count one bad record of ``where`` (a file), keeping the first few locations inside it."""
    stats["bad"][reason] = stats["bad"].get(reason, 0) + 1
    per_file = stats["bad_files"].setdefault(where, {"counts": {}, "first": []})
    per_file["counts"][reason] = per_file["counts"].get(reason, 0) + 1
    if len(per_file["first"]) < FIRST_BAD_LOCATIONS:
        per_file["first"].append(f"{location}: {reason}")


def worst_file(stats: dict) -> str:
    """``worst file PATH: [its first bad locations]``: the file with the most bad records (``stats`` has some)."""
    path, entry = max(stats["bad_files"].items(), key=lambda item: sum(item[1]["counts"].values()))
    return f"worst file {path}: {entry['first']}"


def check_bad_fraction(
    stats: dict, max_fraction: float, good_key: str, explain: Callable[[dict], str] = lambda stats: ""
) -> None:
    """Stop the run (``BadDataError``) once enough records were seen and too many of them were bad; ``explain``
    adds what the kind knows about the reasons (e.g. which text field was looked for)."""
    bad = sum(stats["bad"].values())
    records = bad + stats[good_key]
    if records >= MIN_RECORDS_FOR_BAD_FRACTION and bad > max_fraction * records:
        raise BadDataError(
            f"data.max_bad_fraction={max_fraction} exceeded: {bad} bad of {records} records "
            f"({stats['bad']}{explain(stats)}); {worst_file(stats)}"
        )


def merge_stats(all_stats: list[dict], counters: tuple[str, ...] = ()) -> dict:
    """Sum the statistics of several streams (or ranks): every counter, and the bad records per reason and file."""
    total = new_stats(counters)
    for stats in all_stats:
        for key, value in stats.items():
            if key not in ("bad", "bad_files"):
                total[key] = total.get(key, 0) + value
        for reason, count in stats["bad"].items():
            total["bad"][reason] = total["bad"].get(reason, 0) + count
        for where, entry in stats["bad_files"].items():
            merged = total["bad_files"].setdefault(where, {"counts": {}, "first": []})
            for reason, count in entry["counts"].items():
                merged["counts"][reason] = merged["counts"].get(reason, 0) + count
            merged["first"] = (merged["first"] + entry["first"])[:FIRST_BAD_LOCATIONS]
    return total


def bad_locations(stats: dict) -> list[str]:
    """The first bad records of ``stats``, file after file, each ``"<file>: <location>: <reason>"``."""
    return [f"{where}: {first}" for where, entry in stats["bad_files"].items() for first in entry["first"]]


def bad_record_summary(stats: dict) -> dict | None:
    """What a run reports of the bad records in ``stats`` (``None`` when there are none): ``total``, ``by_reason``,
    ``by_source`` (per file, most first; beyond ``SHOWN_BAD_SOURCES`` files the rest are one ``"(N other files)"``
    entry, so that a log row stays small) and the ``first`` few locations."""
    total = sum(stats["bad"].values())
    if not total:
        return None
    per_file = sorted(
        ((where, sum(entry["counts"].values())) for where, entry in stats["bad_files"].items()), key=lambda x: -x[1]
    )
    by_source = dict(per_file[:SHOWN_BAD_SOURCES])
    if len(per_file) > SHOWN_BAD_SOURCES:
        by_source[f"({len(per_file) - SHOWN_BAD_SOURCES} other files)"] = sum(
            n for _, n in per_file[SHOWN_BAD_SOURCES:]
        )
    return {
        "total": total,
        "by_reason": dict(stats["bad"]),
        "by_source": by_source,
        "first": bad_locations(stats)[:SHOWN_BAD_LOCATIONS],
    }


# ---------------------------------------------------------------------------------------------------- one stream


class MixedStream:
    """One logical stream ``g``: its sources' shards, mixed by weight, optionally shuffled; resumable exactly.

    A kind provides ``COUNTERS`` (its statistics), ``GOOD`` (the counter of good records, for the bad fraction),
    ``ITEM`` (what it yields, for messages), ``SHARD_START`` (the cursor fields of a shard not started yet),
    ``_read(j, shard, cursor)`` (the items of one shard from the cursor, which it advances), and how its shuffle
    buffer is saved (``_buffer_state``) and restored (``_restore_buffer``). An item is a tuple whose last element is
    the source epoch; the buffer holds ``(item, source index)`` pairs.
    """

    COUNTERS: tuple[str, ...] = ()
    GOOD = ""
    ITEM = "item"
    SHARD_START: dict = {"position": None}
    BUFFER_KEYS: tuple[str, ...] = ("buffer",)  # the state keys _buffer_state writes

    def __init__(self, plan, stream: int, state: dict | None = None):
        self.plan, self.stream, self.spec = plan, stream, plan.spec
        self.state = copy.deepcopy(state) if state is not None else self.initial_state()
        self.buffer: list = self._restore_buffer(self.state)
        self.changed_slots: dict[int, tuple] = {}  # buffer slots written since the last batch_cursor()
        self.sources = [self._source_items(j) for j in range(len(self.spec.sources))]
        self.cumulative = np.cumsum(self.spec.weights)

    def initial_state(self) -> dict:
        return {
            "sources": [{"epoch": 0, "shard": 0, **self.SHARD_START} for _ in self.spec.sources],
            "mixed": 0,  # items drawn from the sources (the mixing counter)
            "emitted": 0,  # items given out (the shuffle counter; images: the augmentation counter)
            "batches": 0,  # batches given out (where the stream is in the run's order of micro-batches)
            **self._buffer_state([]),
            "stats": new_stats(self.COUNTERS),
        }

    # --- per kind

    def _read(self, j: int, shard, cursor: dict) -> Iterator[tuple]:
        raise NotImplementedError

    def _buffer_state(self, buffer: list) -> dict:
        raise NotImplementedError

    def _restore_buffer(self, state: dict) -> list:
        raise NotImplementedError

    def _buffered(self, item: tuple) -> tuple:
        """The item as the buffer keeps it (text: a copy of the block, which is a view of a larger array)."""
        return item

    # --- shared

    def _source_items(self, j: int) -> Iterator[tuple]:
        """Endless items of source ``j`` for this stream, updating ``state['sources'][j]`` as they go."""
        shards = self.plan.stream_shards(self.stream, j)
        cursor = self.state["sources"][j]
        whole_epoch = cursor["shard"] == 0 and cursor["position"] is None  # this pass sees every shard
        while True:
            order = epoch_order(len(shards), self.spec.seed, j, self.stream, cursor["epoch"])
            good = 0
            while cursor["shard"] < len(shards):
                for item in self._read(j, shards[order[cursor["shard"]]], cursor):
                    good += 1
                    yield item
                cursor.update(shard=cursor["shard"] + 1, **self.SHARD_START)
            if whole_epoch and not good:  # looping on would never yield
                raise BadDataError(
                    f"data.sources[{j}]: {self.spec.sources[j].label!r}: stream {self.stream} read "
                    f"all its {len(shards)} shards and found no usable {self.ITEM} ({self.why_nothing_usable()})"
                )
            whole_epoch = True
            cursor.update(epoch=cursor["epoch"] + 1, shard=0)

    def explain_bad(self, stats: dict) -> str:
        """What the kind adds to the bad-record counts in a message (``"; ..."``), e.g. the field looked for."""
        return ""

    def why_nothing_usable(self) -> str:
        """Why a whole epoch of a source gave no item, for the one-line error: the bad records and the worst file,
        from the statistics so far (the kinds add what else leaves nothing, e.g. text too short for a block)."""
        stats = self.state["stats"]
        if not stats["bad"]:
            return "its shards hold no records"
        return f"{sum(stats['bad'].values())} bad records {stats['bad']}{self.explain_bad(stats)}; {worst_file(stats)}"

    def count_bad(self, reason: str, where: str, location: str) -> None:
        """Count a bad record and stop the run when there are too many."""
        stats = self.state["stats"]
        count_bad(stats, reason, where, location)
        check_bad_fraction(stats, self.spec.max_bad_fraction, self.GOOD, self.explain_bad)

    def next_item(self) -> tuple[tuple, int, int]:
        """``(item, source index, emission index)`` of the next item after mixing and shuffling."""
        state = self.state
        while True:
            u = uniform(self.spec.seed, self.stream, state["mixed"], 1)
            j = min(int(np.searchsorted(self.cumulative, u * self.cumulative[-1], side="right")), len(self.sources) - 1)
            item = next(self.sources[j])
            state["mixed"] += 1
            if self.spec.shuffle_buffer:
                if len(self.buffer) < self.spec.shuffle_buffer:
                    self.changed_slots[len(self.buffer)] = entry = (self._buffered(item), j)
                    self.buffer.append(entry)
                    continue
                slot = int(uniform(self.spec.seed, self.stream, state["emitted"], 2) * len(self.buffer))
                self.changed_slots[slot] = entry = (self._buffered(item), j)
                (item, j), self.buffer[slot] = self.buffer[slot], entry
            state["emitted"] += 1
            return item, j, state["emitted"] - 1

    def _state_without_buffer(self) -> dict:
        return copy.deepcopy({k: v for k, v in self.state.items() if k not in self.BUFFER_KEYS})

    def snapshot(self) -> dict:
        """A copy of the whole state, the buffer in its saved form (what a checkpoint holds)."""
        return {**self._state_without_buffer(), **self._buffer_state(self.buffer)}

    def batch_cursor(self) -> dict:
        """What a batch carries as the cursor: a copy of the state without the buffer, and the buffer's slots written
        since the previous batch, in saved form (``buffer_delta``: ``length``, ``slots`` and the kind's
        ``BUFFER_KEYS`` for those slots). [`patch_cursor`] applies it to the previous cursor. Called once per batch:
        it counts the batch."""
        self.state["batches"] = self.state.get("batches", 0) + 1
        state = self._state_without_buffer()
        slots = sorted(self.changed_slots)
        state["buffer_delta"] = {
            "length": len(self.buffer),
            "slots": np.asarray(slots, dtype=np.int64),
            **self._buffer_state([self.changed_slots[slot] for slot in slots]),
        }
        self.changed_slots = {}
        return state

    def next_batch(self, micro_batch_size: int) -> dict:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- a rank's loader


def patch_cursor(previous: dict | None, cursor: dict, buffer_keys: tuple[str, ...]) -> dict:
    """The whole cursor after a batch: ``cursor`` (a [`MixedStream.batch_cursor`]) with its ``buffer_delta``
    written into the buffer of ``previous`` (the stream's cursor before the batch: ``None`` before its first one).
    The previous buffer arrays are reused and patched in place; they grow while the buffer fills."""
    delta = cursor.pop("buffer_delta")
    length, slots = int(delta["length"]), np.asarray(delta["slots"], dtype=np.int64)
    for key in buffer_keys:
        rows = np.asarray(delta[key])  # a tensor after DataLoader's conversion
        old = np.asarray(previous[key]) if previous is not None else rows[:0]
        if not old.size:  # an empty buffer saved as a list has no row shape
            old = rows[:0]
        if len(old) < length:  # filling: grow to the new length (the new slots are all in the delta)
            old = np.concatenate([old, np.empty((length - len(old), *rows.shape[1:]), dtype=rows.dtype)])
        old[slots] = rows
        cursor[key] = old
    return cursor


class _RankStreams(IterableDataset):
    """The logical streams of one rank (``streams``: their ids, in round-robin order), run round-robin from position
    ``first``; with DataLoader workers, worker ``w`` of ``K`` runs the positions ``first + w + k K`` so that the
    rank's batches still come in the round-robin order."""

    def __init__(
        self,
        new_stream: Callable[..., MixedStream],
        plan,
        streams: list[int],
        first: int,
        micro_batch_size: int,
        states: dict,
    ):
        self.new_stream, self.plan, self.streams, self.first = new_stream, plan, streams, first
        self.micro_batch_size, self.states = micro_batch_size, states

    def __iter__(self):
        per_rank = len(self.streams)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        order = [self.streams[(self.first + worker + k * workers) % per_rank] for k in range(per_rank // workers)]
        try:
            streams = {g: self.new_stream(self.plan, g, state=self.states.get(g)) for g in order}
            while True:
                for g in order:
                    yield streams[g].next_batch(self.micro_batch_size)
        except DataError as error:
            # Passed on as an item: a DataLoader worker would re-raise it with its traceback in the message, and
            # the one line the user should see would be lost in it.
            yield {DATA_ERROR: error}


def plan_for_cursor(plan, state: dict | None):
    """``plan`` with the logical streams of the run ``state`` (a data cursor, or ``None``) belongs to."""
    if state is None:
        return plan
    meta = state.get("meta", {})
    saved = meta.get("num_streams") or meta.get("world_size", 0) * meta.get("streams_per_rank", 0) or None
    return plan.with_streams(logical_streams(plan.spec, plan.world_size, saved))


class StreamLoader:
    """A rank's batches from its logical streams, with the cursor the trainer checkpoints. A kind provides
    ``OUTPUT_KEYS``, ``COUNTERS``, ``_new_stream`` (a callable ``(plan, stream, state=)`` → [`MixedStream`],
    picklable for DataLoader workers) and ``_specific_meta()`` (what else must match to resume).

    ``state_dict()`` is the data cursor after the last batch yielded: ``meta`` (what must match to resume),
    ``consumed`` (the run's micro-batches so far, over all ranks; exact at step boundaries, where every rank has
    consumed as many) and ``streams`` (this rank's streams' states, by stream id). Building the loader with ``state=``
    — this rank's cursor, or the run's from [`merge_cursors`] at another world size — resumes exactly there, after
    checking that the run reads the same data the same way (one-line error otherwise).
    """

    OUTPUT_KEYS: tuple[str, ...] = ()
    COUNTERS: tuple[str, ...] = ()
    BUFFER_KEYS: tuple[str, ...] = MixedStream.BUFFER_KEYS  # the stream kind's
    _new_stream: Callable[..., MixedStream]

    def __init__(
        self,
        plan,
        rank: int,
        micro_batch_size: int,
        num_workers: int = 0,
        state: dict | None = None,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < plan.world_size:
            raise DataSpecError(f"rank {rank} is outside world size {plan.world_size}")
        self.plan, self.rank, self.micro_batch_size, self.num_workers = plan, rank, micro_batch_size, num_workers
        self.pin_memory = pin_memory  # batches in page-locked memory: asynchronous copies to a GPU
        self.layout, self.start, self.consumed, states = INTERLEAVED, 0, 0, {}
        if state is not None:
            self.plan = plan = plan_for_cursor(plan, state)
            state = self._current_format(state)
            self.layout, self.start = state["meta"]["layout"], state["consumed"]
            self._check_resumable(state)
            states = {int(g): st for g, st in state["streams"].items()}
        per_rank = plan.streams_per_rank
        if num_workers and per_rank % num_workers:
            raise DataSpecError(
                f"dataloader workers ({num_workers}) must divide the logical streams per rank ({plan.num_streams} "
                f"streams / {plan.world_size} ranks = {per_rank})"
            )
        self.streams, self.first = rank_streams(self.layout, rank, plan.world_size, per_rank, self.start)
        self.states = {g: states[g] for g in self.streams if g in states}
        if self.layout == INTERLEAVED:
            self._check_stream_positions()

    def _current_format(self, state: dict) -> dict:
        """A cursor written before the interleaved layout, in today's form (its contiguous layout kept): it resumes
        only on its own world size, on the rank that wrote it."""
        meta = state.get("meta", {})
        if "layout" in meta:
            return state
        saved_world, per_rank = meta.get("world_size"), meta.get("streams_per_rank")
        if saved_world != self.plan.world_size or meta.get("rank") != self.rank:
            raise DataSpecError(
                f"data cursor: written before the interleaved stream layout by rank {meta.get('rank')} of "
                f"{saved_world}; such a cursor resumes only on its own world size ({saved_world} ranks), and this "
                f"run has {self.plan.world_size}; see docs/data.md"
            )
        meta = {k: v for k, v in meta.items() if k not in ("rank", "streams_per_rank")}
        return {
            "meta": {**meta, "num_streams": saved_world * per_rank, "layout": CONTIGUOUS},
            "consumed": state["consumed"] * saved_world,
            "streams": {self.rank * per_rank + int(s): st for s, st in state["streams"].items()},
        }

    def _check_stream_positions(self) -> None:
        """Every stream of this rank is where the run's count of micro-batches says it is: a cursor missing from
        the checkpoint would otherwise restart its stream silently."""
        for g in self.streams:
            expected = stream_batches(g, self.plan.num_streams, self.start)
            found = self.states[g].get("batches", 0) if g in self.states else 0
            if found != expected:
                raise DataSpecError(
                    f"data cursor: logical stream {g} gave {found} batches, and the run's {self.start} micro-batches "
                    f"imply {expected}; is a rank's crate_rank*.json missing from the checkpoint?"
                )

    def _specific_meta(self) -> dict:
        return {}

    def _meta(self) -> dict:
        spec = self.plan.spec
        return {
            "fingerprint": self.plan.fingerprint,
            "num_streams": self.plan.num_streams,
            "layout": self.layout,
            "seed": spec.seed,
            "micro_batch_size": self.micro_batch_size,
            "weights": spec.weights,
            "shuffle_buffer": spec.shuffle_buffer,
            **({"world_size": self.plan.world_size} if self.layout == CONTIGUOUS else {}),  # it resumes only there
            **self._specific_meta(),
        }

    def _check_resumable(self, state: dict) -> None:
        saved, now = state.get("meta", {}), self._meta()
        if saved.get("fingerprint") != now["fingerprint"]:
            raise DataSpecError(
                f"data cursor: the sources changed since the checkpoint (fingerprint "
                f"{saved.get('fingerprint')} -> {now['fingerprint']}); refusing to resume a different "
                f"stream — restore the data or start a new run"
            )
        if "open_shards" in now and "open_shards" not in saved:
            raise DataSpecError(
                f"data cursor: saved before data.open_shards existed: resume it with data.open_shards=1 "
                f"(the run now reads {now['open_shards']} shards at once), or start a new run"
            )
        for key, value in now.items():
            if key != "fingerprint" and saved.get(key) != value:
                raise DataSpecError(
                    f"data cursor: {key} was {saved.get(key)} at the checkpoint and is {value} now; resuming "
                    f"needs the same value (see docs/data.md)"
                )

    def __iter__(self):
        dataset = _RankStreams(
            self._new_stream, self.plan, self.streams, self.first, self.micro_batch_size, self.states
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers else None,
            pin_memory=self.pin_memory,
        )
        for batch in loader:
            if DATA_ERROR in batch:
                raise batch[DATA_ERROR]
            stream = int(batch["stream"])
            self.states[stream] = patch_cursor(self.states.get(stream), batch["state"], self.BUFFER_KEYS)
            self.consumed += 1
            yield {key: batch[key] for key in self.OUTPUT_KEYS}

    def state_dict(self) -> dict:
        consumed = self.start + self.consumed * self.plan.world_size  # the run's, at a step boundary
        return {"meta": self._meta(), "consumed": consumed, "streams": copy.deepcopy(self.states)}

    def stats(self) -> dict:
        """The statistics passed so far by this rank's streams (counters and bad records)."""
        return merge_stats([state["stats"] for state in self.states.values()], self.COUNTERS)


# ---------------------------------------------------------------------------------------------------- inspect


def inspect_tail(
    stream: MixedStream,
    produce: Callable[[], Any],
    seconds: float,
    rate: Callable[[int, float], str],
    passed: Callable[[dict], str],
) -> list[str]:
    """The end of a ``crate data inspect`` report: throughput of ``produce`` on one stream for ``seconds``, what
    the stream passed so far (``passed(stats)``) and its bad records per file."""
    started, produced = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        produce()
        produced += 1
    stats = stream.state["stats"]
    lines = [
        f"throughput: {rate(produced, time.perf_counter() - started)} from one stream (one process)",
        f"passed so far: {passed(stats)}",
    ]
    for where, entry in stats["bad_files"].items():
        lines.append(f"  {where}: {entry['counts']} first at {entry['first']}")
    return lines

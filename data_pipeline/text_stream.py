"""The packed text stream: tokenize on the fly, pack into fixed-length blocks, shard, resume exactly.

Layout. Each rank runs ``streams_per_rank`` *logical streams*; stream ``g = rank * S + s`` of ``G = world * S`` owns
shard ``i`` of every source when ``i % G == g``. DataLoader workers only execute logical streams (worker ``w`` of
``W`` runs the streams ``s`` with ``s % W == w``), so the number of workers never changes the data a rank sees, and
batch ``n`` of a rank always comes from stream ``n % S``.

Packing. Documents are tokenized in batches, each followed by EOS, and cut into blocks of exactly ``seq_len`` tokens
with no padding (``labels = input_ids``: HF models shift inside). **Blocks never span shards**: a shard's last partial
block is dropped and counted (``tail_tokens``). Because shards do not depend on the world size, the set of blocks of
an epoch is the same for any number of ranks and workers.

Mixing and shuffling. A stream draws each block from source ``j`` with the configured weights, by a counter-based
hash of ``(seed, stream, block index)``; each source loops over its shards epoch after epoch (shard order permuted
per epoch), so streams never run dry and every rank yields a batch at every step. An optional shuffle buffer of
``shuffle_buffer`` blocks is kept in the cursor, so its effect on resume is exact.

Cursor. After every batch the stream's state is attached: per source ``(epoch, shard index, position, skip)`` —
where ``position`` is where the first not-fully-emitted document starts and ``skip`` how many of its tokens were
emitted (``-1``: all) — plus the mixing counter, the shuffle buffer and the bad-record counts. [`TextLoader`] keeps
the state of the last batch consumed from each stream; resuming seeks to those positions, re-tokenizes at most one
batch of documents per source, and continues with exactly the next block. Cost is O(1) in the step.
Resuming with another world size or ``streams_per_rank`` is refused (the shard → stream assignment would change);
so is a changed source (fingerprint).
"""

from __future__ import annotations

import copy
import hashlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .sources import Document, Shard, discover_shards, fingerprint, line_number, read_shard
from .errors import BadDataError, DataSpecError
from .spec import TextDataSpec

FIRST_BAD_LOCATIONS = 5
MIN_RECORDS_FOR_BAD_FRACTION = 200


# ---------------------------------------------------------------------------------------------------- plan


class StreamAssignment:
    """Shard ``i`` of a source belongs to logical stream ``i % num_streams`` (shared by the text and image plans,
    which provide ``spec``, ``shards`` and ``world_size``)."""

    @property
    def num_streams(self) -> int:
        return self.world_size * self.spec.streams_per_rank

    def stream_shards(self, stream: int, source_index: int) -> list:
        return [shard for i, shard in enumerate(self.shards[source_index]) if i % self.num_streams == stream]


def check_every_stream_gets_data(spec, shards, world_size: int) -> None:
    """One-line error, before training, when a source has fewer shards than the run has logical streams."""
    if world_size < 1:
        raise DataSpecError(f"world_size must be >= 1, got {world_size}")
    streams = world_size * spec.streams_per_rank
    for index, source_shards in enumerate(shards):
        if len(source_shards) < streams:
            raise DataSpecError(
                f"data.sources[{index}]: {spec.sources[index].label!r} has {len(source_shards)} shards but the run "
                f"has {streams} streams (world size {world_size} x data.streams_per_rank "
                f"{spec.streams_per_rank}); lower data.streams_per_rank, raise data.min_shards, or add files")


@dataclass(frozen=True)
class StreamPlan(StreamAssignment):
    """Everything fixed at start: validated spec, shards per source, fingerprint. Built once, before training."""

    spec: TextDataSpec
    shards: tuple[tuple[Shard, ...], ...]
    fingerprint: str
    world_size: int


def build_plan(spec: TextDataSpec, world_size: int) -> StreamPlan:
    """Discover shards and check that every stream gets data. Raises one-line errors naming the field."""
    shards = tuple(tuple(discover_shards(spec, i)) for i in range(len(spec.sources)))
    check_every_stream_gets_data(spec, shards, world_size)
    return StreamPlan(spec, shards, fingerprint(spec, [list(s) for s in shards]), world_size)


# ---------------------------------------------------------------------------------------------------- helpers


def _uniform(*keys: int) -> float:
    """A deterministic uniform number in [0, 1) from integer keys (counter-based: no state to save)."""
    digest = hashlib.blake2b(np.array(keys, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _epoch_order(count: int, seed: int, source: int, stream: int, epoch: int) -> list[int]:
    rng = np.random.Generator(np.random.PCG64([seed, source, stream, epoch]))
    return rng.permutation(count).tolist()


def new_stats() -> dict:
    return {"documents": 0, "tokens": 0, "blocks": 0, "tail_tokens": 0, "bad": {}, "bad_files": {}}


def _count_bad(stats: dict, shard: Shard, document: Document) -> None:
    stats["bad"][document.bad] = stats["bad"].get(document.bad, 0) + 1
    where = document.path or shard.path or shard.key
    per_file = stats["bad_files"].setdefault(where, {"counts": {}, "first": []})
    per_file["counts"][document.bad] = per_file["counts"].get(document.bad, 0) + 1
    if len(per_file["first"]) < FIRST_BAD_LOCATIONS:
        location = (f"line {line_number(shard.path, document.position)}" if shard.reader == "lines"
                    else f"record {document.position}")
        per_file["first"].append(f"{location}: {document.bad}")


def check_bad_fraction(stats: dict, max_fraction: float, good_key: str) -> None:
    """Stop the run (``BadDataError``) once enough records were seen and too many of them were bad."""
    bad = sum(stats["bad"].values())
    records = bad + stats[good_key]
    if records >= MIN_RECORDS_FOR_BAD_FRACTION and bad > max_fraction * records:
        worst = max(stats["bad_files"].items(), key=lambda item: sum(item[1]["counts"].values()))
        raise BadDataError(f"data.max_bad_fraction={max_fraction} exceeded: {bad} bad of {records} records "
                           f"({stats['bad']}); worst file {worst[0]}: {worst[1]['first']}")


def merge_stats(all_stats: list[dict]) -> dict:
    """Sum the statistics of several streams (or ranks)."""
    total = new_stats()
    for stats in all_stats:
        for key in ("documents", "tokens", "blocks", "tail_tokens"):
            total[key] += stats[key]
        for reason, count in stats["bad"].items():
            total["bad"][reason] = total["bad"].get(reason, 0) + count
        for where, entry in stats["bad_files"].items():
            merged = total["bad_files"].setdefault(where, {"counts": {}, "first": []})
            for reason, count in entry["counts"].items():
                merged["counts"][reason] = merged["counts"].get(reason, 0) + count
            merged["first"] = (merged["first"] + entry["first"])[:FIRST_BAD_LOCATIONS]
    return total


# ---------------------------------------------------------------------------------------------------- packing


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PROBE_TEXT = ("Hello world, it's 2026! Ça va? 東京 ελληνικά  \n\n\tspaces   and\ttabs -- 'quotes' \"x\" 3.14159 "
              "emoji 🙂👍🏽, don't, I'll, we've, they're; <tag attr=\"1\"/> ____ ... ???")


def _gpt2_tiktoken(tokenizer):
    """GPT-2's BPE in tiktoken (4-5x faster than the HF Rust tokenizer on one core), when ``tokenizer`` is GPT-2's:
    same vocabulary size and identical ids on a probe text. ``None`` otherwise, or without tiktoken or the ranks."""
    if len(tokenizer) != 50257:
        return None
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        return None
    from .fetch import cache_dir

    ranks_path = cache_dir() / "gpt2" / "gpt2.tiktoken"
    if not ranks_path.is_file():
        return None
    encoding = tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(
        str(ranks_path)), special_tokens={"<|endoftext|>": 50256})
    reference = tokenizer.backend_tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
    return encoding if encoding.encode_ordinary(PROBE_TEXT) == reference else None


class Tokenize:
    """Batched, special-token-free tokenization returning int32 arrays, each document followed by EOS.

    Uses the tokenizer's Rust backend, or tiktoken for GPT-2's vocabulary (the same ids, checked on a probe text
    and on the first batch of real documents, where tiktoken is faster).
    """

    def __init__(self, tokenizer, eos_token_id: int | None = None):
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "encode_batch_fast"):
            raise DataSpecError("tokenizer: a fast (Rust) tokenizer is required (PreTrainedTokenizerFast or "
                                "tokenizers.Tokenizer)")
        self.backend = backend
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise DataSpecError("tokenizer: has no eos_token_id; documents are separated by EOS")
        self.eos = int(eos)
        self.tiktoken = _gpt2_tiktoken(tokenizer) if hasattr(tokenizer, "backend_tokenizer") else None
        self.checked = self.tiktoken is None

    def _backend_ids(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self.tiktoken is None:
            ids = self._backend_ids(texts)
        else:
            ids = self.tiktoken.encode_ordinary_batch(texts, num_threads=1)
            if not self.checked:
                self.checked = True
                if ids != self._backend_ids(texts):
                    self.tiktoken, ids = None, self._backend_ids(texts)
        eos = np.array([self.eos], dtype=np.int32)
        return [np.concatenate([np.asarray(doc, dtype=np.int32), eos]) for doc in ids]


def pack_shard(shard: Shard, tokenize: Tokenize, seq_len: int, stats: dict, position: int | None = None,
               skip: int = 0, batch_docs: int = 64, source=None) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """Packed blocks of one shard, each with the cursor ``(position, skip)`` to resume right after it.

    ``(position, skip)`` names the first document not fully emitted and how many of its tokens were (``-1``: the
    document at ``position`` is done). ``stats`` counts documents and bad records as the emitted blocks *pass* them,
    never when they are merely read ahead, so the counts saved with a cursor stay exact on resume.
    """
    documents = read_shard(shard, position, source)
    pending: deque[list] = deque()  # [position, token count, bad Document | None], in reading order
    chunks: list[np.ndarray] = []
    buffered = 0  # tokens read and not emitted
    front_emitted = 0  # tokens of pending[0] already emitted
    last_done = (position or 0, -1)
    resuming = position is not None

    def pass_bad_records() -> None:
        nonlocal last_done
        while pending and pending[0][2] is not None:
            entry = pending.popleft()
            _count_bad(stats, shard, entry[2])
            last_done = (entry[0], -1)

    exhausted = False
    while not exhausted:
        texts, good = [], []
        while len(texts) < batch_docs:
            document = next(documents, None)
            if document is None:
                exhausted = True
                break
            if resuming:
                resuming = False
                if skip == -1:  # emitted and counted before the checkpoint
                    continue
            entry = [document.position, 0, document if document.bad else None]
            pending.append(entry)
            if document.bad is None:
                good.append(entry)
                texts.append(document.text)
        for entry, ids in zip(good, tokenize(texts) if texts else ()):
            entry[1] = len(ids)
            if skip > 0:  # the cursor's document: its first `skip` tokens were emitted before
                ids, front_emitted, skip = ids[skip:], skip, 0
            chunks.append(ids)
            buffered += len(ids)
        pass_bad_records()
        if buffered < seq_len:
            continue
        flat = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        cut = 0
        while buffered - cut >= seq_len:
            block = flat[cut:cut + seq_len]
            cut += seq_len
            consumed = seq_len
            while consumed:
                remaining = pending[0][1] - front_emitted
                if remaining > consumed:
                    front_emitted += consumed
                    consumed = 0
                else:
                    consumed -= remaining
                    entry = pending.popleft()
                    stats["documents"] += 1
                    last_done, front_emitted = (entry[0], -1), 0
                    pass_bad_records()
            stats["tokens"] += seq_len
            stats["blocks"] += 1
            yield block, ((pending[0][0], front_emitted) if pending else last_done)
        chunks = [flat[cut:]] if cut < len(flat) else []
        buffered -= cut
    # End of the shard: its last partial block is dropped (blocks never span shards).
    stats["tail_tokens"] += buffered
    for entry in pending:
        if entry[2] is not None:
            _count_bad(stats, shard, entry[2])
        else:
            stats["documents"] += 1


# ---------------------------------------------------------------------------------------------------- one stream


def initial_stream_state(plan: StreamPlan) -> dict:
    return {
        "sources": [{"epoch": 0, "shard": 0, "position": None, "skip": 0} for _ in plan.spec.sources],
        "mixed": 0,  # blocks drawn from the sources (the mixing counter)
        "emitted": 0,  # blocks given out (the shuffle counter)
        "buffer": np.zeros((0, plan.spec.seq_len), dtype=np.int32),  # shuffle buffer blocks
        "buffer_origin": [],  # (source, epoch) of each buffered block
        "stats": new_stats(),
    }


class LogicalStream:
    """One logical stream ``g``: its sources' shards, mixed by weight, optionally shuffled; resumable."""

    def __init__(self, plan: StreamPlan, stream: int, tokenize: Tokenize, state: dict | None = None):
        self.plan, self.stream, self.tokenize = plan, stream, tokenize
        self.spec = plan.spec
        self.state = copy.deepcopy(state) if state is not None else initial_stream_state(plan)
        self.buffer = [(block, *origin) for block, origin in zip(self.state["buffer"], self.state["buffer_origin"])]
        self.sources = [self._source_blocks(j) for j in range(len(self.spec.sources))]
        self.cumulative = np.cumsum(self.spec.weights)

    def _source_blocks(self, j: int) -> Iterator[tuple[np.ndarray, int]]:
        """Endless blocks of source ``j`` for this stream, updating ``state['sources'][j]`` as they go."""
        shards = self.plan.stream_shards(self.stream, j)
        cursor = self.state["sources"][j]
        while True:
            order = _epoch_order(len(shards), self.spec.seed, j, self.stream, cursor["epoch"])
            while cursor["shard"] < len(shards):
                shard = shards[order[cursor["shard"]]]
                blocks = pack_shard(shard, self.tokenize, self.spec.seq_len, self.state["stats"], cursor["position"],
                                    cursor["skip"], self.spec.tokenize_batch_docs, self.spec.sources[j])
                for block, (position, skip) in blocks:
                    cursor["position"], cursor["skip"] = position, skip
                    self._check_bad_fraction()
                    yield block, cursor["epoch"]
                cursor.update(shard=cursor["shard"] + 1, position=None, skip=0)
            cursor.update(epoch=cursor["epoch"] + 1, shard=0)

    def _check_bad_fraction(self) -> None:
        check_bad_fraction(self.state["stats"], self.spec.max_bad_fraction, good_key="documents")

    def next_block(self) -> tuple[np.ndarray, int, int]:
        """(block, source index, source epoch) after mixing and shuffling."""
        while True:
            u = _uniform(self.spec.seed, self.stream, self.state["mixed"], 1)
            j = int(np.searchsorted(self.cumulative, u * self.cumulative[-1], side="right"))
            j = min(j, len(self.sources) - 1)
            block, epoch = next(self.sources[j])
            self.state["mixed"] += 1
            if self.spec.shuffle_buffer == 0:
                self.state["emitted"] += 1
                return block, j, epoch
            if len(self.buffer) < self.spec.shuffle_buffer:
                self.buffer.append((block.copy(), j, epoch))
                continue
            slot = int(_uniform(self.spec.seed, self.stream, self.state["emitted"], 2) * len(self.buffer))
            out, self.buffer[slot] = self.buffer[slot], (block.copy(), j, epoch)
            self.state["emitted"] += 1
            return out

    def snapshot(self) -> dict:
        state = copy.deepcopy({k: v for k, v in self.state.items() if k not in ("buffer", "buffer_origin")})
        state["buffer"] = (np.stack([entry[0] for entry in self.buffer]) if self.buffer
                           else np.zeros((0, self.spec.seq_len), dtype=np.int32))
        state["buffer_origin"] = [(entry[1], entry[2]) for entry in self.buffer]
        return state

    def next_batch(self, micro_batch_size: int) -> dict:
        blocks, sources, epochs = zip(*(self.next_block() for _ in range(micro_batch_size)))
        input_ids = torch.from_numpy(np.stack(blocks).astype(np.int64))
        return {"input_ids": input_ids, "labels": input_ids.clone(), "source": torch.tensor(sources),
                "epoch": torch.tensor(epochs), "stream": self.stream, "state": self.snapshot()}


# ---------------------------------------------------------------------------------------------------- a rank's loader


class _RankStreams(IterableDataset):
    """The logical streams of one rank, run round-robin; with DataLoader workers, worker ``w`` of ``W`` runs the
    streams ``s % W == w`` so that batch ``n`` of the rank comes from stream ``(consumed + n) % S``."""

    def __init__(self, plan: StreamPlan, tokenize: Tokenize, rank: int, micro_batch_size: int, states: dict,
                 consumed: int):
        self.plan, self.tokenize, self.rank = plan, tokenize, rank
        self.micro_batch_size, self.states, self.consumed = micro_batch_size, states, consumed

    def __iter__(self):
        per_rank = self.plan.spec.streams_per_rank
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        order = [(self.consumed + worker + k * workers) % per_rank for k in range(per_rank // workers)]
        streams = {s: LogicalStream(self.plan, self.rank * per_rank + s, self.tokenize, self.states.get(s))
                   for s in order}
        while True:
            for s in order:
                yield streams[s].next_batch(self.micro_batch_size)


class StreamLoader:
    """A rank's batches from its logical streams, with the cursor the trainer checkpoints (base of the text and image
    loaders). Subclasses provide ``_dataset()`` (an IterableDataset yielding batches that carry ``stream`` and
    ``state``), ``_specific_meta()`` (what else must match to resume), ``OUTPUT_KEYS`` and ``stats()``.

    ``state_dict()`` is the data cursor after the last batch yielded; building the loader with ``state=`` resumes
    exactly there, after checking that the run reads the same data the same way (one-line error otherwise).
    """

    OUTPUT_KEYS: tuple[str, ...] = ()

    def __init__(self, plan, rank: int, micro_batch_size: int, num_workers: int = 0, state: dict | None = None):
        per_rank = plan.spec.streams_per_rank
        if num_workers and per_rank % num_workers:
            raise DataSpecError(f"dataloader workers ({num_workers}) must divide data.streams_per_rank ({per_rank})")
        if not 0 <= rank < plan.world_size:
            raise DataSpecError(f"rank {rank} is outside world size {plan.world_size}")
        self.plan, self.rank, self.micro_batch_size, self.num_workers = plan, rank, micro_batch_size, num_workers
        self.consumed = 0
        self.states: dict[int, dict] = {}
        if state is not None:
            self._check_resumable(state)
            self.consumed = state["consumed"]
            self.states = {int(s): st for s, st in state["streams"].items()}

    def _specific_meta(self) -> dict:
        return {}

    def _meta(self) -> dict:
        spec = self.plan.spec
        return {"fingerprint": self.plan.fingerprint, "world_size": self.plan.world_size, "rank": self.rank,
                "streams_per_rank": spec.streams_per_rank, "seed": spec.seed,
                "micro_batch_size": self.micro_batch_size, "weights": spec.weights,
                "shuffle_buffer": spec.shuffle_buffer, **self._specific_meta()}

    def _check_resumable(self, state: dict) -> None:
        saved, now = state.get("meta", {}), self._meta()
        if saved.get("fingerprint") != now["fingerprint"]:
            raise DataSpecError(f"data cursor: the sources changed since the checkpoint (fingerprint "
                                f"{saved.get('fingerprint')} -> {now['fingerprint']}); refusing to resume a different "
                                f"stream — restore the data or start a new run")
        for key, value in now.items():
            if key != "fingerprint" and saved.get(key) != value:
                raise DataSpecError(f"data cursor: {key} was {saved.get(key)} at the checkpoint and is {value} "
                                    f"now; resuming needs the same value (a changed world size is refused, see "
                                    f"docs/data.md)")

    def _dataset(self) -> IterableDataset:
        raise NotImplementedError

    def __iter__(self):
        loader = DataLoader(self._dataset(), batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=2 if self.num_workers else None)
        first_stream = self.rank * self.plan.spec.streams_per_rank
        for batch in loader:
            # Batches carry their global stream id; the cursor is keyed by this rank's local stream index.
            self.states[int(batch["stream"]) - first_stream] = batch["state"]
            self.consumed += 1
            yield {key: batch[key] for key in self.OUTPUT_KEYS}

    def state_dict(self) -> dict:
        return {"meta": self._meta(), "consumed": self.consumed, "streams": copy.deepcopy(self.states)}


class TextLoader(StreamLoader):
    """A rank's packed-text batches: ``{"input_ids", "labels"}`` (LongTensor ``(micro_batch_size, seq_len)``)
    forever, plus ``source`` and ``epoch`` (per block: the source it came from and that source's epoch in its
    stream). See [`StreamLoader`] for the cursor."""

    OUTPUT_KEYS = ("input_ids", "labels", "source", "epoch")

    def __init__(self, plan: StreamPlan, tokenizer, rank: int, micro_batch_size: int, num_workers: int = 0,
                 state: dict | None = None, eos_token_id: int | None = None):
        self.tokenize = Tokenize(tokenizer, eos_token_id)
        super().__init__(plan, rank, micro_batch_size, num_workers, state)

    def _specific_meta(self) -> dict:
        return {"seq_len": self.plan.spec.seq_len}

    def _dataset(self) -> IterableDataset:
        return _RankStreams(self.plan, self.tokenize, self.rank, self.micro_batch_size, self.states, self.consumed)

    def stats(self) -> dict:
        """Documents, tokens, tail tokens and bad records passed so far by this rank's streams."""
        return merge_stats([state["stats"] for state in self.states.values()])

"""The packed text stream: tokenize on the fly, pack into fixed-length blocks; sharded, mixed and resumed by
``stream`` (layout, mixing, shuffle buffer, cursor and loader are described there).

Packing. Documents are tokenized in batches, each followed by EOS, and cut into blocks of exactly ``seq_len`` tokens
with no padding (``labels = input_ids``: HF models shift inside). **Blocks never span shards**: a shard's last partial
block is dropped and counted (``tail_tokens``). Because shards do not depend on the world size, the set of blocks of
an epoch is the same for any number of ranks and workers.

Cursor. Per source ``(epoch, shard index, position, skip)`` — where ``position`` is where the first
not-fully-emitted document starts and ``skip`` how many of its tokens were emitted (``-1``: all) — plus the mixing
counter, the shuffle buffer (its blocks, with their ``(source, epoch)``) and the counts. Resuming seeks to those
positions, re-tokenizes at most one batch of documents per source, and continues with exactly the next block.
"""

from __future__ import annotations

import copy
import functools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import BadDataError, DataSpecError
from .sources import Document, Shard, discover_shards, fingerprint, line_number, read_shard
from .spec import TextDataSpec
from .stream import (
    MixedStream,
    StreamAssignment,
    StreamLoader,
    check_bad_fraction,
    check_every_stream_gets_data,
    count_bad,
    epoch_order,
    logical_streams,
    uniform,
)

__all__ = ["BadDataError", "LogicalStream", "StreamPlan", "TextLoader", "Tokenize", "build_plan", "pack_shard"]

TEXT_COUNTERS = ("documents", "tokens", "blocks", "tail_tokens")


@dataclass(frozen=True)
class StreamPlan(StreamAssignment):
    """Everything fixed at start: validated spec, shards per source, fingerprint. Built once, before training."""

    spec: TextDataSpec
    shards: tuple[tuple[Shard, ...], ...]
    fingerprint: str
    world_size: int
    num_streams: int  # the run's logical streams (stream.logical_streams)


def build_plan(spec: TextDataSpec, world_size: int) -> StreamPlan:
    """Discover shards and check that every stream gets data. Raises one-line errors naming the field."""
    shards = tuple(tuple(discover_shards(spec, i)) for i in range(len(spec.sources)))
    num_streams = logical_streams(spec, world_size)
    check_every_stream_gets_data(spec, shards, world_size, num_streams)
    return StreamPlan(spec, shards, fingerprint(spec, [list(s) for s in shards]), world_size, num_streams)


def count_bad_document(stats: dict, shard: Shard, document: Document) -> None:
    location = (
        f"line {line_number(shard.path, document.position)}"
        if shard.reader == "lines"
        else f"record {document.position}"
    )
    count_bad(stats, document.bad, document.path or shard.path or shard.key, location)


# ---------------------------------------------------------------------------------------------------- packing


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PROBE_TEXT = (
    "Hello world, it's 2026! Ça va? 東京 ελληνικά  \n\n\tspaces   and\ttabs -- 'quotes' \"x\" 3.14159 "
    "emoji 🙂👍🏽, don't, I'll, we've, they're; <tag attr=\"1\"/> ____ ... ???"
)


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
    encoding = tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(ranks_path)),
        special_tokens={"<|endoftext|>": 50256},
    )
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
            raise DataSpecError(
                "tokenizer: a fast (Rust) tokenizer is required (PreTrainedTokenizerFast or tokenizers.Tokenizer)"
            )
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


def pack_shard(
    shard: Shard,
    tokenize: Tokenize,
    seq_len: int,
    stats: dict,
    position: int | None = None,
    skip: int = 0,
    batch_docs: int = 64,
    source=None,
) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
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
            count_bad_document(stats, shard, entry[2])
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
        for entry, ids in zip(good, tokenize(texts) if texts else (), strict=True):
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
            block = flat[cut : cut + seq_len]
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
            count_bad_document(stats, shard, entry[2])
        else:
            stats["documents"] += 1


# ---------------------------------------------------------------------------------------------------- one stream


class LogicalStream(MixedStream):
    """One logical stream ``g`` of packed blocks: its sources' shards, mixed by weight, optionally shuffled.

    Open shards. A source reads ``data.open_shards`` of its shards at once (in the epoch's shard order, a finished
    shard's slot taking the next one) and draws each block from one of them by the counter-based hash
    ``uniform(seed, stream, source, draws, 3)``: consecutive blocks come from different parts of the corpus
    (different plays, books, files), not from one document after another. The cursor holds, per source, the epoch
    and count of shards opened so far, the draw counter, and per open shard its ``(epoch, shard, position, skip)``:
    still O(1) to resume, a few numbers per open shard.
    """

    COUNTERS = TEXT_COUNTERS
    GOOD = "documents"
    ITEM = "block"
    SHARD_START = {"position": None, "skip": 0}
    BUFFER_KEYS = ("buffer", "buffer_origin")

    def __init__(self, plan: StreamPlan, stream: int, tokenize: Tokenize, state: dict | None = None):
        self.tokenize = tokenize
        if state is not None and any("slots" not in source for source in state["sources"]):
            state = _single_slot_cursor(state, plan, stream)
        super().__init__(plan, stream, state)

    def initial_state(self) -> dict:
        state = super().initial_state()
        state["sources"] = [{"epoch": 0, "opened": 0, "draws": 0, "barren": 0, "slots": []} for _ in self.spec.sources]
        return state

    def _source_items(self, j: int) -> Iterator[tuple]:
        """Endless blocks of source ``j`` for this stream from up to ``open_shards`` open shards, updating
        ``state['sources'][j]`` as they go."""
        shards = self.plan.stream_shards(self.stream, j)
        source = self.state["sources"][j]
        width = min(self.spec.open_shards, len(shards))
        readers: list[Iterator | None] = [None] * len(source["slots"])
        while True:
            while len(source["slots"]) < width:  # open the epoch's next shard (the next epoch's, after the last)
                if source["opened"] == len(shards):
                    source.update(epoch=source["epoch"] + 1, opened=0)
                order = epoch_order(len(shards), self.spec.seed, j, self.stream, source["epoch"])
                source["slots"].append({"epoch": source["epoch"], "shard": order[source["opened"]], **self.SHARD_START})
                source["opened"] += 1
                readers.append(None)
            k = int(uniform(self.spec.seed, self.stream, j, source["draws"], 3) * width)
            source["draws"] += 1
            slot = source["slots"][k]
            if readers[k] is None:
                readers[k] = self._read(j, shards[slot["shard"]], slot)
            item = next(readers[k], None)
            if item is not None:
                slot["yielded"] = True
                source["barren"] = 0
                yield item
                continue
            del source["slots"][k], readers[k]  # the shard is done
            source["barren"] = 0 if slot.get("yielded") else source["barren"] + 1
            if source["barren"] >= len(shards):  # a whole epoch's worth of shards in a row gave nothing
                raise BadDataError(
                    f"data.sources[{j}]: {self.spec.sources[j].label!r}: stream {self.stream} read "
                    f"all its {len(shards)} shards and found no usable {self.ITEM} ({self.why_nothing_usable()})"
                )

    def _read(self, j: int, shard: Shard, cursor: dict) -> Iterator[tuple[np.ndarray, int]]:
        stats = self.state["stats"]
        blocks = pack_shard(
            shard,
            self.tokenize,
            self.spec.seq_len,
            stats,
            cursor["position"],
            cursor["skip"],
            self.spec.tokenize_batch_docs,
            self.spec.sources[j],
        )
        for block, (position, skip) in blocks:
            cursor["position"], cursor["skip"] = position, skip
            check_bad_fraction(stats, self.spec.max_bad_fraction, self.GOOD, self.explain_bad)
            yield block, cursor["epoch"]

    def explain_bad(self, stats: dict) -> str:
        if "missing_text_field" not in stats["bad"]:
            return ""
        fields = ", ".join(f"{s.text_field!r} (data.sources[{j}].text_field)" for j, s in enumerate(self.spec.sources))
        return f"; records without the field {fields}"

    def why_nothing_usable(self) -> str:
        stats = self.state["stats"]
        reasons = [super().why_nothing_usable()] if stats["bad"] else []
        if stats["documents"]:  # text, but never a whole block in one shard
            reasons.append(
                f"{stats['documents']} documents of {stats['tail_tokens']} tokens in all, and no shard holds one "
                f"block of data.seq_len={self.spec.seq_len} tokens (blocks never span shards: lower data.seq_len "
                f"or data.min_shards, or add text)"
            )
        return "; ".join(reasons) or super().why_nothing_usable()

    def _buffered(self, item: tuple[np.ndarray, int]) -> tuple[np.ndarray, int]:
        return item[0].copy(), item[1]

    def _buffer_state(self, buffer: list) -> dict:
        return {
            "buffer": (
                np.stack([item[0] for item, _ in buffer])
                if buffer
                else np.zeros((0, self.spec.seq_len), dtype=np.int32)
            ),  # the blocks
            "buffer_origin": np.asarray([(j, item[1]) for item, j in buffer], dtype=np.int64).reshape(-1, 2),
        }  # (source, epoch) of each block

    def _restore_buffer(self, state: dict) -> list:
        origins = np.asarray(state["buffer_origin"], dtype=np.int64).reshape(-1, 2).tolist()  # older cursors: a list
        return [((block, epoch), j) for block, (j, epoch) in zip(state["buffer"], origins, strict=True)]

    def next_block(self) -> tuple[np.ndarray, int, int]:
        """(block, source index, source epoch) after mixing and shuffling."""
        (block, epoch), j, _ = self.next_item()
        return block, j, epoch

    def next_batch(self, micro_batch_size: int) -> dict:
        blocks, sources, epochs = zip(*(self.next_block() for _ in range(micro_batch_size)), strict=True)
        input_ids = torch.from_numpy(np.stack(blocks).astype(np.int64))
        return {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            "source": torch.tensor(sources),
            "epoch": torch.tensor(epochs),
            "stream": self.stream,
            "state": self.batch_cursor(),
        }


def _single_slot_cursor(state: dict, plan: StreamPlan, stream: int) -> dict:
    """A cursor saved before open shards existed (one shard at a time per source), as the one-slot cursor it is:
    such a run resumes exactly with ``data.open_shards: 1`` (the loader refuses any other value)."""
    state = copy.deepcopy(state)
    for j, cursor in enumerate(state["sources"]):
        count = len(plan.stream_shards(stream, j))
        order = epoch_order(count, plan.spec.seed, j, stream, cursor["epoch"])
        slot = {"epoch": cursor["epoch"], "shard": order[cursor["shard"]], "position": cursor["position"]}
        slot.update(skip=cursor["skip"], yielded=cursor["position"] is not None)
        state["sources"][j] = {"epoch": cursor["epoch"], "opened": cursor["shard"] + 1, "draws": 0, "barren": 0}
        state["sources"][j]["slots"] = [slot] if cursor["shard"] < count else []
    return state


# ---------------------------------------------------------------------------------------------------- a rank's loader


class TextLoader(StreamLoader):
    """A rank's packed-text batches: ``{"input_ids", "labels"}`` (LongTensor ``(micro_batch_size, seq_len)``)
    forever, plus ``source`` and ``epoch`` (per block: the source it came from and that source's epoch in its
    stream). See [`StreamLoader`] for the cursor; ``stats()``: documents, tokens, blocks, tail tokens and bad
    records passed so far."""

    OUTPUT_KEYS = ("input_ids", "labels", "source", "epoch")
    COUNTERS = TEXT_COUNTERS
    BUFFER_KEYS = LogicalStream.BUFFER_KEYS

    def __init__(
        self,
        plan: StreamPlan,
        tokenizer,
        rank: int,
        micro_batch_size: int,
        num_workers: int = 0,
        state: dict | None = None,
        eos_token_id: int | None = None,
        pin_memory: bool = False,
    ):
        self.tokenize = Tokenize(tokenizer, eos_token_id)
        self._new_stream = functools.partial(LogicalStream, tokenize=self.tokenize)  # picklable, for workers
        super().__init__(plan, rank, micro_batch_size, num_workers, state, pin_memory)

    def _specific_meta(self) -> dict:
        # open_shards only when > 1: a cursor saved before the field existed resumes with open_shards = 1.
        spec = self.plan.spec
        return {"seq_len": spec.seq_len, **({"open_shards": spec.open_shards} if spec.open_shards > 1 else {})}

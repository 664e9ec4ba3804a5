"""Streaming text pipeline: sharding, packing, mixtures, exact resume, bad records — on real files."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.sources import discover_shards
from data_pipeline.spec import DataSpecError, parse_text_data
from data_pipeline.stream import bad_record_summary, count_bad, merge_cursors, merge_stats, new_stats
from data_pipeline.text_stream import BadDataError, LogicalStream, TextLoader, Tokenize, build_plan, pack_shard
from tests import elastic_data as elastic
from tests.bad_data import NEVER_SPIN_SECONDS, UNUSABLE_TEXT, unusable_text


@pytest.fixture(scope="session")
def tokenizer(shakespeare_dir):
    from crate_lm.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(sorted(str(p) for p in shakespeare_dir.glob("*.txt"))[:6], vocab_size=600)


@pytest.fixture(scope="session")
def corpus(shakespeare_dir, tmp_path_factory) -> Path:
    """Real text as JSONL: every paragraph of 12 plays is one record (about 5,000 records in 3 files)."""
    root = tmp_path_factory.mktemp("corpus")
    plays = sorted(shakespeare_dir.glob("*.txt"))[:12]
    for part in range(3):
        with open(root / f"part-{part}.jsonl", "w") as handle:
            for play in plays[part::3]:
                for i, paragraph in enumerate(play.read_text().split("\n\n")):
                    if paragraph.strip():
                        handle.write(json.dumps({"text": paragraph, "id": f"{play.stem}-{i}"}) + "\n")
    return root


def spec_for(corpus: Path, **overrides):
    raw = {
        "sources": [{"path": str(corpus)}],
        "seq_len": 64,
        "shuffle_buffer": 0,
        "min_shards": 8,
        "streams_per_rank": 1,
        "tokenize_batch_docs": 16,
    }
    raw.update(overrides)
    return parse_text_data(raw)


def mixture_spec(corpus: Path, shakespeare_dir: Path, **overrides):
    """JSONL paragraphs (weight 3) mixed with the plays as whole text files, in 8+ shards."""
    sources = [{"path": str(corpus), "weight": 3}, {"path": str(shakespeare_dir), "format": "txt"}]
    return parse_text_data({"sources": sources, "min_shards": 8, **overrides})


def epoch_zero_drained(state: dict, source: int = 0) -> bool:
    """Whether a stream's cursor has finished every shard of its first epoch over ``source`` (with open shards, the
    next epoch's first blocks come while the last shards of this one are still being read)."""
    cursor = state["sources"][source]
    return cursor["epoch"] > 0 and all(slot["epoch"] > 0 for slot in cursor["slots"])


def epoch_blocks(plan, stream: int, tokenize, source: int = 0) -> list[bytes]:
    """The blocks stream ``stream`` yields in its first epoch over ``source``."""
    logical = LogicalStream(plan, stream, tokenize)
    blocks = []
    while not epoch_zero_drained(logical.state, source):
        block, j, epoch = logical.next_block()
        if epoch == 0:
            blocks.append(block.tobytes())
    return blocks


# ------------------------------------------------------------------------------------------------ sharding


def test_byte_ranges_cover_every_record_exactly_once(corpus, tokenizer):
    spec = spec_for(corpus, min_shards=7)
    shards = discover_shards(spec, 0)
    assert len(shards) >= 7
    from data_pipeline.sources import read_shard

    read = [(shard.path, doc.position) for shard in shards for doc in read_shard(shard)]
    lines = sum(len(p.read_text().splitlines()) for p in corpus.glob("*.jsonl"))
    assert len(read) == lines == len(set(read))


def test_union_of_streams_equals_the_single_stream(corpus, tokenizer):
    tokenize = Tokenize(tokenizer)
    single = epoch_blocks(build_plan(spec_for(corpus), 1), 0, tokenize)
    wide = build_plan(spec_for(corpus, streams_per_rank=2), 2)
    union = [block for g in range(wide.num_streams) for block in epoch_blocks(wide, g, tokenize)]
    assert len(single) > 100
    assert Counter(union) == Counter(single)


def _rank_main(rank, world, corpus, tokenizer, port, out_dir):
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)  # as torchrun-launched ranks: workers fork, not spawn
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plan = build_plan(spec_for(corpus, streams_per_rank=2), world)
        loader = TextLoader(plan, tokenizer, rank=rank, micro_batch_size=4, num_workers=2)
        seen, steps = [], 0
        for batch in loader:
            streams = loader.state_dict()["streams"]
            finished = len(streams) == 2 and all(epoch_zero_drained(state) for state in streams.values())
            # A collective every step, as in training: unequal batch counts per rank would hang here.
            done = torch.tensor([int(finished)])
            dist.all_reduce(done)
            seen.extend(
                row.numpy().astype(np.int32).tobytes()
                for row, epoch in zip(batch["input_ids"], batch["epoch"])
                if epoch == 0
            )
            steps += 1
            if int(done) == world:
                break
        torch.save({"blocks": seen, "steps": steps, "stats": loader.stats()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_two_workers_read_the_epoch_exactly_once(corpus, tokenizer, tmp_path):
    port = random.randint(20000, 40000)
    mp.spawn(_rank_main, args=(2, corpus, tokenizer, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert results[0]["steps"] == results[1]["steps"]
    union = Counter(block for result in results for block in result["blocks"])
    single = Counter(epoch_blocks(build_plan(spec_for(corpus), 1), 0, Tokenize(tokenizer)))
    assert union == single


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_twice_equals_the_uninterrupted_stream(corpus, tokenizer, shakespeare_dir, workers):
    spec = mixture_spec(corpus, shakespeare_dir, seq_len=48, shuffle_buffer=16, streams_per_rank=2, seed=7)
    plan = build_plan(spec, 1)
    total = 60
    reference = []
    for batch in TextLoader(plan, tokenizer, rank=0, micro_batch_size=3, num_workers=workers):
        reference.append(batch["input_ids"])
        if len(reference) == total:
            break
    cut1, cut2 = sorted(random.Random(workers).sample(range(5, total - 5), 2))
    got, state = [], None
    for stop in (cut1, cut2, total):
        loader = TextLoader(plan, tokenizer, rank=0, micro_batch_size=3, num_workers=workers, state=state)
        for batch in loader:
            got.append(batch["input_ids"])
            if len(got) == stop:
                break
        state = loader.state_dict()
    assert len(got) == total
    assert all(torch.equal(a, b) for a, b in zip(reference, got))


def test_resume_inside_a_document_and_at_its_end(tokenizer, tmp_path):
    """Cursors that point into a long document, and exactly at a document's end, both resume exactly."""
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as handle:
        for i in range(40):
            handle.write(json.dumps({"text": " ".join(f"word{i}x{j}" for j in range(5 + 17 * (i % 4)))}) + "\n")
    spec = parse_text_data(
        {
            "sources": [{"path": str(path)}],
            "seq_len": 16,
            "shuffle_buffer": 0,
            "min_shards": 1,
            "streams_per_rank": 1,
            "tokenize_batch_docs": 3,
        }
    )
    shard = discover_shards(spec, 0)[0]
    tokenize = Tokenize(tokenizer)
    stats = {"documents": 0, "tokens": 0, "blocks": 0, "tail_tokens": 0, "bad": {}, "bad_files": {}}
    full = list(pack_shard(shard, tokenize, 16, stats, batch_docs=3))
    skips = {cursor[1] for _, cursor in full}
    assert -1 in skips and any(s > 0 for s in skips)  # both kinds of cursor occur
    for index, (_, (position, skip)) in enumerate(full[:-1]):
        rest = list(pack_shard(shard, tokenize, 16, dict(stats), position, skip, batch_docs=3))
        assert [b.tobytes() for b, _ in rest] == [b.tobytes() for b, _ in full[index + 1 :]]


def test_a_changed_source_is_refused(corpus, tokenizer, tmp_path):
    plan = build_plan(spec_for(corpus, streams_per_rank=2), 1)
    loader = TextLoader(plan, tokenizer, rank=0, micro_batch_size=2)
    next(iter(loader))
    state = loader.state_dict()
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in corpus.glob("*.jsonl"):
        (changed / path.name).write_text(path.read_text())
    with open(changed / "part-0.jsonl", "a") as handle:
        handle.write(json.dumps({"text": "one more record"}) + "\n")
    with pytest.raises(DataSpecError, match="fingerprint"):
        TextLoader(
            build_plan(spec_for(changed, streams_per_rank=2), 1), tokenizer, rank=0, micro_batch_size=2, state=state
        )


def test_the_global_order_is_the_same_at_any_world_size_and_resumes_across_them(corpus, tokenizer, shakespeare_dir):
    """With a fixed number of logical streams, the run's m-th micro-batch is the same at 1, 2 and 4 ranks (with a
    mixture, a shuffle buffer and DataLoader workers), and a run resumed 2 -> 1 -> 4 ranks continues it exactly."""
    spec = mixture_spec(corpus, shakespeare_dir, seq_len=32, shuffle_buffer=8, num_streams=4, seed=3)

    def make(rank, world, state, workers=0):
        return TextLoader(
            build_plan(spec, world), tokenizer, rank, micro_batch_size=2, num_workers=workers, state=state
        )

    reference, _ = elastic.global_batches(lambda rank, world, state: make(rank, world, state, workers=2), 1, 24)
    for world in (2, 4):
        assert elastic.same_batches(elastic.global_batches(make, world, 24)[0], reference, "input_ids")
    resumed = elastic.resumed_across(make, [(2, 8), (1, 8), (4, 8)])
    assert elastic.same_batches(resumed, reference, "input_ids")
    elastic.check_refusals(make, DataSpecError)
    with pytest.raises(DataSpecError, match="cannot change to 2"):
        changed = spec.model_copy(update={"num_streams": 2})
        TextLoader(build_plan(changed, 1), tokenizer, 0, 2, state=merge_cursors(elastic.global_batches(make, 1, 2)[1]))


def test_a_cursor_from_before_the_interleaved_layout_resumes_exactly_on_its_own_world_size(corpus, tokenizer):
    """The old layout: rank r of W ran the streams r*S + s (contiguous), its batch n from local stream n mod S, and
    its cursor held the rank's count of batches and its streams by local index."""
    plan = build_plan(spec_for(corpus, streams_per_rank=2, shuffle_buffer=4), 2)
    tokenize, rank = Tokenize(tokenizer), 1
    streams = [LogicalStream(plan, rank * 2 + s, tokenize) for s in range(2)]
    for n in range(5):  # rank 1 of the old layout consumed 5 batches
        streams[n % 2].next_batch(2)
    meta = TextLoader(plan, tokenizer, rank=rank, micro_batch_size=2)._meta()
    meta = {k: v for k, v in meta.items() if k not in ("num_streams", "layout")}
    old = {
        "meta": {**meta, "world_size": 2, "rank": rank, "streams_per_rank": 2},
        "consumed": 5,
        "streams": {s: stream.snapshot() for s, stream in enumerate(streams)},
    }
    expected = [streams[n % 2].next_batch(2)["input_ids"] for n in range(5, 9)]
    loader = TextLoader(plan, tokenizer, rank=rank, micro_batch_size=2, state=old)
    got = [batch["input_ids"] for batch in itertools.islice(loader, 2)]
    again = TextLoader(plan, tokenizer, rank=rank, micro_batch_size=2, state=loader.state_dict())  # and again
    got += [batch["input_ids"] for batch in itertools.islice(again, 2)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 4
    with pytest.raises(DataSpecError, match="resumes only on its own world size \\(2 ranks\\), and this run has 1"):
        TextLoader(build_plan(spec_for(corpus, streams_per_rank=4, shuffle_buffer=4), 1), tokenizer, 0, 2, state=old)
    with pytest.raises(DataSpecError, match="world_size was 2 at the checkpoint and is 1 now"):
        wider = build_plan(spec_for(corpus, streams_per_rank=4, shuffle_buffer=4), 1)
        TextLoader(wider, tokenizer, rank=0, micro_batch_size=2, state=loader.state_dict())
    with pytest.raises(DataSpecError, match="written before the interleaved stream layout"):
        merge_cursors([loader.state_dict()])


def _slot_of_each_block(logical: LogicalStream, count: int) -> list[int]:
    """For each of the next ``count`` blocks, the shard it came from (the open shard whose cursor moved)."""
    shards = []
    for _ in range(count):
        before = {slot["shard"]: (slot["position"], slot["skip"]) for slot in logical.state["sources"][0]["slots"]}
        logical.next_block()
        after = {slot["shard"]: (slot["position"], slot["skip"]) for slot in logical.state["sources"][0]["slots"]}
        moved = [shard for shard, cursor in after.items() if before.get(shard) != cursor]
        shards.append(moved[0] if moved else -1)
    return shards


def test_open_shards_interleave_the_corpus_and_one_shard_reads_in_order(corpus, tokenizer):
    tokenize = Tokenize(tokenizer)
    wide = _slot_of_each_block(LogicalStream(build_plan(spec_for(corpus), 1), 0, tokenize), 40)
    narrow = _slot_of_each_block(LogicalStream(build_plan(spec_for(corpus, open_shards=1), 1), 0, tokenize), 40)
    assert len(set(wide)) >= 6 and sum(a != b for a, b in zip(wide, wide[1:])) > 20  # 8 shards open, interleaved
    assert len(set(narrow)) == 1  # one shard after another: the first 40 blocks all come from the first shard


def test_a_cursor_from_before_open_shards_resumes_exactly_with_one_open_shard(corpus, tokenizer):
    plan = build_plan(spec_for(corpus, open_shards=1, shuffle_buffer=8), 1)
    tokenize = Tokenize(tokenizer)
    stream = LogicalStream(plan, 0, tokenize)
    while stream.state["sources"][0]["opened"] < 2:  # into the second shard
        stream.next_block()
    for _ in range(5):
        stream.next_block()
    state = stream.snapshot()
    expected = [stream.next_block()[0].tobytes() for _ in range(30)]
    # The same cursor as the code before open shards saved it: per source (epoch, shard index, position, skip).
    source = state["sources"][0]
    (slot,) = source["slots"]
    state["sources"][0] = {"epoch": slot["epoch"], "shard": source["opened"] - 1, "position": slot["position"]}
    state["sources"][0]["skip"] = slot["skip"]
    resumed = LogicalStream(plan, 0, tokenize, state=state)
    assert [resumed.next_block()[0].tobytes() for _ in range(30)] == expected
    old_loader_state = {"meta": TextLoader(plan, tokenizer, rank=0, micro_batch_size=2)._meta(), "consumed": 0}
    old_loader_state["streams"] = {}
    with pytest.raises(DataSpecError, match="saved before data.open_shards existed: resume it with data.open_shards=1"):
        wide = build_plan(spec_for(corpus, shuffle_buffer=8), 1)
        TextLoader(wide, tokenizer, rank=0, micro_batch_size=2, state=old_loader_state)


# ------------------------------------------------------------------------------------------------ mixtures


def test_mixture_honours_weights(corpus, shakespeare_dir, tokenizer):
    spec = parse_text_data(
        {
            "sources": [{"path": str(corpus), "weight": 3}, {"path": str(shakespeare_dir), "format": "txt"}],
            "seq_len": 32,
            "shuffle_buffer": 0,
            "min_shards": 4,
            "streams_per_rank": 1,
        }
    )
    stream = LogicalStream(build_plan(spec, 1), 0, Tokenize(tokenizer))
    sources = Counter(stream.next_block()[1] for _ in range(3000))
    assert abs(sources[0] / 3000 - 0.75) < 0.025


# ------------------------------------------------------------------------------------------------ bad records


def _planted(tmp_path: Path) -> tuple[Path, dict, dict]:
    """A JSONL file of real text with bad lines planted at known line numbers."""
    path = tmp_path / "planted.jsonl"
    good = [f"line number {i} of a clean record with some words" for i in range(300)]
    bad_lines = {
        17: b"{not json",
        40: json.dumps({"body": "no text"}).encode(),
        41: json.dumps({"text": 5}).encode(),
        99: json.dumps({"text": "caf\xe9"}).encode().replace(b"\\u00e9", b"\xe9\xff"),
        150: json.dumps({"text": "   "}).encode(),
        151: b"[1, 2]",
        260: b'{"text": "unterminated',
    }
    reasons = {
        17: "invalid_json",
        40: "missing_text_field",
        41: "non_string_text",
        99: "invalid_utf8",
        150: "empty_document",
        151: "missing_text_field",
        260: "invalid_json",
    }
    with open(path, "wb") as handle:
        for number in range(1, 301):
            handle.write(bad_lines.get(number, json.dumps({"text": good[number - 1]}).encode()) + b"\n")
    return path, bad_lines, reasons


def test_bad_records_are_skipped_and_counted_exactly(tokenizer, tmp_path):
    path, bad_lines, reasons = _planted(tmp_path)
    spec = parse_text_data(
        {
            "sources": [{"path": str(path)}],
            "seq_len": 16,
            "shuffle_buffer": 0,
            "min_shards": 3,
            "streams_per_rank": 1,
            "max_bad_fraction": 0.1,
        }
    )
    plan = build_plan(spec, 1)
    stats = {"documents": 0, "tokens": 0, "blocks": 0, "tail_tokens": 0, "bad": {}, "bad_files": {}}
    tokenize = Tokenize(tokenizer)
    for shard in plan.shards[0]:
        for _ in pack_shard(shard, tokenize, 16, stats):
            pass
    assert stats["bad"] == dict(Counter(reasons.values()))
    assert stats["documents"] == 300 - len(bad_lines)
    first = stats["bad_files"][str(path)]["first"]
    assert first == [f"line {n}: {reasons[n]}" for n in sorted(reasons)][:5]
    summary = bad_record_summary(merge_stats([stats, new_stats(())]))  # what a run reports (summed over ranks)
    assert summary["total"] == len(bad_lines) and summary["by_source"] == {str(path): len(bad_lines)}
    assert summary["first"] == [f"{path}: {location}" for location in first[:3]]
    assert bad_record_summary(new_stats(())) is None  # no field at all when nothing was skipped
    many = new_stats(())
    for file in range(12):
        for line in range(file + 1):
            count_bad(many, "invalid_json", f"{file}.jsonl", f"line {line + 1}")
    by_source = bad_record_summary(many)["by_source"]  # the 10 worst files, the others in one entry
    assert list(by_source) == [f"{file}.jsonl" for file in range(11, 1, -1)] + ["(2 other files)"]
    assert by_source["(2 other files)"] == 1 + 2 and sum(by_source.values()) == 78


def test_bad_counts_stay_exact_across_a_resume(tokenizer, tmp_path):
    path, _, reasons = _planted(tmp_path)
    spec = parse_text_data(
        {
            "sources": [{"path": str(path)}],
            "seq_len": 16,
            "shuffle_buffer": 0,
            "min_shards": 1,
            "streams_per_rank": 1,
            "max_bad_fraction": 0.1,
        }
    )
    plan = build_plan(spec, 1)
    loader = TextLoader(plan, tokenizer, rank=0, micro_batch_size=2)
    for i, _ in enumerate(loader):
        if i == 40:
            break
    resumed = TextLoader(plan, tokenizer, rank=0, micro_batch_size=2, state=loader.state_dict())
    for batch in resumed:
        if (batch["epoch"] > 0).any():
            break
    assert resumed.stats()["bad"] == dict(Counter(reasons.values()))


def test_too_many_bad_records_stop_the_run(tokenizer, tmp_path):
    path, _, _ = _planted(tmp_path)
    spec = parse_text_data(
        {
            "sources": [{"path": str(path)}],
            "seq_len": 16,
            "shuffle_buffer": 0,
            "min_shards": 1,
            "streams_per_rank": 1,
            "max_bad_fraction": 0.01,
        }
    )
    with pytest.raises(BadDataError, match=r"max_bad_fraction=0.01 exceeded: \d+ bad of \d+ records"):
        for _ in TextLoader(build_plan(spec, 1), tokenizer, rank=0, micro_batch_size=2):
            pass


# ------------------------------------------------------------------------------------------------ formats


def test_parquet_and_hf_streaming_sources_give_the_same_blocks_as_jsonl(corpus, tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in (corpus / "part-0.jsonl").read_text().splitlines()]
    table = pa.table({"text": [r["text"] for r in records]})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=len(records))
    pq.write_table(table, tmp_path / "grouped.parquet", row_group_size=500)
    single = {"seq_len": 32, "shuffle_buffer": 0, "min_shards": 1, "streams_per_rank": 1}
    tokenize = Tokenize(tokenizer)
    jsonl = epoch_blocks(
        build_plan(parse_text_data({"sources": [{"path": str(corpus / "part-0.jsonl")}], **single}), 1), 0, tokenize
    )
    parquet = epoch_blocks(
        build_plan(parse_text_data({"sources": [{"path": str(tmp_path / "part.parquet")}], **single}), 1), 0, tokenize
    )
    hf = epoch_blocks(
        build_plan(
            parse_text_data({"sources": [{"hf": "json", "data_files": str(corpus / "part-0.jsonl")}], **single}), 1
        ),
        0,
        tokenize,
    )
    assert len(jsonl) > 1000
    assert Counter(jsonl) == Counter(hf) == Counter(parquet)
    grouped = parse_text_data({"sources": [{"path": str(tmp_path / "grouped.parquet")}], **single})
    assert len(discover_shards(grouped, 0)) == -(-len(records) // 500)  # one shard per row group


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"sources": [{"path": "/no/such/file.jsonl"}]}, "data.sources[0].path: '/no/such/file.jsonl' does not exist"),
        ({"sources": [{"builtin": "wikipedia"}]}, "data.sources[0].builtin: unknown built-in source 'wikipedia'"),
        ({"sources": []}, "data.sources: must be a non-empty list"),
        ({"sources": [{"path": "x", "weight": 0}]}, "data.sources[0].weight: must be > 0"),
        ({"sources": [{"path": "x", "colour": 1}]}, "data.sources[0].colour: unknown key"),
        ({"sources": [{"path": "x"}], "seq_len": 0}, "data.seq_len: must be >= 1"),
        ({"sources": [{"path": "x", "hf": "y"}]}, "data.sources[0]: give exactly one of builtin, path or hf"),
    ],
)
def test_bad_specs_fail_at_start_with_one_line(raw, message):
    with pytest.raises(DataSpecError) as error:
        build_plan(parse_text_data(raw), 1)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_an_empty_source_and_too_few_shards_fail_at_start(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSpecError, match="no files match"):
        build_plan(parse_text_data({"sources": [{"path": str(tmp_path / "empty" / "*.jsonl")}]}), 1)
    with pytest.raises(DataSpecError, match="has 1 shards but the run has 4 logical streams"):
        build_plan(
            spec_for(
                corpus,
                min_shards=1,
                streams_per_rank=2,
                sources=[
                    {"path": str(corpus / "part-0.jsonl")},
                ],
            ),
            2,
        )


def test_shuffled_blocks_keep_their_source_labels(corpus, shakespeare_dir, tokenizer):
    """With a shuffle buffer, the (source, epoch) reported with a block is that block's own."""
    sources = [{"path": str(corpus)}, {"path": str(shakespeare_dir), "format": "txt"}]
    plain = parse_text_data(
        {"sources": sources, "seq_len": 32, "shuffle_buffer": 0, "min_shards": 4, "streams_per_rank": 1}
    )
    shuffled = parse_text_data(
        {"sources": sources, "seq_len": 32, "shuffle_buffer": 50, "min_shards": 4, "streams_per_rank": 1}
    )
    tokenize = Tokenize(tokenizer)
    plain_stream = LogicalStream(build_plan(plain, 1), 0, tokenize)
    truth = {}
    for _ in range(600):
        block, source, _ = plain_stream.next_block()
        truth[block.tobytes()] = source
    shuffled_stream = LogicalStream(build_plan(shuffled, 1), 0, tokenize)
    checked = 0
    for _ in range(400):
        block, source, _ = shuffled_stream.next_block()
        if block.tobytes() in truth:
            assert truth[block.tobytes()] == source
            checked += 1
    assert checked > 300


def test_gpt2_vocabulary_uses_tiktoken_with_identical_ids(gpt2_ranks_path, shakespeare_dir):
    from crate_lm.tokenization import gpt2_tokenizer_from_tiktoken

    gpt2 = gpt2_tokenizer_from_tiktoken(gpt2_ranks_path)
    tokenize = Tokenize(gpt2)
    assert tokenize.tiktoken is not None
    texts = [path.read_text()[:20000] for path in sorted(shakespeare_dir.glob("*.txt"))[:5]]
    fast = tokenize(texts)
    reference = [gpt2(text)["input_ids"] + [50256] for text in texts]
    assert [doc.tolist() for doc in fast] == reference


def test_a_trained_tokenizer_uses_its_own_backend(tokenizer):
    assert Tokenize(tokenizer).tiktoken is None


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_of_a_wider_world_resumes_exactly(corpus, tokenizer, rank):
    plan = build_plan(spec_for(corpus, streams_per_rank=2, shuffle_buffer=8), 2)
    loader = TextLoader(plan, tokenizer, rank=rank, micro_batch_size=2)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    state = loader.state_dict()
    expected = [next(batches)["input_ids"] for _ in range(4)]
    resumed = iter(TextLoader(plan, tokenizer, rank=rank, micro_batch_size=2, state=state))
    assert all(torch.equal(next(resumed)["input_ids"], batch) for batch in expected)


# ------------------------------------------------------------------------------------------------ never spin


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", UNUSABLE_TEXT)
def test_data_that_never_gives_a_block_is_one_line_naming_the_file_in_bounded_time(case, tokenizer, tmp_path):
    data, error_class, message = unusable_text(tmp_path, case)
    started = time.monotonic()
    with pytest.raises((BadDataError, DataSpecError)) as error:
        next(iter(TextLoader(build_plan(parse_text_data(data), 1), tokenizer, rank=0, micro_batch_size=2)))
    assert time.monotonic() - started < NEVER_SPIN_SECONDS
    assert type(error.value).__name__ == error_class and "\n" not in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)


@pytest.mark.timeout(60)
def test_a_data_error_in_a_dataloader_worker_is_the_same_one_line(tokenizer, tmp_path):
    """Not torch's 'Caught BadDataError in DataLoader worker process 0' with the worker's traceback."""
    data, _, message = unusable_text(tmp_path, "records-without-the-text-field")
    loader = TextLoader(build_plan(parse_text_data(data), 1), tokenizer, rank=0, micro_batch_size=2, num_workers=1)
    with pytest.raises(BadDataError) as error:
        next(iter(loader))
    assert "\n" not in str(error.value) and re.search(message, str(error.value)), str(error.value)


def test_a_batch_carries_only_the_buffer_slots_it_changed_and_patching_them_gives_the_whole_cursor(corpus, tokenizer):
    from data_pipeline.stream import patch_cursor

    plan = build_plan(spec_for(corpus, shuffle_buffer=64), 1)
    stream, cursor = LogicalStream(plan, 0, Tokenize(tokenizer)), None
    for number in range(6):
        batch = stream.next_batch(4)
        delta = batch["state"]["buffer_delta"]
        assert "buffer" not in batch["state"]  # the buffer itself never travels with a batch
        # the first batch fills the buffer; then each block given out frees one slot (the same slot may be drawn twice)
        assert len(delta["buffer"]) == len(delta["slots"]) == 64 if number == 0 else 1 <= len(delta["slots"]) <= 4
        cursor = patch_cursor(cursor, batch["state"], LogicalStream.BUFFER_KEYS)
        whole = stream.snapshot()
        assert whole.keys() == cursor.keys()
        assert np.array_equal(cursor["buffer"], whole["buffer"])
        assert np.array_equal(cursor["buffer_origin"], whole["buffer_origin"])
        assert {k: v for k, v in cursor.items() if "buffer" not in k} == {
            k: v for k, v in whole.items() if "buffer" not in k
        }

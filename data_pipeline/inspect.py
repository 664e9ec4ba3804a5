"""``crate data inspect``: what a data spec streams — sources and shards, a few decoded blocks, bad records,
tokens/s of one stream on this machine."""

from __future__ import annotations

from .spec import TextDataSpec
from .stream import inspect_tail
from .text_stream import LogicalStream, Tokenize, build_plan


def inspect_text(
    spec: TextDataSpec, tokenizer, world_size: int = 1, blocks: int = 3, seconds: float = 3.0, chars: int = 300
) -> str:
    plan = build_plan(spec, world_size)
    lines = [
        f"fingerprint {plan.fingerprint}; seq_len {spec.seq_len}; {plan.num_streams} streams "
        f"(world size {world_size} x {plan.streams_per_rank}); shuffle buffer {spec.shuffle_buffer} blocks"
    ]
    for index, (source, weight) in enumerate(zip(spec.sources, spec.weights, strict=True)):
        shards = plan.shards[index]
        readers = sorted({shard.reader for shard in shards})
        lines.append(
            f"source {index}: {source.label} ({source.kind}, weight {weight:.3f}): {len(shards)} shards "
            f"[{', '.join(readers)}]; stream 0 reads {len(plan.stream_shards(0, index))}"
        )
    stream = LogicalStream(plan, 0, Tokenize(tokenizer))
    for number in range(blocks):
        block, source, epoch = stream.next_block()
        text = tokenizer.decode(block.tolist())
        lines.append(f"--- block {number} (source {source}, epoch {epoch}) ---")
        lines.append(text[:chars] + (" [...]" if len(text) > chars else ""))
    lines += inspect_tail(
        stream,
        stream.next_block,
        seconds,
        lambda n, elapsed: f"{n * spec.seq_len / elapsed:,.0f} tokens/s",
        lambda stats: (
            f"{stats['documents']:,} documents, {stats['tokens']:,} tokens, {sum(stats['bad'].values())} "
            f"bad records {stats['bad'] or ''}, {stats['tail_tokens']:,} shard-tail tokens dropped"
        ),
    )
    return "\n".join(lines)

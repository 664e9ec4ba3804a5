"""Data pipeline speed, side by side in one process, on one core.

    python benchmarks/bench_data.py                      # built-in 20newsgroups, GPT-2 tokenizer, blocks of 1024

1. Tokenize + pack throughput (tokens/s, one core) of our packed stream against HF ``run_clm``'s recipe on the same
   streaming source: ``load_dataset(..., streaming=True).map(tokenize, batched=True).map(group_texts, batched=True)``
   (the functions as in transformers' examples/pytorch/language-modeling/run_clm.py). Goal: >= 3x.
2. The same throughput against what training a tiny CRATE consumes on this machine (crate-tiny, batch 8 x 256,
   forward + backward + AdamW, all cores). Goal: >= 20x.
3. Resume latency: time from building a loader with a saved cursor to its first batch, for a cursor taken at step 10
   and at step 10,000 (shuffle buffer on). Goal: the same, under 5 s.
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: no Rust thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from itertools import chain  # noqa: E402

import torch  # noqa: E402


def run_clm_tokens_per_second(files: list[str], tokenizer, block_size: int, max_tokens: int) -> float:
    import datasets

    raw = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    column_names = list(raw.features.keys()) if raw.features else ["text"]

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=column_names)
    grouped = tokenized.map(group_texts, batched=True)
    started, tokens = time.perf_counter(), 0
    for example in grouped:
        tokens += len(example["input_ids"])
        if tokens >= max_tokens:
            break
    return tokens / (time.perf_counter() - started)


def ours_tokens_per_second(plan, tokenizer, max_tokens: int) -> float:
    from data_pipeline.text_stream import LogicalStream, Tokenize

    stream = LogicalStream(plan, 0, Tokenize(tokenizer))
    started, tokens = time.perf_counter(), 0
    while tokens < max_tokens:
        block, _, _ = stream.next_block()
        tokens += len(block)
    return tokens / (time.perf_counter() - started)


def training_tokens_per_second(vocab_size: int, steps: int = 6) -> float:
    import crate_lm

    torch.set_num_threads(os.cpu_count() or 1)
    model = crate_lm.CrateForCausalLM(crate_lm.config_from_preset("crate-tiny", vocab_size=vocab_size)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, vocab_size, (8, 256))
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        model(batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
    torch.set_num_threads(1)
    return batch.numel() / statistics.median(times)


def resume_latency(plan, tokenizer, steps: list[int]) -> dict[int, float]:
    from data_pipeline.text_stream import TextLoader

    states, loader = {}, TextLoader(plan, tokenizer, rank=0, micro_batch_size=1)
    for step, _ in enumerate(loader, start=1):
        if step in steps:
            states[step] = loader.state_dict()
        if step == max(steps):
            break
    latency = {}
    for step, state in states.items():
        started = time.perf_counter()
        next(iter(TextLoader(plan, tokenizer, rank=0, micro_batch_size=1, state=state)))
        latency[step] = time.perf_counter() - started
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="20newsgroups", help="built-in source (default: 20newsgroups)")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from data_pipeline.builtin import ensure_prepared
    from data_pipeline.spec import parse_text_data
    from data_pipeline.text_stream import build_plan
    from launcher.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    files = sorted(str(p) for p in (ensure_prepared(args.source) / "train").glob("*.jsonl"))
    spec = parse_text_data(
        {
            "sources": [{"path": files[0].rsplit("/", 1)[0]}],
            "seq_len": args.block_size,
            "shuffle_buffer": 0,
            "streams_per_rank": 1,
            "min_shards": 1,
        }
    )
    plan = build_plan(spec, 1)

    ours, theirs = [], []
    for _ in range(args.rounds):  # interleaved
        ours.append(ours_tokens_per_second(plan, tokenizer, args.tokens))
        theirs.append(run_clm_tokens_per_second(files, tokenizer, args.block_size, args.tokens))
    ours_rate, theirs_rate = statistics.median(ours), statistics.median(theirs)
    consumed = training_tokens_per_second(len(tokenizer))

    resume_spec = parse_text_data(
        {
            "sources": [{"path": files[0].rsplit("/", 1)[0]}],
            "seq_len": 128,
            "shuffle_buffer": 256,
            "streams_per_rank": 2,
            "min_shards": 8,
        }
    )
    latency = resume_latency(build_plan(resume_spec, 1), tokenizer, [10, 10_000])

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "source": args.source,
        "block_size": args.block_size,
        "ours_tokens_per_s_one_core": ours_rate,
        "run_clm_tokens_per_s_one_core": theirs_rate,
        "ratio_vs_run_clm": ours_rate / theirs_rate,
        "crate_tiny_training_tokens_per_s": consumed,
        "ratio_vs_training": ours_rate / consumed,
        "resume_latency_s": latency,
    }
    print(f"machine: {results['machine']}; source {args.source}, GPT-2 tokenizer, blocks of {args.block_size}")
    print(
        f"tokenize+pack, one core: ours {ours_rate:,.0f} tokens/s   run_clm map+group_texts {theirs_rate:,.0f} "
        f"tokens/s   ratio {ours_rate / theirs_rate:.2f}x (goal >= 3x)"
    )
    print(
        f"crate-tiny training consumes {consumed:,.0f} tokens/s (all cores): pipeline on one core is "
        f"{ours_rate / consumed:.1f}x that (goal >= 20x)"
    )
    print(f"resume latency: step 10 {latency[10]:.2f} s, step 10,000 {latency[10_000]:.2f} s (goal: equal, < 5 s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

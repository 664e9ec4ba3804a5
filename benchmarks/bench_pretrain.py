"""`crate pretrain` against a bare PyTorch loop, and ZeRO-3's memory saving, side by side in one run.

    python benchmarks/bench_pretrain.py                       # crate-tiny on Shakespeare, CPU
    python benchmarks/bench_pretrain.py --rounds 3 --steps 60

1. Step throughput: `crate pretrain` (one process, the run config's ZeRO stage, metrics, data loader, checkpoints off)
   against a bare loop on the same model, the same batches (read beforehand from the same packed stream) and the same
   optimizer settings: forward, backward, clip, AdamW, zero_grad — nothing else. Median step time over the steps after
   warm-up; rounds alternate (ours, bare, ours, bare, ...) and each side keeps its best round. Goal: >= 0.90x.
   Also reported: the run's MFU (analytic FLOPs against the matmul peak measured at its start).
2. Model-state memory per rank at 2 ranks, ZeRO-3 against ZeRO-0 (parameters + gradients + optimizer states, each
   storage counted once, as `crate pretrain` logs it in its `model_state` row). Goal: <= 0.55x.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from pretrain_runs import (
    REPO,
    SIDE_JOBS_OFF,
    bare_model_and_optimizer,
    bare_step,
    harness_step_times,
    pretrain,
    same_batches,
    timed_run,
)


def bare_step_times(config, tokenizer, batches: list[torch.Tensor], warmup: int, accumulation: int = 1) -> list[float]:
    """The bare PyTorch loop on the same model (same init seed), batches and optimizer settings, timed per step;
    ``accumulation`` micro-batches per optimizer step."""
    model, optimizer = bare_model_and_optimizer(config, tokenizer, torch.device("cpu"))
    times = []
    for index in range(len(batches) // accumulation):
        started = time.perf_counter()
        group = batches[index * accumulation : (index + 1) * accumulation]
        bare_step(model, optimizer, group, config.optimizer.grad_clip).item()  # one host read per step
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def throughput(args, scratch: Path) -> dict:
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import load_tokenizer, prepare_tokenizer

    overrides = [*timed_run(args.steps, args.log_every), *args.overrides]
    config = load_run_config(args.config, [*overrides, f"output_dir={scratch / 'tokenizer-run'}"])
    overrides.append(f"train.global_batch_size={config.train.micro_batch_size * args.accumulation}")
    prepare_tokenizer(config.tokenizer, config.output_dir, config.data)
    tokenizer = load_tokenizer(config.tokenizer, output_dir=config.output_dir)
    tokenizer_override = (
        [f"tokenizer={scratch / 'tokenizer-run' / 'tokenizer'}"] if config.tokenizer.startswith("bpe:") else []
    )
    batches = same_batches(config, tokenizer, args.steps * args.accumulation)
    stages = sorted({config.zero.stage, 0})
    ours, bare, mfu = {stage: [] for stage in stages}, [], []
    for round_index in range(args.rounds):
        for stage in stages:
            rows = pretrain(
                args.config,
                scratch / f"ours-{round_index}-zero{stage}",
                [*overrides, *tokenizer_override, f"zero.stage={stage}"],
                repo=args.repo,
            )
            ours[stage].append(statistics.median(harness_step_times(rows, args.warmup)))
            mfu.append(statistics.median(row["mfu"] for row in rows if row.get("mfu") is not None))
        bare.append(statistics.median(bare_step_times(config, tokenizer, batches, args.warmup, args.accumulation)))
        print(
            f"round {round_index}: bare loop {bare[-1] * 1e3:.1f} ms/step; crate pretrain "
            + ", ".join(
                f"ZeRO-{stage} {ours[stage][-1] * 1e3:.1f} ms/step (ratio {bare[-1] / ours[stage][-1]:.3f})"
                for stage in stages
            ),
            flush=True,
        )
    tokens = config.train.micro_batch_size * args.accumulation * config.data.seq_len
    return {
        "accumulation": args.accumulation,
        "bare_ms": min(bare) * 1e3,
        "tokens_per_step": tokens,
        "mfu": max(mfu),
        "stages": {
            stage: {"ours_ms": min(times) * 1e3, "ratio": min(bare) / min(times), "tokens_per_s": tokens / min(times)}
            for stage, times in ours.items()
        },
    }


def zero_memory(args, scratch: Path) -> dict:
    shape = [
        "model.preset=null",
        f"model.hidden_size={args.memory_width}",
        "model.num_hidden_layers=4",
        "model.num_attention_heads=8",
        "train.max_steps=2",
        *SIDE_JOBS_OFF,
        "train.micro_batch_size=2",
        "data.seq_len=64",
        "model.max_position_embeddings=64",
        *args.overrides,
    ]
    if (scratch / "tokenizer-run" / "tokenizer").is_dir():
        shape.append(f"tokenizer={scratch / 'tokenizer-run' / 'tokenizer'}")
    result = {}
    for stage in (0, 3):
        rows = pretrain(args.config, scratch / f"zero{stage}", [*shape, f"zero.stage={stage}"], nproc=2)
        row = next(r for r in rows if r.get("event") == "model_state")
        params = next(r for r in rows if r.get("event") == "start")["params"]
        result[f"zero{stage}_gib"] = row["max_model_state_gib"]
        print(
            f"ZeRO-{stage}: {row['max_model_state_gib'] * 1024:.1f} MiB model state on the fullest rank "
            f"({params / 1e6:.1f}M parameters, 2 ranks)",
            flush=True,
        )
    result["ratio"] = result["zero3_gib"] / result["zero0_gib"]
    result["params"] = params
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "lm" / "crate-tiny.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10, help="the harness's metrics interval")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step (both loops)")
    parser.add_argument("--no-memory", action="store_true", help="skip the ZeRO-3 memory part")
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="the checkout whose `crate pretrain` is measured (e.g. an older one)"
    )
    parser.add_argument("--memory-width", type=int, default=512, help="hidden size of the ZeRO memory model")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both runs")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        speed = throughput(args, Path(scratch))
        for stage, result in speed["stages"].items():
            print(
                f"step throughput, crate pretrain (ZeRO-{stage}) / bare PyTorch loop: {result['ratio']:.3f}x "
                f"(goal >= {0.95 if args.accumulation > 1 else 0.90}) — "
                f"{result['ours_ms']:.1f} vs {speed['bare_ms']:.1f} ms/step, "
                f"{result['tokens_per_s']:,.0f} tokens/s"
            )
        print(f"CPU MFU of the CRATE run (analytic FLOPs / measured fp32 matmul peak): {speed['mfu']:.1%}")
        memory = None
        if not args.no_memory:
            memory = zero_memory(args, Path(scratch))
            print(f"model-state memory per rank at 2 ranks, ZeRO-3 / ZeRO-0: {memory['ratio']:.3f}x (goal <= 0.55)")
    print(json.dumps({"throughput": speed, "zero_memory": memory}))


if __name__ == "__main__":
    main()

"""Does the harness train a transformer as well as a bare reference loop? Side by side in one run, same tokens.

    python benchmarks/mixing_vs_reference.py                    # 600 steps, 1 seed, ours (new mixing) vs reference
    python benchmarks/mixing_vs_reference.py --seeds 3 --before # + the old mixing (1 open shard, 64-block buffer)

Results and the machine: docs/benchmarks.md.

Ours: ``crate pretrain configs/lm/gpt2-tiny.yaml`` (HF GPT-2, d 128, 4 layers, 4 heads, T 128, the built-in
Shakespeare tokenized by the run's BPE-4096; batch 16, 600 steps, AdamW (0.9, 0.95), weight decay 0.1, lr 1e-3 ->
1e-4 cosine after 30 warm-up steps, clip 1.0, no dropout), one process, the shipped data settings.

Reference: a plain PyTorch loop written here: the same model config and init seed, the same recipe, but each batch
is 16 windows of 128 tokens drawn uniformly at random from the whole training split (every document followed by EOS,
concatenated): i.i.d. sampling, the standard a stream's mixing is measured against.

Both are scored on the same held-out tokens: the first 675 blocks of 128 tokens (86,400) of the validation split,
as the harness's own evaluation reads them, with the run's tokenizer; the loss is the mean next-token cross-entropy.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "lm" / "gpt2-tiny.yaml"
HELD_OUT_BLOCKS = 675
OLD_MIXING = ["data.open_shards=1", "data.shuffle_buffer=64"]  # the shipped settings before open shards


def run_ours(output_dir: Path, steps: int, seed: int, extra: list[str]) -> float:
    overrides = [
        f"output_dir={output_dir}",
        f"train.max_steps={steps}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        "train.eval_every=0",
        "train.whitebox_every=0",
        f"train.save_every={steps}",
        *extra,
    ]
    started = time.time()
    command = [sys.executable, "-m", "launcher.cli", "pretrain", str(CONFIG), *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"crate pretrain failed:\n{result.stderr[-3000:]}")
    print(f"  ours {' '.join(extra) or '(shipped mixing)'} seed {seed}: {time.time() - started:.0f} s", flush=True)
    from transformers import AutoModelForCausalLM

    return held_out_loss(AutoModelForCausalLM.from_pretrained(output_dir / "hf"), held_out(output_dir))


def held_out(output_dir: Path) -> torch.Tensor:
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import load_tokenizer
    from launcher.train.tasks import fixed_blocks, held_out_spec

    config = load_run_config(output_dir / "config.yaml")
    tokenizer = load_tokenizer(config.tokenizer, output_dir=config.output_dir)
    return fixed_blocks(held_out_spec(config), tokenizer, HELD_OUT_BLOCKS)


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor, batch: int = 75) -> float:
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in blocks.split(batch)]
    return statistics.mean(losses)  # equal-sized chunks: the mean over all predicted tokens


def training_tokens(output_dir: Path) -> np.ndarray:
    """The whole training split as one array: every document tokenized and followed by EOS."""
    from data_pipeline.sources import discover_shards, read_shard
    from data_pipeline.text_stream import Tokenize
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import load_tokenizer

    config = load_run_config(output_dir / "config.yaml")
    tokenize = Tokenize(load_tokenizer(config.tokenizer, output_dir=config.output_dir))
    spec = config.data.model_copy(update={"min_shards": 1})
    source = spec.sources[0]
    texts = [doc.text for shard in discover_shards(spec, 0) for doc in read_shard(shard, None, source) if not doc.bad]
    return np.concatenate(tokenize(texts))


def run_reference(output_dir: Path, tokens: np.ndarray, steps: int, seed: int) -> float:
    """The bare loop: uniform random windows, the run's model config, the same recipe."""
    from transformers import AutoConfig, GPT2LMHeadModel

    from launcher.config.run import load_run_config

    config = load_run_config(output_dir / "config.yaml")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(AutoConfig.from_pretrained(output_dir / "hf")).train()
    opt = config.optimizer
    decayed = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wte" not in n and "wpe" not in n]
    plain = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wte" not in n and "wpe" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": opt.weight_decay}, {"params": plain, "weight_decay": 0.0}],
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
    )
    seq_len, batch = config.data.seq_len, config.train.micro_batch_size
    generator = np.random.default_rng(seed)
    data = torch.from_numpy(tokens.astype(np.int64))
    started = time.time()
    for step in range(steps):
        if step < opt.warmup_steps:
            lr = opt.lr * (step + 1) / opt.warmup_steps
        else:
            progress = (step - opt.warmup_steps) / max(1, steps - opt.warmup_steps)
            lr = opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = generator.integers(0, len(data) - seq_len, size=batch)
        windows = torch.stack([data[s : s + seq_len] for s in starts])
        loss = model(input_ids=windows, labels=windows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"  reference seed {seed}: {time.time() - started:.0f} s", flush=True)
    return held_out_loss(model, held_out(output_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--before", action="store_true", help="also the old mixing: " + " ".join(OLD_MIXING))
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    results: dict[str, list[float]] = {"ours": [], "reference": []}
    if args.before:
        results["ours, old mixing"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            ours_dir = Path(tmp) / f"ours-{seed}"
            results["ours"].append(run_ours(ours_dir, args.steps, seed, []))
            tokens = training_tokens(ours_dir)
            results["reference"].append(run_reference(ours_dir, tokens, args.steps, seed))
            if args.before:
                results["ours, old mixing"].append(run_ours(Path(tmp) / f"old-{seed}", args.steps, seed, OLD_MIXING))
            print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in results.items()), flush=True)
    print(f"\nheld-out loss on {HELD_OUT_BLOCKS * 128:,} validation tokens after {args.steps} steps:")
    for name, values in results.items():
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        print(f"  {name:18s} {statistics.mean(values):.4f}{spread}  (seeds: {', '.join(f'{v:.4f}' for v in values)})")
    for name in [k for k in results if k != "reference"]:
        gaps = [a - b for a, b in zip(results[name], results["reference"])]
        print(
            f"  {name} - reference: {statistics.mean(gaps):+.4f} nats "
            f"(per seed: {', '.join(f'{g:+.4f}' for g in gaps)})"
        )


if __name__ == "__main__":
    main()

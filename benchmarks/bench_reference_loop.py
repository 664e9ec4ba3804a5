"""`crate pretrain` against what a user would pick instead: a minimal GPT training loop, side by side in one run.

    python benchmarks/bench_reference_loop.py                  # gpt2-tiny's shape (d 128, 4 layers) and d 256 x 6
    python benchmarks/bench_reference_loop.py --rounds 3 --steps 60 --sizes 128x4

Three loops train the same shape (width x depth, heads of 32, T 128, batch 16, the run's BPE-4096 vocabulary, tied
embeddings, GELU MLP of 4d, no dropout) with the same recipe (AdamW (0.9, 0.95), weight decay 0.1, clip 1.0), one
process, fp32:

1. **ours**: `crate pretrain configs/lm/gpt2-tiny.yaml zero.stage=0` (HF `GPT2LMHeadModel`, the streaming loader,
   metrics, the non-finite guard): wall time per step between logged steps, everything included;
2. **bare HF**: a bare PyTorch loop on the same HF model and the same batches (forward, backward, clip, AdamW);
3. **reference**: a minimal GPT written here in plain PyTorch (nanoGPT's shape: fused QKV projection,
   `scaled_dot_product_attention(is_causal=True)`, pre-LayerNorm blocks) trained on uniform random windows of the
   same training tokens.

ours/reference is the ratio a user sees (goal >= 0.95); ours/bare-HF is the harness's own overhead, and
bare-HF/reference the cost of HF's GPT-2 implementation. Rounds alternate the three loops; each keeps its best round
(the median step time after warm-up). Results and the machine: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_pretrain import bare_step_times  # noqa: E402
from pretrain_runs import SIDE_JOBS_OFF, harness_step_times, pretrain, same_batches  # noqa: E402

CONFIG = REPO / "configs" / "lm" / "gpt2-tiny.yaml"
HEAD_DIM = 32


class ReferenceBlock(nn.Module):
    """Pre-LayerNorm: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``; causal SDPA over one fused QKV projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_attention, self.ln_mlp = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.ln_attention(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        x = x + self.out(attended)
        return x + self.down(F.gelu(self.up(self.ln_mlp(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    """Token and position embeddings, the blocks, a final LayerNorm and the tied output layer."""

    def __init__(self, vocab: int, positions: int, width: int, depth: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(positions, width)
        self.blocks = nn.ModuleList(ReferenceBlock(width, width // HEAD_DIM) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tokens(inputs) + self.positions(torch.arange(inputs.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_final(x) @ self.tokens.weight.T
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def reference_step_times(tokens: np.ndarray, shape: dict, steps: int, warmup: int, seed: int = 0) -> list[float]:
    """The reference loop: random windows of ``seq_len + 1`` tokens (inputs and their next tokens)."""
    torch.manual_seed(seed)
    model = ReferenceGPT(shape["vocab"], shape["positions"], shape["width"], shape["depth"]).train()
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95)
    )
    data, generator = torch.from_numpy(tokens.astype(np.int64)), np.random.default_rng(seed)
    seq_len, batch, times = shape["seq_len"], shape["batch"], []
    for step in range(steps):
        started = time.perf_counter()
        starts = generator.integers(0, len(data) - seq_len - 1, size=batch)
        windows = torch.stack([data[s : s + seq_len + 1] for s in starts])
        loss = model(windows[:, :-1], windows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["128x4", "256x6"], help="WIDTHxDEPTH")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose `crate pretrain` is measured")
    args = parser.parse_args()
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import load_tokenizer, prepare_tokenizer

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"machine: {machine}", flush=True)
    results = {"machine": machine, "sizes": {}}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for size in args.sizes:
            width, depth = (int(part) for part in size.split("x"))
            overrides = [
                f"model.hidden_size={width}",
                f"model.num_hidden_layers={depth}",
                f"model.num_attention_heads={width // HEAD_DIM}",
                f"train.max_steps={args.steps}",
                "train.log_every=5",
                *SIDE_JOBS_OFF,
                "zero.stage=0",
            ]
            config = load_run_config(CONFIG, [*overrides, f"output_dir={scratch / 'tokenizer-run'}"])
            prepare_tokenizer(config.tokenizer, config.output_dir, config.data)
            tokenizer = load_tokenizer(config.tokenizer, output_dir=config.output_dir)
            overrides.append(f"tokenizer={scratch / 'tokenizer-run' / 'tokenizer'}")
            batches = same_batches(config, tokenizer, args.steps)
            tokens = np.concatenate([batch.numpy().ravel() for batch in batches])  # the same tokens, as one array
            shape = {
                "vocab": len(tokenizer),
                "positions": config.model.max_position_embeddings,
                "width": width,
                "depth": depth,
                "seq_len": config.data.seq_len,
                "batch": config.train.micro_batch_size,
            }
            ours, bare, reference = [], [], []
            for round_index in range(args.rounds):
                rows = pretrain(str(CONFIG), scratch / f"ours-{size}-{round_index}", overrides, repo=args.repo)
                ours.append(statistics.median(harness_step_times(rows, args.warmup)))
                bare.append(statistics.median(bare_step_times(config, tokenizer, batches, args.warmup)))
                reference.append(statistics.median(reference_step_times(tokens, shape, args.steps, args.warmup)))
                print(
                    f"d {width} x {depth}, round {round_index}: ours {ours[-1] * 1e3:.1f}, bare HF "
                    f"{bare[-1] * 1e3:.1f}, reference {reference[-1] * 1e3:.1f} ms/step",
                    flush=True,
                )
            per_step = shape["batch"] * shape["seq_len"]
            best = {"ours": min(ours), "bare_hf": min(bare), "reference": min(reference)}
            results["sizes"][size] = {
                **{f"{name}_tokens_per_s": per_step / seconds for name, seconds in best.items()},
                "ours_over_reference": best["reference"] / best["ours"],
                "ours_over_bare_hf": best["bare_hf"] / best["ours"],
                "bare_hf_over_reference": best["reference"] / best["bare_hf"],
            }
            row = results["sizes"][size]
            print(
                f"d {width} x {depth}: ours {row['ours_tokens_per_s']:,.0f}, bare HF "
                f"{row['bare_hf_tokens_per_s']:,.0f}, reference {row['reference_tokens_per_s']:,.0f} tokens/s; "
                "ours/reference "
                f"{row['ours_over_reference']:.3f}x (goal >= 0.95), ours/bare HF {row['ours_over_bare_hf']:.3f}x, "
                f"bare HF/reference {row['bare_hf_over_reference']:.3f}x",
                flush=True,
            )
    print(json.dumps(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

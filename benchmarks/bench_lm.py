"""CRATE vs HF GPT-2, measured side by side in one process: training throughput, generation, cache size, MFU.

    python benchmarks/bench_lm.py                     # defaults: d=512, 6 layers, 8 heads, vocab 8192, T=256
    python benchmarks/bench_lm.py --hidden 768 --layers 12 --heads 12 --vocab 50257 --batch 4 --rounds 3

Reported (each a ratio of medians over interleaved rounds, so both models see the same machine state):

* forward+backward tokens/s, CRATE / GPT-2 at equal width and depth;
* the same at matched parameter count: GPT-2 with L layers against CRATE with 4L layers of the same width
  (a CRATE layer has 3d^2 + 5d parameters, a GPT-2 layer 12d^2 + 13d);
* greedy generation tokens/s with each model's cache, and the bytes that cache holds at the end;
* MFU of a full training step (forward, backward, AdamW) against the fp32 matmul peak measured here, from the
  analytic FLOPs in ``launcher/architectures/flops.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import crate_lm
from crate_lm.configuration_crate import VARIANT_KNOBS
from launcher.architectures.registry import training_flops_per_token


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of this machine (FLOP/s), the denominator of CPU MFU. The benchmark takes it between the
    training steps, interleaved with them, so that both see the same clock and load."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def build_crate(args, layers: int) -> crate_lm.CrateForCausalLM:
    config = crate_lm.CrateConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        max_position_embeddings=max(1024, args.seq_len + args.new_tokens + args.prompt),
        bos_token_id=0,
        eos_token_id=0,
        **VARIANT_KNOBS[args.variant],
    )
    return crate_lm.CrateForCausalLM(config)


def build_gpt2(args, layers: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.hidden,
        n_layer=layers,
        n_head=args.heads,
        n_positions=max(1024, args.seq_len + args.new_tokens + args.prompt),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def train_step_seconds(model, batch: torch.Tensor, optimizer=None) -> float:
    start = time.perf_counter()
    loss = model(batch, labels=batch, use_cache=False).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def interleaved(models: dict, measure, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median of ``measure(model)`` per model, rounds interleaved A B A B so drift hits both alike."""
    for model in models.values():
        for _ in range(warmup):
            measure(model)
    samples = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            samples[name].append(measure(model))
    return {name: statistics.median(values) for name, values in samples.items()}


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="crate", choices=sorted(VARIANT_KNOBS))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    tokens = batch.numel()
    crate, gpt2 = build_crate(args, args.layers).train(), build_gpt2(args, args.layers).train()
    crate_deep = build_crate(args, 4 * args.layers).train()
    params = {
        name: crate_lm.count_parameters(model)
        if name != "gpt2"
        else sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n)
        for name, model in (("crate", crate), ("crate_4L", crate_deep), ("gpt2", gpt2))
    }

    fwd_bwd = interleaved(
        {"crate": crate, "gpt2": gpt2, "crate_4L": crate_deep}, lambda m: train_step_seconds(m, batch), args.rounds
    )
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (crate, gpt2)}
    peaks = []

    def step_then_peak(model) -> float:
        seconds = train_step_seconds(model, batch, optimizers[model])
        peaks.append(matmul_peak_flops())
        return seconds

    full_step = interleaved({"crate": crate, "gpt2": gpt2}, step_then_peak, args.rounds)
    peak = statistics.median(peaks)
    mfu = {
        name: training_flops_per_token(model.config, args.seq_len, tokens) * tokens / full_step[name] / peak
        for name, model in (("crate", crate), ("gpt2", gpt2))
    }

    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    generation_bytes = {}

    def generate_seconds(model) -> float:
        model.eval()
        start = time.perf_counter()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        seconds = time.perf_counter() - start
        generation_bytes[type(model).__name__] = cache_bytes(out.cache)
        return seconds

    with torch.no_grad():
        generation = interleaved({"crate": crate, "gpt2": gpt2}, generate_seconds, args.rounds)
    crate_cache, gpt2_cache = generation_bytes["CrateForCausalLM"], generation_bytes["GPT2LMHeadModel"]

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "shape": {k: getattr(args, k) for k in ("variant", "hidden", "layers", "heads", "vocab", "seq_len", "batch")},
        "params_excluding_positions": params,
        "matmul_peak_gflops": peak / 1e9,
        "fwd_bwd_tokens_per_s": {k: tokens / v for k, v in fwd_bwd.items()},
        "ratio_equal_width_depth": fwd_bwd["gpt2"] / fwd_bwd["crate"],
        "ratio_matched_params": fwd_bwd["gpt2"] / fwd_bwd["crate_4L"],
        "train_step_tokens_per_s": {k: tokens / v for k, v in full_step.items()},
        "mfu": mfu,
        "generation_tokens_per_s": {k: args.new_tokens / v for k, v in generation.items()},
        "ratio_generation": generation["gpt2"] / generation["crate"],
        "cache_bytes": {"crate": crate_cache, "gpt2": gpt2_cache},
        "ratio_cache_bytes": crate_cache / gpt2_cache,
    }
    print(f"machine: {results['machine']}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"shape: {results['shape']}")
    print(
        f"params (no position table): CRATE {params['crate'] / 1e6:.2f}M, CRATE 4L {params['crate_4L'] / 1e6:.2f}M, "
        f"GPT-2 {params['gpt2'] / 1e6:.2f}M"
    )
    print(
        f"fwd+bwd tokens/s: CRATE {tokens / fwd_bwd['crate']:,.0f}  CRATE-4L {tokens / fwd_bwd['crate_4L']:,.0f}  "
        f"GPT-2 {tokens / fwd_bwd['gpt2']:,.0f}"
    )
    print(f"  ratio CRATE/GPT-2, equal width and depth: {results['ratio_equal_width_depth']:.2f}x  (goal >= 1.8x)")
    print(f"  ratio CRATE/GPT-2, matched parameters:    {results['ratio_matched_params']:.2f}x  (goal >= 1.0x)")
    print(f"training step (fwd+bwd+AdamW) MFU: CRATE {mfu['crate']:.2f}  GPT-2 {mfu['gpt2']:.2f}  (goal >= 0.6)")
    print(
        f"generation tokens/s (batch 1, {args.new_tokens} new): CRATE {args.new_tokens / generation['crate']:,.1f}  "
        f"GPT-2 {args.new_tokens / generation['gpt2']:,.1f}  ratio {results['ratio_generation']:.2f}x (goal >= 1.0x)"
    )
    print(
        f"cache bytes after generation: CRATE {crate_cache:,}  GPT-2 {gpt2_cache:,}  "
        f"ratio {results['ratio_cache_bytes']:.2f}x (goal 0.5x)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

"""GPU throughput and MFU of the published ~124M LMs: `crate pretrain` against a bare PyTorch loop, one GPU, bf16.

    python benchmarks/bench_gpu.py                                    # the five models, T 1024, micro-batch 16
    python benchmarks/bench_gpu.py --models gpt2-124m llama-124m --steps 200 --out gpu.json
    python benchmarks/bench_gpu.py --smoke                            # tiny shapes on whatever device is here

Models (configs/lm/published/, built through the architecture registry): Causal-CRATE-Base, CRATE-alpha-B (the LM
base preset), ToST-B, GPT-2-124M, and Llama at GPT-2-124M's width, depth, heads and vocabulary (``model.arch=llama``
on gpt2-124m.yaml). Each model is measured twice on the same device:

(a) the harness: ``python -m launcher.cli pretrain CONFIG ...`` (the real loop, one process, the config's ZeRO stage
    and precision — bf16 on a GPU), on the built-in Shakespeare corpus with the GPT-2 tokenizer (no network needed),
    one micro-batch per step (no accumulation), evaluation, checkpoints, white-box probe and export off. Its tokens/s
    is the median of the ``tokens_per_s`` its metrics.jsonl rows log (each the mean over the meter's last
    ``WINDOW_STEPS`` steps), over the rows whose window lies past ``--warmup``;
(b) a bare loop in this process on the same model (``launcher.models.build``, the same seed), the same batches read
    beforehand and moved to the device, the same AdamW settings and decay groups: bf16 autocast on fp32 weights (the
    harness's DeepSpeed bf16 keeps bf16 weights and fp32 master weights: the same matmuls), forward, backward, clip,
    AdamW (fused on CUDA), zero_grad — nothing else; timed from the end of ``--warmup`` steps to the last, the device
    synchronised at both ends only.

MFU = tokens/s x training FLOPs per token / peak, with the FLOPs the harness uses (its ``start`` row: the registry's
formula, or for Llama the count of its first step, ``flops_counted``) for both sides. Peak: ``--peak-tflops`` if
given, else the device's dense bf16 peak from launcher/metrics/peaks.py, else 989.4 TFLOP/s (H100 SXM / H200); on the
CPU (``--smoke``) the GEMM peak the harness timed at its start. Goals: GPT-2-124M >= 40% MFU, the CRATE models
(Causal-CRATE, CRATE-alpha, ToST) >= 45%, harness/bare >= 0.95 for every model.

Prints a markdown table (for docs/benchmarks.md) and writes JSON (``--out``): machine, versions, GPU, settings, and
per model both measurements.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pretrain_runs import REPO, bare_model_and_optimizer, bare_step, pretrain, same_batches, timed_run

PUBLISHED = REPO / "configs" / "lm" / "published"

# name -> (published config, overrides that make the model)
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "causal-crate-base": ("causal-crate-base.yaml", ()),
    "crate-alpha-lm-base": ("crate-alpha-lm-base.yaml", ()),
    "tost-base": ("tost-base.yaml", ()),
    "gpt2-124m": ("gpt2-124m.yaml", ()),
    "llama-124m": ("gpt2-124m.yaml", ("model.arch=llama",)),
}
MFU_GOALS = {"gpt2-124m": 0.40, "causal-crate-base": 0.45, "crate-alpha-lm-base": 0.45, "tost-base": 0.45}
RATIO_GOAL = 0.95
# Dense bf16 tensor-core peak of an H100 SXM, which the H200 shares: the denominator for a GPU peaks.py does not know.
HOPPER_BF16_PEAK = 989.4e12

# --smoke: shapes small enough for a 2-core CPU, so the whole script is checked end to end where there is no GPU.
SMOKE_SIZES = {"seq_len": 64, "micro_batch": 2, "steps": 4, "warmup": 1, "log_every": 1}
SMOKE_MODEL = ("model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2")


def run_overrides(args, model_overrides: tuple[str, ...]) -> list[str]:
    """The harness's overrides of a model's published config: the benchmark's data, shape and budget, side jobs off."""
    return [
        *model_overrides,
        *(SMOKE_MODEL if args.smoke else ()),
        "data.sources=[{builtin: shakespeare}]",  # on the machine, unlike OpenWebText; speed does not depend on text
        f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}",  # one device, no accumulation: a step is one micro-batch
        *timed_run(args.steps, args.log_every),
        *args.overrides,
    ]


def harness_measure(rows: list[dict], warmup: int) -> dict:
    """Tokens/s and facts of a harness run, from its metrics rows (module docstring)."""
    from launcher.metrics.throughput import WINDOW_STEPS

    start = next(row for row in rows if row.get("event") == "start")
    counted = next((row for row in rows if row.get("event") == "flops_counted"), {})
    timed = [row for row in rows if row["kind"] == "train" and "tokens_per_s" in row]
    past_warmup = [row for row in timed if row["step"] - WINDOW_STEPS >= warmup]
    # Too few steps for a window past the warm-up (--smoke): the last row, its window reaching into the warm-up.
    chosen = past_warmup or timed[-1:]
    return {
        "tokens_per_s": statistics.median(row["tokens_per_s"] for row in chosen),
        "logged_mfu": statistics.median(row["mfu"] for row in chosen) if "mfu" in chosen[0] else None,
        "rows": [row["step"] for row in chosen],
        "window_includes_warmup": not past_warmup,
        "flops_per_token": start["flops_per_token"] or counted["flops_per_token"],
        "params": start["params"],
        "precision": start["precision"],
        "peak_flops": start["peak_flops"],
        "peak_source": start["peak_source"],
    }


def bare_tokens_per_s(
    config, tokenizer, batches: list[torch.Tensor], warmup: int, device: torch.device, autocast: torch.dtype | None
) -> float:
    """The bare loop's tokens/s over the steps after ``warmup`` (module docstring, (b)); ``autocast``: bf16 or
    None (fp32)."""
    from launcher.train.step import synchronize

    model, optimizer = bare_model_and_optimizer(config, tokenizer, device, fused=device.type == "cuda")
    clip = config.optimizer.grad_clip
    for batch in batches[:warmup]:
        bare_step(model, optimizer, batch, clip, autocast)
    synchronize(device)
    started = time.perf_counter()
    for batch in batches[warmup:]:
        bare_step(model, optimizer, batch, clip, autocast)
    synchronize(device)
    elapsed = time.perf_counter() - started
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next harness run gets the whole device
    return sum(batch.numel() for batch in batches[warmup:]) / elapsed


def peak_for(args, device: torch.device, harness: dict) -> tuple[float, str]:
    """The MFU denominator (module docstring): the flag, peaks.py's table (as the harness read it), the Hopper
    constant on an unknown GPU, or on the CPU the harness's timed GEMM."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if harness["peak_source"].startswith("table:") or device.type != "cuda":
        return harness["peak_flops"], harness["peak_source"]
    return HOPPER_BF16_PEAK, "H100 SXM / H200 dense bf16 (the device is not in launcher/metrics/peaks.py)"


def measure(name: str, args, scratch: Path, device: torch.device, batches: dict) -> dict:
    """Both sides for one model, ``args.rounds`` times (harness, bare, harness, bare, ...); each keeps its best."""
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import load_tokenizer
    from launcher.train.engine import resolve_precision

    config_file, model_overrides = MODELS[name]
    overrides = run_overrides(args, model_overrides)
    config = load_run_config(str(PUBLISHED / config_file), [*overrides, f"output_dir={scratch / 'bare'}"])
    tokenizer = load_tokenizer(config.tokenizer, output_dir=config.output_dir)
    precision = resolve_precision(config, device.type)  # as the harness resolves it: bf16 on a GPU
    autocast = torch.bfloat16 if precision == "bf16" else None
    if config.tokenizer not in batches:  # every model reads the same stream: read it once
        batches[config.tokenizer] = [b.to(device) for b in same_batches(config, tokenizer, args.steps)]
    harness_runs, bare = [], []
    for round_index in range(args.rounds):
        rows = pretrain(str(PUBLISHED / config_file), scratch / f"{name}-{round_index}", overrides)
        harness_runs.append(harness_measure(rows, args.warmup))
        bare.append(bare_tokens_per_s(config, tokenizer, batches[config.tokenizer], args.warmup, device, autocast))
        print(
            f"  {name} round {round_index}: harness {harness_runs[-1]['tokens_per_s']:,.0f} tokens/s, "
            f"bare {bare[-1]:,.0f} tokens/s",
            flush=True,
        )
    harness = max(harness_runs, key=lambda run: run["tokens_per_s"])
    peak, peak_source = peak_for(args, device, harness)
    flops = harness["flops_per_token"]
    bare_best = max(bare)
    return {
        "model": name,
        "config": f"configs/lm/published/{config_file}",
        "overrides": overrides,
        "params": harness["params"],
        "flops_per_token": flops,
        "peak_flops": peak,
        "peak_source": peak_source,
        "harness": {**harness, "mfu": harness["tokens_per_s"] * flops / peak},
        "bare": {"tokens_per_s": bare_best, "mfu": bare_best * flops / peak, "precision": precision},
        "harness_rounds": [run["tokens_per_s"] for run in harness_runs],
        "bare_rounds": bare,
        "ratio": harness["tokens_per_s"] / bare_best,
        "mfu_goal": MFU_GOALS.get(name),
        "ratio_goal": RATIO_GOAL,
    }


def machine(device: torch.device) -> dict:
    """What the numbers were measured on, for the docs."""
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": importlib.metadata.version("deepspeed"),
        "transformers": importlib.metadata.version("transformers"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def goal_cell(result: dict) -> str:
    parts = []
    if result["mfu_goal"] is not None:
        met = "met" if result["harness"]["mfu"] >= result["mfu_goal"] else "**not met**"
        parts.append(f"MFU >= {result['mfu_goal']:.0%}: {met}")
    met = "met" if result["ratio"] >= result["ratio_goal"] else "**not met**"
    parts.append(f"ratio >= {result['ratio_goal']}: {met}")
    return "; ".join(parts)


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| model | params | harness tokens/s | bare tokens/s | harness / bare | harness MFU | bare MFU | goals |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['harness']['tokens_per_s']:,.0f} | "
            f"{r['bare']['tokens_per_s']:,.0f} | **{r['ratio']:.3f}** | {r['harness']['mfu']:.1%} | "
            f"{r['bare']['mfu']:.1%} | {goal_cell(r)} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (each side)")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--log-every", type=int, default=10, help="the harness's metrics interval")
    parser.add_argument("--rounds", type=int, default=1, help="harness/bare pairs per model; each side keeps its best")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the MFU denominator, overriding peaks.py")
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks the script runs")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every harness run (and the bare model)")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE_SIZES.items():
            setattr(args, key, value)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("bench_gpu.py: no CUDA device here; --smoke checks the script itself on the CPU")
    facts = machine(device)
    print(
        f"device: {facts['device']}; torch {facts['torch']} (CUDA {facts['cuda']}), DeepSpeed {facts['deepspeed']}, "
        f"transformers {facts['transformers']}; T {args.seq_len}, micro-batch {args.micro_batch}, "
        f"{args.steps} steps ({args.warmup} warm-up){' [smoke]' if args.smoke else ''}",
        flush=True,
    )
    results, batches = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            results.append(measure(name, args, Path(scratch), device, batches))
    table = markdown_table(results)
    peaks = sorted({f"{r['peak_flops'] / 1e12:,.3g} TFLOP/s ({r['peak_source']})" for r in results})
    print(f"\nMFU against {'; '.join(peaks)}\n\n{table}")
    report = {"machine": facts, "settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

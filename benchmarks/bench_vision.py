"""CRATE vision against HF ViT at equal width, depth, heads and patches, side by side in one run.

    python benchmarks/bench_vision.py                        # both parts, CPU
    python benchmarks/bench_vision.py --skip-accuracy --rounds 5
    python benchmarks/bench_vision.py --steps 1200            # a longer accuracy budget

1. Training images/s: forward, backward and AdamW on a fixed batch, CRATE (``CrateForImageClassification``) and the
   ViT baseline (``ViTForImageClassification``, MLP 4x, SDPA attention) built by ``launcher.models.build`` from the same
   size knobs. Rounds alternate (CRATE, ViT, CRATE, ...); each side keeps its median step time over its best round.
   Shapes: the Fashion-MNIST config (28x28x1, patch 7: 17 tokens, d 96, 4 layers), the same at patch 4 (50 tokens),
   and a wider one (32x32x3, patch 4: 65 tokens, d 192, 6 layers, 3 heads: ViT-T's width).
2. Accuracy after the same budget: ``crate pretrain configs/vision/crate-fmnist.yaml``, ``vit-fmnist.yaml`` and
   ``tost-fmnist.yaml`` (ToST vision, the official skeleton; same data, steps, batch, recipe), then top-1 on the whole
   Fashion-MNIST test split (10,000 images), per seed, with each model's per-seed gap to CRATE and a paired t-test.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "fmnist (28x28x1, p7, d96, L4, K4)": dict(
        image_size=28, channels=1, patch_size=7, hidden_size=96, num_hidden_layers=4, num_attention_heads=4
    ),
    "fmnist-p4 (28x28x1, p4, d96, L4, K4)": dict(
        image_size=28, channels=1, patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=4
    ),
    "tiny-rgb (32x32x3, p4, d192, L6, K3)": dict(
        image_size=32, channels=3, patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3
    ),
}


def build(arch: str, shape: dict, classes: int = 10):
    from launcher.config.run import ModelSection
    from launcher.models.build import build_model, build_vision_config

    knobs = {k: shape[k] for k in ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
    config = build_vision_config(
        ModelSection(arch=arch, **knobs), shape["image_size"], shape["channels"], [f"c{i}" for i in range(classes)]
    )
    torch.manual_seed(0)
    return build_model(config).train()


def step_times(model, pixels: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def throughput(rounds: int, steps: int, batch: int) -> list[tuple[str, float, float, int, int]]:
    results = []
    for name, shape in SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(batch, shape["channels"], shape["image_size"], shape["image_size"], generator=generator)
        labels = torch.randint(0, 10, (batch,), generator=generator)
        models = {arch: build(arch, shape) for arch in ("crate", "vit")}
        best = {arch: float("inf") for arch in models}
        for _ in range(rounds):
            for arch, model in models.items():
                best[arch] = min(best[arch], statistics.median(step_times(model, pixels, labels, steps)))
        params = {arch: sum(p.numel() for p in model.parameters()) for arch, model in models.items()}
        results.append((name, batch / best["crate"], batch / best["vit"], params["crate"], params["vit"]))
    return results


def pretrain(config: str, output_dir: Path, steps: int, seed: int) -> tuple[float, int]:
    from launcher.metrics.logger import read_metrics

    overrides = [
        f"output_dir={output_dir}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        "train.eval_batches=157",
        "train.whitebox_every=0",
        f"train.save_every={steps}",
        "train.export_at_end=false",
    ]
    command = [sys.executable, "-m", "launcher.cli", "pretrain", config, *overrides]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"crate pretrain failed:\n{result.stderr[-3000:]}")
    evals = read_metrics(output_dir, kind="eval")
    print(f"  {config}: {time.time() - started:.0f} s, final eval {evals[-1]}")
    return evals[-1]["accuracy"], evals[-1]["images"]


def paired_t_test(gaps: list[float]) -> tuple[float, float]:
    """The paired t statistic of per-seed gaps and its two-sided p-value (Student's t with n - 1 degrees of freedom,
    its density integrated numerically: no SciPy needed)."""
    n = len(gaps)
    mean, sd = statistics.mean(gaps), statistics.stdev(gaps)
    t = mean / (sd / math.sqrt(n)) if sd > 0 else math.copysign(math.inf, mean)
    if math.isinf(t):
        return t, 0.0
    df = n - 1
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    steps, bound = 20000, abs(t)
    width = bound / steps
    inner = sum(
        (1 if i in (0, steps) else 4 if i % 2 else 2) * (1 + (i * width) ** 2 / df) ** (-(df + 1) / 2)
        for i in range(steps + 1)
    )
    return t, max(0.0, 1 - 2 * norm * inner * width / 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each accuracy run")
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=1, help="accuracy runs per model (init and data order seeds)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--models", default="crate,vit,tost", help="accuracy runs: configs/vision/<model>-fmnist.yaml")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )

    if not args.skip_throughput:
        print_throughput(args)
    if not args.skip_accuracy:
        print_accuracy(args)


def print_throughput(args: argparse.Namespace) -> None:
    print(
        f"\n1. training images/s (batch {args.batch}, fp32, forward + backward + AdamW; best of {args.rounds} "
        f"interleaved rounds)"
    )
    print(f"{'shape':40s} {'CRATE img/s':>12s} {'ViT img/s':>10s} {'CRATE/ViT':>10s} {'params C/V':>16s}")
    for name, crate, vit, crate_params, vit_params in throughput(args.rounds, args.timing_steps, args.batch):
        print(
            f"{name:40s} {crate:12.1f} {vit:10.1f} {crate / vit:9.2f}x {crate_params / 1e6:7.3f}M/"
            f"{vit_params / 1e6:.3f}M"
        )


def print_accuracy(args: argparse.Namespace) -> None:
    print(f"\n2. Fashion-MNIST top-1 after the same budget ({args.steps} steps of 64 images, one process)")
    accuracies: dict[str, list[float]] = {model: [] for model in args.models.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for arch in accuracies:
                accuracy, images = pretrain(
                    f"configs/vision/{arch}-fmnist.yaml", Path(tmp) / f"{arch}-{seed}", args.steps, seed
                )
                accuracies[arch].append(accuracy)
    for arch, values in accuracies.items():
        spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
        print(
            f"{arch:6s} {100 * statistics.mean(values):.2f}%{spread}  (seeds: "
            f"{', '.join(f'{100 * v:.2f}' for v in values)}) on {images} test images"
        )
    for arch in accuracies:
        if arch == "crate" or "crate" not in accuracies or len(accuracies[arch]) < 2:
            continue
        gaps = [other - crate for other, crate in zip(accuracies[arch], accuracies["crate"])]
        t, p = paired_t_test(gaps)
        print(
            f"{arch} - CRATE: {100 * statistics.mean(gaps):+.2f} points (per seed: "
            f"{', '.join(f'{100 * g:+.2f}' for g in gaps)}); paired t = {t:.2f}, p = {p:.3f}"
            f"{'' if p < 0.05 else ' (not significant at 0.05)'}"
        )


if __name__ == "__main__":
    main()

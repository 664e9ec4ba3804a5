"""What resuming on another world size costs: a ZeRO checkpoint written by 2 ranks, resumed for one step on 2 ranks
(DeepSpeed's own load) and on 1 rank (converted to DeepSpeed's universal checkpoint first, then loaded), side by
side, each the real ``crate pretrain`` in a subprocess; plus the conversion alone on a copy, and a fresh 1-rank
start for scale. Run from the repository root:

    .venv/bin/python benchmarks/bench_elastic.py [--hidden 512 --layers 8 --stage 2]

Prints the wall time of each run, the conversion's time and throughput, and the ratio elastic / same-size resume.
Results and the machine: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_runs import REPO, pretrain  # noqa: E402

CONFIG = str(REPO / "configs" / "lm" / "crate-tiny.yaml")


def cut_back(source: Path, target: Path, step: int) -> None:
    sys.path.insert(0, str(REPO / "tests" / "launcher" / "train"))
    from several_runs_rank import cut_back as cut

    cut(source, target, step)


def timed(config: str, output_dir: Path, overrides: list[str], nproc: int) -> float:
    started = time.perf_counter()
    pretrain(config, output_dir, overrides, nproc=nproc)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    args = parser.parse_args()
    from launcher.train.elastic import convert_to_universal

    knobs = [
        "model.preset=null",
        f"model.hidden_size={args.hidden}",
        f"model.num_hidden_layers={args.layers}",
        "model.num_attention_heads=8",
        "model.max_position_embeddings=128",
        "data.seq_len=128",
        "data.num_streams=2",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.log_every=1",
        "train.eval_every=0",
        "train.whitebox_every=0",
        "train.export_at_end=false",
        f"zero.stage={args.stage}",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        written = root / "written"
        timed(CONFIG, written, [*knobs, "train.max_steps=2", "train.save_every=2"], nproc=2)
        checkpoint = written / "checkpoints" / "global_step2"
        size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        walls = {}
        for name, nproc in (("same world size (2 -> 2)", 2), ("another world size (2 -> 1)", 1)):
            run = root / name.split()[0]
            cut_back(written, run, 2)
            walls[name] = timed(CONFIG, run, [*knobs, "train.max_steps=3", "train.save_every=0"], nproc=nproc)
        walls["fresh start, 1 rank, 1 step"] = timed(
            CONFIG, root / "fresh", [*knobs, "train.max_steps=1", "train.save_every=0"], nproc=1
        )
        copy = root / "copy"
        shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("universal"))
        started = time.perf_counter()
        convert_to_universal(copy, root / "converted")
        conversion = time.perf_counter() - started
    print(f"ZeRO-{args.stage}, CRATE d {args.hidden} x {args.layers} layers; checkpoint {size / 2**20:.1f} MiB")
    for name, wall in walls.items():
        print(f"  {name:32s} {wall:6.1f} s wall (the whole crate pretrain)")
    print(f"  conversion alone (ds_to_universal) {conversion:6.2f} s ({size / 2**20 / conversion:.0f} MiB/s)")
    same, other = walls["same world size (2 -> 2)"], walls["another world size (2 -> 1)"]
    print(f"  elastic / same-size resume: {other / same:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

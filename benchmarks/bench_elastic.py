"""What resuming on another world size costs: the same run resumed for one step on 1 rank from a ZeRO checkpoint
written by 1 rank (DeepSpeed's own load) and from one written by 2 ranks (converted to DeepSpeed's universal
checkpoint first, then loaded), side by side, each the real ``crate pretrain`` in a subprocess; plus the conversion
alone on a copy. Run from the repository root:

    .venv/bin/python benchmarks/bench_elastic.py [--hidden 512 --layers 8 --stage 2]

Prints the median wall time of each kind of resume (``--repeats``, alternating), the conversion's time and throughput,
and the ratio elastic / same-size resume.
Results and the machine: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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
    parser.add_argument("--repeats", type=int, default=3)
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
        walls: dict[int, list[float]] = {1: [], 2: []}
        for written_by in (1, 2):
            written = root / f"written-by-{written_by}"
            timed(CONFIG, written, [*knobs, "train.max_steps=2", "train.save_every=2"], nproc=written_by)
        for repeat in range(args.repeats):  # alternating, so that drift in the machine hits both alike
            for written_by in (1, 2):
                run = root / f"resumed-from-{written_by}-{repeat}"
                cut_back(root / f"written-by-{written_by}", run, 2)
                overrides = [*knobs, "train.max_steps=3", "train.save_every=0"]
                walls[written_by].append(timed(CONFIG, run, overrides, nproc=1))
        checkpoint = root / "written-by-2" / "checkpoints" / "global_step2"
        size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        copy = root / "copy"
        shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("universal"))
        started = time.perf_counter()
        convert_to_universal(copy, root / "converted")
        conversion = time.perf_counter() - started
    same, elastic = statistics.median(walls[1]), statistics.median(walls[2])
    print(f"ZeRO-{args.stage}, CRATE d {args.hidden} x {args.layers} layers; checkpoint {size / 2**20:.1f} MiB")
    print(f"median of {args.repeats} whole `crate pretrain` runs of 1 step on 1 rank, resumed from a checkpoint of:")
    print(f"  1 rank (DeepSpeed's own load)          {same:6.1f} s  {[round(w, 1) for w in walls[1]]}")
    print(f"  2 ranks (converted, universal load)    {elastic:6.1f} s  {[round(w, 1) for w in walls[2]]}")
    print(f"  conversion alone (in this process)     {conversion:6.2f} s  ({size / 2**20 / conversion:.0f} MiB/s)")
    print(f"elastic / same-size resume: {elastic / same:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

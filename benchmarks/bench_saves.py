"""ZeRO-3 saves at 2 ranks: a checkpoint's save time and an HF export's, the export gathered all at once (as before
issue 19) against at most a module's bytes at a time (``export_hf`` now: groups of modules no larger than the
largest), with the parameter bytes each rank held gathered at the export's peak. Rounds alternate (checkpoint,
all at once, a module at a time, ...); medians over the rounds.

    python benchmarks/bench_saves.py                        # CRATE d 384, 8 layers, vocab 8192: 6.73M parameters
    python benchmarks/bench_saves.py --rounds 5 --hidden 512

It starts itself on 2 ranks (torchrun, gloo on the CPU). The held bytes are read right after every ZeRO-3 gather
(``deepspeed.zero.GatheredParameters``): the bytes of the ``data`` of all the model's parameters, which for a
partitioned parameter is empty except while it is gathered. DeepSpeed's defaults apply, so parameters of up to 1e5
elements (norms, biases) stay whole on every rank throughout; ``before`` is what was held when the export started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def export_all_at_once(model, out: Path, is_main: bool) -> None:
    """The ZeRO-3 export before issue 19, kept here only to measure against: every parameter gathered on every rank
    at once, rank 0 saving the gathered model itself."""
    import deepspeed

    from data_pipeline.files import write_directory

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if is_main:
            write_directory(out, lambda staging: model.save_pretrained(staging, safe_serialization=True))


class PeakHeld:
    """While active, the most parameter bytes ``model`` held whole right after any ZeRO-3 gather on this rank."""

    def __init__(self, model):
        import deepspeed

        self.model, self.cls, self.peak, self.before, self.gathers = model, deepspeed.zero.GatheredParameters, 0, 0, 0
        self.enter = self.cls.__enter__

    def held(self) -> int:
        return sum(p.data.numel() * p.data.element_size() for p in self.model.parameters())

    def __enter__(self):
        outer = self

        def measured(gather):
            result = outer.enter(gather)
            outer.peak, outer.gathers = max(outer.peak, outer.held()), outer.gathers + 1
            return result

        self.before = self.peak = self.held()
        self.cls.__enter__ = measured
        return self

    def __exit__(self, *exc):
        self.cls.__enter__ = self.enter


class _NoProcessor:
    """The export's preprocessor, left out: only the model's save is measured."""

    def save_pretrained(self, directory) -> None:
        pass


def rank_main(args) -> None:
    """One rank: the engine (ZeRO-3, the run config's DeepSpeed JSON), one optimizer step, then the timed rounds."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from launcher.config.run import load_run_config
    from launcher.models.build import build_model, build_model_config
    from launcher.train.checkpoint import CheckpointManager
    from launcher.train.engine import initialize_engine
    from launcher.train.export import export_hf
    from launcher.train.loop import all_ranks

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    scratch = Path(args.scratch)
    config = load_run_config(
        REPO / "configs" / "lm" / "crate-tiny.yaml",
        [
            f"output_dir={scratch}",
            "model.preset=null",
            f"model.hidden_size={args.hidden}",
            f"model.num_hidden_layers={args.layers}",
            "model.num_attention_heads=8",
            "model.max_position_embeddings=64",
            "data.seq_len=64",
            "train.micro_batch_size=2",
            "zero.stage=3",
        ],
    )
    torch.manual_seed(0)
    model = build_model(build_model_config(config.model, args.vocab, 0, 64), "causal-lm")
    engine, _ = initialize_engine(model, config, world, "cpu")
    ids = torch.randint(0, args.vocab, (2, 64))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    checkpoints = CheckpointManager(scratch, 1, rank, barrier=dist.barrier, world_size=world, gather=all_ranks)

    def timed(work, *args) -> float:
        dist.barrier()
        start = time.perf_counter()
        work(*args)
        dist.barrier()
        return time.perf_counter() - start

    def save(step: int) -> None:
        checkpoints.save(step, lambda root, tag: engine.save_checkpoint(str(root), tag=tag, save_latest=False))

    exports = {
        "all_at_once": lambda out: export_all_at_once(engine.module, out, rank == 0),
        "per_module": lambda out: export_hf(engine.module, _NoProcessor(), out, rank == 0, zero_stage=3),
    }
    times: dict[str, list[float]] = {"checkpoint_save": [], **{name: [] for name in exports}}
    held: dict[str, dict] = {}
    for round_ in range(args.rounds):
        times["checkpoint_save"].append(timed(save, round_ + 1))
        for name, export in exports.items():
            with PeakHeld(engine.module) as peak:
                times[name].append(timed(export, scratch / name))
            held[name] = {"before": peak.before, "peak": peak.peak, "gathers": peak.gathers}
    parameters = {id(p): p for p in engine.module.parameters()}.values()
    module_bytes = [
        sum(p.ds_numel * p.element_size() for p in module.parameters(recurse=False))
        for module in engine.module.modules()
    ]
    result = {
        "rank": rank,
        "parameters": sum(p.ds_numel for p in parameters),
        "model_bytes": sum(p.ds_numel * p.element_size() for p in parameters),
        "largest_module_bytes": max(module_bytes),
        "checkpoint_bytes": sum(f.stat().st_size for f in (scratch / "checkpoints").rglob("*") if f.is_file()),
        "seconds": {name: statistics.median(values) for name, values in times.items()},
        "held": held,
    }
    every_rank = all_ranks(result)  # collective: every rank takes part, rank 0 prints
    for line in every_rank if rank == 0 else []:
        print(json.dumps(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)  # set on the ranks
    args = parser.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
        command += [*sys.argv[1:], f"--scratch={scratch}"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"the ranks failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')]
    first = ranks[0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; 2 ranks, ZeRO-3, fp32; "
        f"CRATE d {args.hidden}, {args.layers} layers, vocab {args.vocab}: {first['parameters'] / 1e6:.2f}M "
        f"parameters, {first['model_bytes'] / 2**20:.2f} MiB, largest module "
        f"{first['largest_module_bytes'] / 2**20:.2f} MiB; checkpoint {first['checkpoint_bytes'] / 2**20:.1f} MiB"
    )
    for line in ranks:
        seconds, held = line["seconds"], line["held"]
        print(
            f"rank {line['rank']}: checkpoint save {seconds['checkpoint_save']:.3f} s; export all at once "
            f"{seconds['all_at_once']:.3f} s, a module at most {seconds['per_module']:.3f} s; held gathered at "
            f"the export's peak: all at once {held['all_at_once']['peak'] / 2**20:.2f} MiB, a module at most "
            f"{held['per_module']['peak'] / 2**20:.2f} MiB in {held['per_module']['gathers']} gathers (before "
            f"either: {held['per_module']['before'] / 2**20:.2f} MiB)"
        )
    print(json.dumps(ranks))


if __name__ == "__main__":
    main()

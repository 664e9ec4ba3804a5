"""Resuming a run on another number of ranks (elastic resume): what may change, what may not, and how each part of
the state follows. A checkpoint's manifest records the facts this needs ([`checkpoint_facts`]): its world size, ZeRO
stage, micro and global batch, the samples consumed and the data's logical streams.

On resume at world size ``W'`` (docs/training.md, "Resuming on another world size"):

* **Batch.** The global batch stays the checkpoint's unless ``train.global_batch_size`` says otherwise, and the
  gradient accumulation is recomputed for ``W'``; a global batch that ``micro_batch_size x W'`` does not divide is a
  one-line error. A changed global batch is allowed: the run continues from the samples consumed (the data cursor
  counts micro-batches, not steps) with a ``global_batch_changed`` row; the step count and the learning-rate
  schedule (a function of the step) go on as they were. The micro-batch size may not change (the data order is
  counted in micro-batches).
* **Data.** Every rank's cursor is read and merged (``data_pipeline.stream.merge_cursors``); each rank takes the
  logical streams it serves now, so the global batches go on exactly as at the old world size (docs/data.md).
* **Model and optimizer.** Without ZeRO every rank saved the whole state, and DeepSpeed loads it at any world size.
  ZeRO 1-3 partition the optimizer state (and ZeRO-3 the weights) over the ranks that saved it: the checkpoint is
  converted once, by rank 0, into DeepSpeed's universal format (``ds_to_universal``) in ``global_stepN/universal``
  — written under a temporary name and renamed when complete, so a crash leaves nothing half-made — and loaded with
  DeepSpeed's ``load_universal``. The conversion stays beside the checkpoint (pruned with it) for the next resume.
* **RNG.** A world-size change re-seeds every rank from ``(train.seed, step, rank)``: the data, weights and
  optimizer continue exactly, dropout masks do not (an uninterrupted run at another world size would not have
  drawn the same ones either).

Checkpoints written before these facts were recorded resume only on their own world size (one-line error naming
the ways on).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.stream import merge_cursors
from launcher.config.run import RunConfig
from launcher.errors import CheckpointError, ConfigError
from launcher.train.rank_state import load_rank_state

UNIVERSAL = "universal"  # the universal conversion's directory inside a checkpoint's


def _ranks(count: int) -> str:
    return f"{count} rank{'s' if count != 1 else ''}"


def checkpoint_facts(config: RunConfig, world: int, accumulation: int, samples_seen: int, loader) -> dict:
    """What a checkpoint's manifest records for resuming it elsewhere (``loader``: the run's data loader)."""
    micro = config.train.micro_batch_size
    plan = getattr(loader, "plan", None)
    return {
        "world_size": world,
        "zero_stage": config.zero.stage,
        "micro_batch_size": micro,
        "global_batch_size": micro * accumulation * world,
        "samples_seen": samples_seen,
        "data_streams": plan.num_streams if plan is not None else None,
    }


@dataclass(frozen=True)
class Resume:
    """How a run resumes from the checkpoint of ``step`` in ``directory`` (see the module doc)."""

    step: int
    directory: Path
    saved_world: int
    world: int
    zero_stage: int
    saved_global_batch: int
    global_batch: int
    samples_seen: int

    @property
    def elsewhere(self) -> bool:
        return self.saved_world != self.world

    @property
    def universal(self) -> bool:
        """Whether DeepSpeed loads the universal conversion (ZeRO partitions that the world change invalidates)."""
        return self.elsewhere and self.zero_stage > 0


def _old_checkpoint_error(directory: Path, saved: int, world: int) -> CheckpointError:
    run_dir = directory.parent.parent
    return CheckpointError(
        f"{directory}: written by {_ranks(saved)} before crate recorded what resuming on another world size needs, "
        f"and this run has {world}: resume on {_ranks(saved)} (--nproc-per-node {saved}, or a job of "
        f"{_ranks(saved)} in all), or run `crate export {run_dir}` and start a new run in another output_dir with "
        f"model.init_from={run_dir / 'hf'}"
    )


def plan_resume(directory: Path, manifest: dict, config: RunConfig, world: int) -> tuple[RunConfig, Resume]:
    """The resume from the checkpoint in ``directory`` (its ``manifest``) on ``world`` ranks, and the run config
    with the global batch it trains at; one-line errors for what cannot be honoured."""
    step, saved_world = int(manifest["step"]), manifest.get("world_size") or world
    micro = config.train.micro_batch_size
    saved_batch = manifest.get("global_batch_size")
    if saved_batch is None:  # written before elastic resume
        if saved_world != world:
            raise _old_checkpoint_error(directory, saved_world, world)
        accumulation = config.check_world(world)
        saved_batch = micro * accumulation * world
        facts = {"micro_batch_size": micro, "samples_seen": step * saved_batch}
    else:
        facts = manifest
    if facts["micro_batch_size"] != micro:
        raise ConfigError(
            f"train.micro_batch_size: {micro}, and the checkpoint {directory} was trained at "
            f"{facts['micro_batch_size']}; the data order is counted in micro-batches: resume with "
            f"train.micro_batch_size={facts['micro_batch_size']} (train.global_batch_size sets the batch)"
        )
    streams = manifest.get("data_streams")
    if streams and streams % world:
        raise ConfigError(
            f"world size {world}: the run's data has {streams} logical streams (fixed at its first start), which "
            f"do not divide among {_ranks(world)}; resume on a world size that divides {streams}"
        )
    global_batch = config.train.global_batch_size or saved_batch
    if global_batch % (micro * world):
        raise ConfigError(
            f"train.global_batch_size: the run's global batch {global_batch}"
            f"{' (from the checkpoint)' if not config.train.global_batch_size else ''} is not a multiple of "
            f"train.micro_batch_size ({micro}) x world size ({world}); resume on a world size that divides "
            f"{global_batch // micro}, or set train.global_batch_size"
        )
    resumed = config.model_copy(update={"train": config.train.model_copy(update={"global_batch_size": global_batch})})
    resume = Resume(
        step=step,
        directory=directory,
        saved_world=saved_world,
        world=world,
        zero_stage=int(manifest.get("zero_stage") or 0),
        saved_global_batch=saved_batch,
        global_batch=global_batch,
        samples_seen=int(facts["samples_seen"]),
    )
    return resumed, resume


def check_resume(config: RunConfig, world: int) -> None:
    """Before any process starts: the checkpoint a run in ``config.output_dir`` would resume from — the newest that
    passes the cheap check (its manifest and file sizes; the ranks verify checksums when they load it) — can be
    resumed on ``world`` ranks with this config ([`plan_resume`]'s one-line errors). Nothing to check in a new run."""
    from launcher.train.checkpoint import CheckpointManager, tag_for

    checkpoints = CheckpointManager(config.output_dir, keep_last=1)
    for step in reversed(checkpoints.complete_steps()):
        if checkpoints.verify_cheaply(step) is None:
            plan_resume(checkpoints.root / tag_for(step), checkpoints.manifest(step), config, world)
            return


# ------------------------------------------------------------------------------------------------ the state


def data_cursor(resume: Resume, rank: int, trusted: bool) -> dict:
    """This rank's data cursor: its own at the same world size, else every saved rank's merged."""
    if not resume.elsewhere:
        return load_rank_state(resume.directory, rank, trusted)["data"]
    return merge_cursors([load_rank_state(resume.directory, r, trusted)["data"] for r in range(resume.saved_world)])


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh RNG states for a rank after a world-size change (the module doc)."""
    generator = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    random.seed(int(generator[0]))
    np.random.seed(int(generator[0]))
    torch.manual_seed(int(generator[1]))


def universal_checkpoint(resume: Resume, rank: int, barrier) -> tuple[str, str]:
    """The universal conversion of the checkpoint (made once, by rank 0, while the others wait) as DeepSpeed's
    ``load_checkpoint`` arguments ``(load_dir, tag)``."""
    target = resume.directory / UNIVERSAL
    if rank == 0 and not target.is_dir():
        staging = resume.directory / f".tmp-{UNIVERSAL}"
        shutil.rmtree(staging, ignore_errors=True)
        convert_to_universal(resume.directory, staging)
        os.replace(staging, target)
        (resume.directory / "latest_universal").unlink(missing_ok=True)  # the converter's pointer, to the staging name
    barrier()
    if not target.is_dir():
        raise CheckpointError(f"{target}: the universal conversion is missing on this rank (not a shared filesystem?)")
    return str(resume.directory), UNIVERSAL


@contextlib.contextmanager
def universal_load_repaired(optimizer, universal: bool):
    """Around ``engine.load_checkpoint``: after a universal load (``universal``), undo what DeepSpeed 0.19.8's ZeRO-3
    universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) gets wrong, found by
    tests/launcher/train/test_elastic.py:

    * it copies the first parameter group's hyperparameters onto every group, so the no-decay group (biases, norms)
      would be decayed: the run's own weight decay is put back (the learning rate is set before every update anyway,
      and other group entries, such as a fused Adam's step count, must come from the checkpoint);
    * it gives every parameter's state the *same* ``step`` tensor, which the optimizer then advances once per
      sub-group and step, so the bias correction of all but the first sub-group runs ahead: each state gets its own.
    """
    saved = [group.get("weight_decay") for group in optimizer.param_groups]
    yield
    if not universal:
        return
    for group, decay in zip(optimizer.param_groups, saved):
        group["weight_decay"] = decay
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO's wrapper holds the torch optimizer
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def convert_to_universal(checkpoint: Path, output: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of one checkpoint directory (a tag's: ``global_stepN``) into ``output``, with
    worker processes on half the node's cores (the other ranks wait meanwhile; one core: in this process)."""
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    ds_to_universal(
        SimpleNamespace(
            input_folder=str(checkpoint),
            output_folder=str(output),
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
    )

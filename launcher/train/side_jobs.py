"""The training loop's side jobs, each a small component with one interface: ``maybe_run(step, outcome)`` after
every optimizer step, which does the job when it is due (OLMo-core's callbacks, torchtitan's components).

The loop runs them in a fixed order on every rank, so the collectives inside them (an all-reduce of the loss,
ZeRO-3's gathers in an evaluation) line up, and keeps their time out of the throughput (``ThroughputMeter.paused``).
Jobs that every rank must run (evaluation under ZeRO-3, checkpoints) do their own rank-0-only writing.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from data_pipeline.stream import bad_record_summary, merge_stats
from launcher.errors import NonFiniteError
from launcher.metrics.figures import save_attention_figure
from launcher.metrics.logger import MetricsLogger
from launcher.metrics.memory import memory_stats, model_state_bytes
from launcher.metrics.throughput import ThroughputMeter
from launcher.models.build import unwrap_peft
from launcher.train.step import StepOutcome, any_rank, sum_across_ranks

STOP_FILE = "STOP"  # <output_dir>/STOP asks a run to save and stop, like SIGUSR1 (works through any launcher)


def max_across_ranks(value: float, device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def every(period: int, step: int, last_step: int) -> bool:
    """Due every ``period`` steps (0: never) and at the last step."""
    return bool(period) and (step % period == 0 or step == last_step)


class SideJob:
    """A side job of the loop. ``maybe_run`` is called after every optimizer step, on every rank, in a fixed
    order. ``phase`` names it in the watchdog's line (``launcher.train.watchdog``)."""

    phase: ClassVar[str] = "a side job"

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        raise NotImplementedError


@dataclass
class NonFiniteGuard(SideJob):
    """Counts the steps skipped for a non-finite loss or gradient, logs each, and stops the run (an error) after
    ``max_in_a_row`` in a row; the last checkpoint stays intact."""

    phase: ClassVar[str] = "the non-finite guard"

    logger: MetricsLogger
    max_in_a_row: int
    in_a_row: int = 0
    total: int = 0

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        if outcome.applied:
            self.in_a_row = 0
            return
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        self.logger.log(
            step,
            event="nonfinite_step_skipped",
            reason=outcome.nonfinite,
            in_a_row=self.in_a_row,
            skipped_total=self.total,
        )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} steps in a row skipped for a non-finite "
                f"{outcome.nonfinite} (train.max_nonfinite_in_a_row); the last checkpoint is intact"
            )


def bad_records_of_all_ranks(stats: dict) -> dict | None:
    """[`bad_record_summary`] of every rank's ``stats`` summed (each rank reads other shards): one gather."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"bad": stats["bad"], "bad_files": stats["bad_files"]})
    return bad_record_summary(merge_stats(gathered))


def describe_bad_records(summary: dict, since: int) -> str:
    """The warning of a run whose data skipped bad records: the count, the files and the first locations."""
    sources = ", ".join(f"{where} ({count})" for where, count in summary["by_source"].items())
    grown = f", {summary['total'] - since} since the last report" if since else ""
    return (
        f"{summary['total']} bad records skipped so far{grown} (within data.max_bad_fraction): {sources}; "
        f"first: {'; '.join(summary['first'])}"
    )


@dataclass
class TrainMetrics(SideJob):
    """The training row every ``log_every`` steps (and at the last): the step's loss averaged over ranks (read from
    the device here, the only place the hot path's losses are read), learning rate,
    gradient norm, skipped steps, throughput and MFU, memory, and the bad records the data skipped (summed over
    ranks; ``data_stats``: this rank's data statistics, ``loader.stats()``) with a warning each time they grow."""

    phase: ClassVar[str] = "the training metrics"

    logger: MetricsLogger
    meter: ThroughputMeter
    guard: NonFiniteGuard
    learning_rate: Callable[[int], float]
    log_every: int
    last_step: int
    device: torch.device
    data_stats: Callable[[], dict]
    bad_records: dict | None = None  # the summary last reported

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        if not outcome.applied or not every(self.log_every, step, self.last_step):
            return
        stats = self.data_stats()
        # One all-reduce for the loss and the bad-record count; the records themselves are gathered only when the
        # count grew (every rank's counts only grow, so an unchanged sum is an unchanged summary).
        loss_sum, bad_total = sum_across_ranks([outcome.loss, sum(stats["bad"].values())], self.device)
        reported = self.bad_records["total"] if self.bad_records else 0
        if bad_total != reported:
            self.bad_records = bad_records_of_all_ranks(stats)
        self.logger.log(
            step,
            loss=loss_sum / dist.get_world_size(),
            lr=self.learning_rate(step - 1),
            grad_norm=outcome.grad_norm,
            skipped_steps=self.guard.total,
            **self.meter.stats(step),
            **memory_stats(self.device),
            **({"bad_records": self.bad_records} if self.bad_records else {}),
        )
        if bad_total != reported:
            self.logger.warn(step, describe_bad_records(self.bad_records, since=reported))


@dataclass
class ModelStateProbe(SideJob):
    """The model-state memory (weights, gradients, optimizer states) at its peak — the second step's gradients
    reduced, the first step's optimizer states there — measured just before that step's update
    ([`before_update`]) and logged after it, with the maximum over ranks."""

    phase: ClassVar[str] = "the model-state probe"

    logger: MetricsLogger
    engine: object
    probe_step: int  # the second step after the start (or the resume)
    device: torch.device
    measured: int | None = None

    def before_update(self, step: int) -> Callable[[], None] | None:
        """The hook for ``train_step`` of optimizer step ``step`` (1-based), or None when not due."""
        if step != self.probe_step:
            return None
        return lambda: setattr(self, "measured", model_state_bytes(self.engine))

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        if self.measured is None:
            return
        self.logger.log(
            step,
            event="model_state",
            model_state_gib=self.measured / 2**30,
            max_model_state_gib=max_across_ranks(self.measured, self.device) / 2**30,
        )
        self.measured = None


@dataclass
class Evaluation(SideJob):
    """The task's held-out evaluation every ``eval_every`` steps and at the last (every rank: ZeRO-3 gathers)."""

    phase: ClassVar[str] = "the evaluation"

    logger: MetricsLogger
    engine: object
    task: object
    eval_every: int
    last_step: int
    device: torch.device

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        if self.task.validation is None or not every(self.eval_every, step, self.last_step):
            return
        self.engine.eval()
        try:
            result = self.task.evaluate(self.engine, self.device)
        finally:
            self.engine.train()
        self.logger.log_eval(step, **result)


@dataclass
class WhiteboxProbe(SideJob):
    """The architecture's white-box measures on fixed held-out samples every ``whitebox_every`` steps, and for image
    runs the CLS attention maps as a figure (every rank runs the forward pass, ZeRO-3 gathers; rank 0 draws)."""

    phase: ClassVar[str] = "the white-box probe"

    logger: MetricsLogger
    engine: object
    task: object
    measure: Callable
    whitebox_every: int
    output_dir: str
    is_main: bool

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        if self.task.probe is None or self.measure is None or not self.whitebox_every or step % self.whitebox_every:
            return
        model = unwrap_peft(self.engine.module)
        self.logger.log_whitebox(step, self.measure(model, self.task.probe))
        if self.task.unit == "images":
            data = self.task.config.data
            save_attention_figure(
                model,
                self.task.probe[:8],
                os.path.join(self.output_dir, "whitebox", f"attention-step{step:06d}.png"),
                is_main=self.is_main,
                mean=data.mean,
                std=data.std,
            )


class StopSignal:
    """SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) set a flag; the loop stops at a step all ranks agree on, saves and exits
    0 (the handler does nothing else). Ctrl-C reaches every process of the terminal's group, ranks and DataLoader
    workers (forked after this, so they inherit the handler) alike, so none of them dies of a KeyboardInterrupt."""

    def __init__(self):
        import signal

        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


@dataclass
class StopRequests(SideJob):
    """Whether the run stops early, agreed by all ranks every ``check_every`` steps (one all-reduce and one host
    read, so not on every step of a GPU's hot path): a signal, the ``wall_clock_minutes`` budget, or a ``STOP`` file
    in the output directory (shared filesystem: Slurm's batch script touches it). Sets ``stopping`` and ``reason``.
    A request waits at most ``check_every - 1`` steps."""

    phase: ClassVar[str] = "the stop check"

    signal: StopSignal
    output_dir: str
    wall_clock_minutes: float | None
    started: float
    rank: int
    device: torch.device
    check_every: int = 1
    stopping: bool = False
    reason: str | None = None

    @property
    def stop_file(self) -> str:
        return os.path.join(self.output_dir, STOP_FILE)

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        if step % self.check_every:
            return
        out_of_time = self.wall_clock_minutes is not None and time.time() - self.started > 60 * self.wall_clock_minutes
        asked = self.rank == 0 and os.path.exists(self.stop_file)
        self.stopping = any_rank(self.signal.raised or out_of_time or asked, self.device)
        if self.stopping:
            self.reason = "signal" if self.signal.raised else "wall_clock_minutes" if out_of_time else "stop_file"

    def consume(self) -> None:
        """The stop file has been obeyed: the next start trains on."""
        if self.rank == 0 and os.path.exists(self.stop_file):
            os.remove(self.stop_file)


@dataclass
class Checkpointing(SideJob):
    """A verified checkpoint every ``save_every`` steps, at the last step, and when the run stops early (after
    [`StopRequests`] in the job order); ``save(step)`` writes one on every rank."""

    phase: ClassVar[str] = "the checkpoint save"

    save: Callable[[int], None]
    save_every: int
    last_step: int
    stop: StopRequests

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        if self.stop.stopping or step == self.last_step or every(self.save_every, step, self.last_step):
            self.save(step)


FINGERPRINTED = ("input_ids", "pixel_values", "labels")  # what a batch's rows are made of (not where they came from)


def row_hashes(batch: dict) -> list[str]:
    """A hash of each row (sample) of a micro-batch: its token ids or pixels, and its labels."""
    keys = [key for key in FINGERPRINTED if key in batch]
    rows = len(batch[keys[0]])
    return [
        hashlib.blake2b(b"".join(batch[key][i].numpy().tobytes() for key in keys), digest_size=8).hexdigest()
        for i in range(rows)
    ]


@dataclass
class BatchFingerprints(SideJob):
    """With ``train.batch_fingerprints``: after every step a ``batch_fingerprint`` row — the SHA-256 of the sorted
    row hashes of the step's global batch, so independent of which rank or micro-batch took a row — to compare two
    runs step by step (one resumed on another world size against one that was not, say). ``watch(batches)`` passes
    the loader's batches through, hashing them on the host before they reach the device; the rows of all ranks are
    gathered once a step (``gather``: every rank's object)."""

    phase: ClassVar[str] = "the batch fingerprint"

    logger: MetricsLogger
    gather: Callable[[object], list]

    def __post_init__(self):
        self.rows: list[str] = []

    def watch(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self.rows += row_hashes(batch)
            yield batch

    def maybe_run(self, step: int, outcome: StepOutcome) -> None:
        rows = sorted(row for part in self.gather(self.rows) for row in part)
        self.rows = []
        digest = hashlib.sha256("".join(rows).encode()).hexdigest()[:32]
        self.logger.log(step, event="batch_fingerprint", batch_fingerprint=digest, rows=len(rows))

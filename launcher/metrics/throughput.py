"""Tokens/s, MFU and ETA of a run over a sliding window of step times; side jobs are kept out of it (``paused``)."""

from __future__ import annotations

import contextlib
import time
from collections import deque

# Steps a logged tokens/s or MFU averages over by default (the metrics rows report this window's mean).
WINDOW_STEPS = 20


class ThroughputMeter:
    """Tokens/s, MFU and ETA over a sliding window of recent step times.

    ``tokens_per_step``: tokens of one optimizer step over all ranks (global batch x sequence length).
    ``flops_per_token``: training FLOPs per token (the registry's formula,
    ``launcher.architectures.registry.training_flops_per_token``, or counted on the first step).
    ``peak_flops``: peak FLOP/s of one device (``device_peak_flops``); None leaves MFU out.
    ``world_size``: devices sharing the step. ``total_steps``: for the ETA. ``window``: steps averaged over.
    ``samples_per_step``: also report ``samples_per_s`` (images/s of an image run, whose tokens are patches).
    ``tokens_before``: what the ``tokens`` count adds to ``step x tokens_per_step`` (a run whose global batch changed
    on resume: the tokens it consumed at the old batch, less as many steps at the new one).

    Time a step with [`tick`] (after each step; the first tick after construction or [`restart`] only starts the
    clock, so the warm-up step is not counted) or feed durations with [`record`].
    """

    def __init__(
        self,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float | None = None,
        world_size: int = 1,
        total_steps: int | None = None,
        window: int = WINDOW_STEPS,
        samples_per_step: int | None = None,
        tokens_before: int = 0,
    ):
        if tokens_per_step <= 0 or world_size <= 0 or window <= 0:
            raise ValueError("tokens_per_step, world_size and window must be positive")
        self.tokens_per_step = tokens_per_step
        self.samples_per_step = samples_per_step
        self.tokens_before = tokens_before
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.total_steps = total_steps
        self._window: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, steps) per interval
        self._last: float | None = None

    def restart(self) -> None:
        """Forget the clock (not the window): the next tick only starts it again."""
        self._last = None

    @contextlib.contextmanager
    def paused(self):
        """Inside, the clock stands still: time spent on side jobs (evaluation, checkpoints) is no step's."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self._last is not None:
                self._last += time.perf_counter() - started

    def tick(self, steps: int = 1) -> float | None:
        """Mark the end of ``steps`` optimizer steps; returns the seconds since the previous tick (None when this tick
        only starts the clock)."""
        now = time.perf_counter()
        last, self._last = self._last, now
        if last is None:
            return None
        self.record(now - last, steps)
        return now - last

    def record(self, seconds: float, steps: int = 1) -> None:
        """Add an interval of ``seconds`` (wall time) covering ``steps`` optimizer steps."""
        if seconds <= 0 or steps <= 0:
            raise ValueError(f"need positive seconds and steps (got {seconds}, {steps})")
        self._window.append((float(seconds), int(steps)))

    @property
    def step_time(self) -> float | None:
        """Mean seconds per optimizer step over the window (None before the first interval)."""
        if not self._window:
            return None
        return sum(s for s, _ in self._window) / sum(n for _, n in self._window)

    def stats(self, step: int) -> dict[str, float]:
        """Scalars after optimizer step ``step``, ready for ``MetricsLogger.log``:

        ``tokens`` (tokens trained on so far, ``step x tokens_per_step`` plus ``tokens_before``), and once a step was
        timed ``step_time_s`` (s), ``tokens_per_s`` (all devices), ``tokens_per_s_per_device``, ``mfu`` (fraction 0..1:
        ``flops_per_token x tokens_per_s_per_device / peak_flops``; only with a peak) and ``eta_s`` (seconds for the
        remaining ``total_steps - step`` steps; only with ``total_steps``).
        """
        out: dict[str, float] = {"tokens": self.tokens_before + step * self.tokens_per_step}
        step_time = self.step_time
        if step_time is None:
            return out
        tokens_per_s = self.tokens_per_step / step_time
        per_device = tokens_per_s / self.world_size
        out.update(step_time_s=step_time, tokens_per_s=tokens_per_s, tokens_per_s_per_device=per_device)
        if self.samples_per_step:
            out["samples_per_s"] = self.samples_per_step / step_time
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * per_device / self.peak_flops
        if self.total_steps is not None:
            out["eta_s"] = max(self.total_steps - step, 0) * step_time
        return out

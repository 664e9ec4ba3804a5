"""The run's metrics log: ``metrics.jsonl``, TensorBoard event files and the progress line. Device peaks, throughput
/ MFU and memory are beside it (``launcher.metrics.peaks``, ``.throughput``, ``.memory``).

A component with a small interface (torchtitan / OLMo-core style). Nothing here is distributed: the trainer passes
``is_main`` (rank 0) and every logging method of a non-main logger is a no-op.

```python
peak, source = device_peak_flops(device, dtype)                  # FLOP/s of one device, and where it came from
meter = ThroughputMeter(tokens_per_step, training_flops_per_token(config, seq_len, micro * seq_len), peak,
                        world_size=world, total_steps=max_steps)
logger = MetricsLogger(output_dir, is_main=rank == 0, total_steps=max_steps)
logger.truncate_after(resumed_step)                              # only when resuming
for step in range(resumed_step + 1, max_steps + 1):
    ...                                                          # forward, backward, optimizer step
    meter.tick()
    if step % log_every == 0:
        logger.log(step, loss=loss, lr=lr, **meter.stats(step), **memory_stats(device))
    if step % eval_every == 0:
        with meter.paused():                                     # eval time is not training time
            logger.log_eval(step, loss=evaluate())
logger.close()
```

Row format of ``<output_dir>/metrics.jsonl`` (one JSON object per line, appended and flushed line by line)::

    {"kind": "train", "step": 10, "time": 1760000000.123, "loss": 3.21, "lr": 0.0006, "tokens_per_s": ..., ...}
    {"kind": "eval", "step": 100, "time": ..., "loss": 3.05, "perplexity": 21.1}
    {"kind": "whitebox", "step": 100, "time": ..., "layer": 0, "rc": ..., "rc_per_head": [...], ...}
    {"kind": "train", "step": 10, "time": ..., "event": "warning", "message": "3 bad records skipped so far: ..."}

``kind`` is always present, ``step`` is the optimizer step, ``time`` is Unix wall time in seconds. White-box
measures are written one row per layer (a flat table: filter on ``kind == "whitebox"`` and group by ``layer``).
Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so that every line is strict JSON;
[`read_metrics`] turns them back into floats.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from data_pipeline.files import atomic_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_RESERVED = ("kind", "step", "time")
_warned_no_tensorboard = False


def _json_value(value: Any) -> Any:
    """A JSON-safe copy: tensors / numpy scalars to Python numbers, non-finite floats to "nan" / "inf" / "-inf"."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and hasattr(value, "ndim")):
        return [_json_value(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    try:
        return _json_value(float(value))
    except (TypeError, ValueError):
        return str(value)


def _scalar(value: Any) -> float | None:
    """The number TensorBoard gets for a JSON-safe value (None: not a scalar, skipped)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return None


def _restore(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """Rows of a run's ``metrics.jsonl`` (``path``: the file or the run directory), optionally only one ``kind``.

    "nan" / "inf" / "-inf" strings come back as floats; an unreadable line (a write cut by a crash) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    for row in _read_rows(path):
        if kind is None or row.get("kind") == kind:
            rows.append({k: _restore(v) for k, v in row.items()})
    return rows


def _read_rows(path: Path) -> Iterable[dict]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def _format_count(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.1f}"


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _progress_fields(scalars: dict) -> dict[str, str]:
    """loss, tokens/s, MFU, ETA and bad records of a row, formatted for the progress line (missing ones left
    out)."""
    fields = {}
    if isinstance(scalars.get("loss"), (int, float, str)):
        loss = scalars["loss"]
        fields["loss"] = f"{loss:.4f}" if isinstance(loss, (int, float)) else loss
    if isinstance(scalars.get("samples_per_s"), (int, float)):
        fields["img/s"] = _format_count(scalars["samples_per_s"])
    elif isinstance(scalars.get("tokens_per_s"), (int, float)):
        fields["tok/s"] = _format_count(scalars["tokens_per_s"])
    if isinstance(scalars.get("mfu"), (int, float)):
        fields["mfu"] = f"{100 * scalars['mfu']:.1f}%"
    if isinstance(scalars.get("eta_s"), (int, float)):
        fields["eta"] = _format_seconds(scalars["eta_s"])
    if isinstance(scalars.get("bad_records"), dict):  # the total; the warning at each increase names the sources
        fields["bad"] = str(scalars["bad_records"]["total"])
    return fields


class MetricsLogger:
    """Writes a run's metrics: ``<output_dir>/metrics.jsonl``, TensorBoard events in ``<output_dir>/tensorboard/``
    and a progress line on rank 0. On a non-main rank (``is_main=False``) every method does nothing.

    ``total_steps``: the run's last step (the progress bar's total). ``tensorboard``: write event files (tags
    ``train/<name>``, ``eval/<name>``, ``whitebox/<name>/layer_<i>``); without the ``tensorboard`` package a warning is
    given once and the run goes on without. ``progress``: True picks a tqdm bar on a terminal and one plain line per
    ``log`` otherwise (Slurm log files: tqdm's carriage returns make them unreadable); "bar" or "lines" forces one;
    False: none. Use as a context manager or call [`close`].
    """

    def __init__(
        self,
        output_dir: str | Path,
        is_main: bool,
        total_steps: int,
        tensorboard: bool = True,
        progress: bool | Literal["bar", "lines"] = True,
    ):
        self.output_dir = Path(output_dir)
        self.is_main = bool(is_main)
        self.total_steps = total_steps
        self.path = self.output_dir / METRICS_FILE
        self._tensorboard = tensorboard
        self._writer = None  # SummaryWriter, opened on first use (after a possible truncate_after)
        self._purge_step: int | None = None
        self._start_step = 0
        self._bar = None
        self._file = None
        self._closed = False
        if progress is True:
            progress = "bar" if sys.stderr.isatty() else "lines"
        if progress == "bar":
            try:
                import tqdm  # noqa: F401
            except ImportError:
                progress = "lines"
        self._progress = progress or None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (open for the run; close() ends it)

    # -- rows ------------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MetricsLogger is closed")

    def _write_row(self, kind: str, step: int, scalars: dict) -> dict:
        clash = [key for key in _RESERVED if key in scalars]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the row itself ({list(_RESERVED)})")
        row = {"kind": kind, "step": int(step), "time": time.time()}
        row.update((str(k), _json_value(v)) for k, v in scalars.items())
        self._file.write(json.dumps(row, allow_nan=False) + "\n")  # one write per line, then flushed
        self._file.flush()
        return row

    def log(self, step: int, **scalars) -> None:
        """A training row for optimizer step ``step``: any scalars (floats, ints, 0-d tensors, strings; units in the
        name, e.g. ``tokens_per_s``, ``mfu`` as a fraction, ``eta_s``, ``mem_max_allocated_gib``). Updates the
        progress line with loss, tokens/s, MFU and ETA when given."""
        if not self.is_main:
            return
        self._check_open()
        row = self._write_row("train", step, scalars)
        self._add_scalars("train", step, row)
        self._show(step, row)

    def warn(self, step: int, message: str) -> None:
        """A warning: one line ``step N warning: <message>`` on stderr (whatever ``progress`` is: a warning is not
        progress) and a training row ``{"event": "warning", "message": ...}``."""
        if not self.is_main:
            return
        self._check_open()
        self._write_row("train", step, {"event": "warning", "message": message})
        self._print(f"step {step} warning: {message}", always=True)

    def log_eval(self, step: int, **scalars) -> None:
        """An evaluation row (``"kind": "eval"``), e.g. ``log_eval(step, loss=..., perplexity=...)``."""
        if not self.is_main:
            return
        self._check_open()
        row = self._write_row("eval", step, scalars)
        self._add_scalars("eval", step, row)
        fields = " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k not in _RESERVED
        )
        self._print(f"step {step} eval | {fields}")

    def log_whitebox(self, step: int, layers: list[dict]) -> None:
        """White-box measures, one row per layer (``"kind": "whitebox"``, ``"layer": i``, then the layer's measures,
        e.g. from ``crate_lm.whitebox.measure_crate``). A dict without ``layer`` takes its index in ``layers``.
        TensorBoard gets the scalar measures as ``whitebox/<name>/layer_<i>`` (lists only go to the jsonl)."""
        if not self.is_main:
            return
        self._check_open()
        for index, measures in enumerate(layers):
            measures = dict(measures)
            layer = int(measures.pop("layer", index))
            row = self._write_row("whitebox", step, {"layer": layer, **measures})
            writer = self._summary_writer()
            if writer is not None:
                for key, value in row.items():
                    number = _scalar(value)
                    if key not in _RESERVED and key != "layer" and number is not None:
                        writer.add_scalar(f"whitebox/{key}/layer_{layer}", number, step)
        if self._writer is not None:
            self._writer.flush()

    # -- resume ----------------------------------------------------------------------------------------------------

    def truncate_after(self, step: int) -> int:
        """At resume from the checkpoint of ``step``: drop the rows with ``step > step`` (they will be recomputed) and
        unreadable lines, atomically (temp file in the same directory, fsync, ``os.replace``; on error the file is
        left as it was). TensorBoard events after ``step`` are purged when the writer opens, and the progress bar
        starts at ``step``. Returns the number of rows dropped."""
        if not self.is_main:
            return 0
        self._check_open()
        self._start_step = int(step)
        self._purge_step = int(step) + 1
        if self._writer is not None:  # reopen so that the purge applies
            self._writer.close()
            self._writer = None
        self._file.close()
        dropped = 0
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
            kept = []
            for line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    dropped += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
                    dropped += 1
                else:
                    kept.append(line)
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        finally:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (reopened for the run)
        return dropped

    # -- TensorBoard and progress ----------------------------------------------------------------------------------

    def _summary_writer(self):
        if not self._tensorboard:
            return None
        if self._writer is None:
            global _warned_no_tensorboard
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                if not _warned_no_tensorboard:
                    warnings.warn(
                        f"TensorBoard logging is off: {error} (pip install tensorboard); metrics.jsonl "
                        "is still written",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    _warned_no_tensorboard = True
                self._tensorboard = False
                return None
            self._writer = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
        return self._writer

    def _add_scalars(self, prefix: str, step: int, row: dict) -> None:
        writer = self._summary_writer()
        if writer is None:
            return
        for key, value in row.items():
            number = _scalar(value)
            if key not in _RESERVED and number is not None:
                writer.add_scalar(f"{prefix}/{key}", number, step)
        writer.flush()

    def _print(self, line: str, always: bool = False) -> None:
        """One line on stderr (above the bar when there is one); only with a progress display unless ``always``."""
        if self._progress is None and not always:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _show(self, step: int, row: dict) -> None:
        if self._progress is None:
            return
        fields = _progress_fields(row)
        if self._progress == "bar":
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=self.total_steps, initial=self._start_step, unit="step", dynamic_ncols=True, file=sys.stderr
                )
            self._bar.set_postfix(fields, refresh=False)
            if step >= self._bar.n:
                self._bar.update(step - self._bar.n)
            else:
                self._bar.n = step
                self._bar.refresh()
        else:
            self._print(" | ".join([f"step {step}/{self.total_steps}"] + [f"{k} {v}" for k, v in fields.items()]))

    def close(self) -> None:
        """Flush and close the file, the TensorBoard writer and the progress bar (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

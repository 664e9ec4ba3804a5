"""Training metrics: device peaks, throughput / MFU, and the run's ``metrics.jsonl`` + TensorBoard + progress line.

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
        logger.log_eval(step, loss=eval_loss); meter.restart()   # eval time is not training time
logger.close()
```

Row format of ``<output_dir>/metrics.jsonl`` (one JSON object per line, appended and flushed line by line)::

    {"kind": "train", "step": 10, "time": 1760000000.123, "loss": 3.21, "lr": 0.0006, "tokens_per_s": ..., ...}
    {"kind": "eval", "step": 100, "time": ..., "loss": 3.05, "perplexity": 21.1}
    {"kind": "whitebox", "step": 100, "time": ..., "layer": 0, "rc": ..., "rc_per_head": [...], ...}

``kind`` is always present, ``step`` is the optimizer step, ``time`` is Unix wall time in seconds. White-box
measures are written one row per layer (a flat table: filter on ``kind == "whitebox"`` and group by ``layer``).
Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so that every line is strict JSON;
[`read_metrics`] turns them back into floats.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from data_pipeline.files import atomic_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
GIB = 1024**3

# ----------------------------------------------------------------------------------------------------------------------
# Device peaks
# ----------------------------------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) peak tensor-core TFLOP/s per GPU, from NVIDIA's datasheets / architecture whitepapers.
# Datasheets print the sparse figure with an asterisk; the dense one is half of it. "bf16"/"fp16" are with FP32
# accumulation (what training uses; GeForce cards run FP16-accumulate at twice these rates). "tf32" is the tensor-core
# rate fp32 matmuls get when TF32 is enabled; "fp32" is the plain (non-tensor) FP32 rate. A dtype missing for a
# device (no bf16 on Volta / Turing, unknown fp32 on B200) is measured instead.
#   H100 SXM5: 1979*/989* (bf16/tf32 sparse), 67 fp32 -> 989.4 / 494.7 / 66.9 (H100 whitepaper, 132 SMs @ 1830 MHz)
#   H100 PCIe: 1513*/756* sparse, 51 fp32 -> 756.5 / 378 / 51.2;  H100 NVL: 1671*/835* sparse, 60 fp32
#   H200 SXM:  same tensor rates as H100 SXM (989 / 494.7 / 67);  H200 NVL: as H100 NVL;  GH200: as H100 SXM
#   A100 (SXM4 and PCIe, 40/80 GB): 312 bf16, 156 tf32, 19.5 fp32 (A100 datasheet; A800 the same)
#   A10: 125 bf16, 62.5 tf32, 31.2 fp32 (A10 datasheet); A10G (AWS G5): 70 bf16, 35 tf32, 35 fp32 (AWS specs as
#        tabulated in Baseten's "A10 vs A10G"); A30: 165 / 82 / 10.3; A40: 149.7 / 74.8 / 37.4
#   L4: 242*/120* sparse, 30.3 fp32 -> 121 / 60;  L40S: 362.05 / 183 / 91.6;  L40: 181.05 / 90.5 / 90.5
#   V100 SXM2: 125 fp16 tensor, 15.7 fp32; V100 PCIe: 112 / 14; V100S: 130 / 16.4 (no bf16, no tf32);  T4: 65 / 8.1
#   RTX 4090: 165.2 fp16/bf16 (FP32 acc.), 82.6 tf32, 82.6 fp32 (Ada whitepaper);  RTX 3090: 71 / 35.6 / 35.6
#   RTX A6000: 154.8 / 77.4 / 38.7;  RTX 6000 Ada: 364.2 / 182.1 / 91.1
#   B200 (HGX): 4.5 PF* bf16, 2.2 PF* tf32 sparse -> 2250 / 1100
# A MIG slice reports its parent's name; its peak is a fraction of this (MFU then reads low by that factor).
_PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    # (regex searched in torch.cuda.get_device_name, case-insensitive; first match wins), display name, peaks
    (r"\bGH200\b", "GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH[18]00\b.*\bPCIe\b", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH[18]00\b", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bB200\b", "B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0}),
    (r"\bA[18]00\b", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA10G\b", "A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 35.0}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bA30\b", "A30", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    (r"\bA40\b", "A40", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    (r"\bL40S\b", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", "L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bV100S\b", "V100S", {"fp16": 130.0, "fp32": 16.4}),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bV100\b", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
    (r"\bRTX 4090\b", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"\bRTX 3090\b", "RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bRTX 6000 Ada\b", "RTX 6000 Ada", {"bf16": 364.2, "fp16": 364.2, "tf32": 182.1, "fp32": 91.1}),
    (r"\bRTX A6000\b", "RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
]

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (strings are returned as given)."""
    if isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"no peak for dtype {dtype}: allowed are {sorted(_DTYPE_NAMES.values())}")
    return _DTYPE_NAMES[dtype]


def lookup_peak_flops(device_name: str, dtype: torch.dtype | str, tf32: bool = False) -> tuple[float, str] | None:
    """Dense peak FLOP/s of a GPU named ``device_name`` (as ``torch.cuda.get_device_name`` spells it) for ``dtype``.

    ``dtype``: a torch dtype or one of "bf16", "fp16", "tf32", "fp32". ``tf32=True`` turns an fp32 request into the
    TF32 tensor-core rate (what fp32 matmuls run at when TF32 is allowed); a device without TF32 falls back to fp32.
    Returns ``(flops, "table:<device> <dtype>")``, or None when the device or the dtype is not in the table.
    """
    key = dtype_name(dtype)
    if key == "fp32" and tf32:
        key = "tf32"
    for pattern, name, peaks in _PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if key == "tf32" and key not in peaks:
                key = "fp32"
            if key not in peaks:
                return None
            return peaks[key] * 1e12, f"table:{name} {key}"
    return None


def _synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def matmul_peak_flops(size: int = 2048, repeats: int = 5, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> float:
    """Best rate (FLOP/s) of a square ``size x size`` GEMM of ``dtype`` on ``device`` (default CPU), best of
    ``repeats`` after one warm-up call, timed in this process: the denominator of CPU MFU (``2 size^3`` FLOPs per GEMM).
    """
    device = torch.device(device or "cpu")
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    _synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _probe_size(device: torch.device, dtype: torch.dtype, max_size: int, budget_s: float = 0.05) -> int:
    """Largest power-of-two size <= ``max_size`` whose GEMM stays near ``budget_s`` seconds: a CPU without fast bf16
    kernels takes ~1 minute for one 2048^2 bf16 GEMM, so the size is grown from 256 while the GEMM is quick."""
    size = 256
    while size < max_size:
        a = torch.randn(size, size, device=device).to(dtype)
        start = time.perf_counter()
        torch.mm(a, a)
        _synchronize(device)
        if time.perf_counter() - start > budget_s:
            break
        size *= 2
    return size


def _tf32_enabled() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.backends.cuda.matmul.allow_tf32)


def device_peak_flops(device: torch.device | str, dtype: torch.dtype, repeats: int = 5) -> tuple[float, str]:
    """Peak dense matmul FLOP/s of one ``device`` for ``dtype``, and its source.

    A CUDA device found in the table gives its datasheet peak (fp32 counts as TF32 when
    ``torch.backends.cuda.matmul.allow_tf32`` is on): ``(989.4e12, "table:H100 SXM bf16")``. Otherwise (CPU, an
    unknown GPU, a dtype the table lacks) a square GEMM of ``dtype`` is timed here, best of ``repeats``:
    ``(7.4e10, "measured: 2048^2 fp32 GEMM")`` (CPU: up to 2048, smaller when the dtype is slow; GPU: 8192).
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = lookup_peak_flops(name, dtype, tf32=_tf32_enabled())
        if found is not None:
            return found
        size, where = 8192, f" on {name}"
    else:
        size, where = _probe_size(device, dtype, 2048), "" if device.type == "cpu" else f" on {device.type}"
    flops = matmul_peak_flops(size, repeats, device, dtype)
    return flops, f"measured: {size}^2 {dtype_name(dtype)} GEMM{where}"


# ----------------------------------------------------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------------------------------------------------


class ThroughputMeter:
    """Tokens/s, MFU and ETA over a sliding window of recent step times.

    ``tokens_per_step``: tokens of one optimizer step over all ranks (global batch x sequence length).
    ``flops_per_token``: analytic training FLOPs per token (``launcher.flops.training_flops_per_token``).
    ``peak_flops``: peak FLOP/s of one device (``device_peak_flops``); None leaves MFU out.
    ``world_size``: devices sharing the step. ``total_steps``: for the ETA. ``window``: steps averaged over.
    ``samples_per_step``: also report ``samples_per_s`` (images/s of an image run, whose tokens are patches).

    Time a step with [`tick`] (after each step; the first tick after construction or [`restart`] only starts the
    clock, so the warm-up step is not counted) or feed durations with [`record`].
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None = None,
                 world_size: int = 1, total_steps: int | None = None, window: int = 20,
                 samples_per_step: int | None = None):
        if tokens_per_step <= 0 or world_size <= 0 or window <= 0:
            raise ValueError("tokens_per_step, world_size and window must be positive")
        self.tokens_per_step = tokens_per_step
        self.samples_per_step = samples_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.total_steps = total_steps
        self._window: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, steps) per interval
        self._last: float | None = None

    def restart(self) -> None:
        """Forget the clock (not the window): call after eval or a checkpoint so that their time is not a step's."""
        self._last = None

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

        ``tokens`` (tokens trained on so far, ``step x tokens_per_step``), and once a step was timed
        ``step_time_s`` (s), ``tokens_per_s`` (all devices), ``tokens_per_s_per_device``, ``mfu`` (fraction 0..1:
        ``flops_per_token x tokens_per_s_per_device / peak_flops``; only with a peak) and ``eta_s`` (seconds for the
        remaining ``total_steps - step`` steps; only with ``total_steps``).
        """
        out: dict[str, float] = {"tokens": step * self.tokens_per_step}
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


# ----------------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _max_rss_bytes() -> int | None:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory of this process in GiB, keys ready for ``MetricsLogger.log``.

    CUDA: ``mem_allocated_gib``, ``mem_max_allocated_gib``, ``mem_max_reserved_gib`` (torch's caching allocator,
    peaks since start or ``torch.cuda.reset_peak_memory_stats``). Otherwise the host process: ``mem_rss_gib``
    (resident set; psutil, else /proc/self/status) and ``mem_max_rss_gib`` (peak, from getrusage) where available.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
                "mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "mem_max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    out = {}
    rss, peak = _rss_bytes(), _max_rss_bytes()
    if rss is not None:
        out["mem_rss_gib"] = rss / GIB
    if peak is not None:
        out["mem_max_rss_gib"] = peak / GIB
    return out


def _tensor_storages(obj, depth: int, found: dict[int, int]) -> None:
    """Record ``data_ptr -> bytes`` of every storage reachable from ``obj`` through dicts, lists and tuples."""
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        if obj.device.type != "meta" and storage.nbytes() and storage.data_ptr():
            found[storage.data_ptr()] = storage.nbytes()
        return
    if depth <= 0:
        return
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for value in values:
        _tensor_storages(value, depth - 1, found)


def model_state_bytes(engine) -> int:
    """Bytes this rank holds of model state — parameters (ZeRO-3: its partition), gradients, the optimizer's fp32
    partitions, moments and gradient buffers — counting each storage once. What ZeRO partitions; activations are
    not included."""
    found: dict[int, int] = {}
    for parameter in engine.module.parameters():
        _tensor_storages([parameter.data, parameter.grad, getattr(parameter, "ds_tensor", None)], 1, found)
    optimizer = engine.optimizer
    _tensor_storages(vars(optimizer), 3, found)  # ZeRO's flat fp32 groups, partitions and gradient buffers
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer: moments, and its parameters' grads
    _tensor_storages(list(inner.state.values()), 2, found)
    for group in inner.param_groups:
        _tensor_storages([[p, p.grad] for p in group["params"]], 2, found)
    return sum(found.values())


# ----------------------------------------------------------------------------------------------------------------------
# Logger
# ----------------------------------------------------------------------------------------------------------------------

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
    """loss, tokens/s, MFU and ETA of a row, formatted for the progress line (missing ones left out)."""
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

    def __init__(self, output_dir: str | Path, is_main: bool, total_steps: int, tensorboard: bool = True,
                 progress: bool | Literal["bar", "lines"] = True):
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
            self._file = open(self.path, "a", encoding="utf-8")

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

    def log_eval(self, step: int, **scalars) -> None:
        """An evaluation row (``"kind": "eval"``), e.g. ``log_eval(step, loss=..., perplexity=...)``."""
        if not self.is_main:
            return
        self._check_open()
        row = self._write_row("eval", step, scalars)
        self._add_scalars("eval", step, row)
        fields = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in row.items() if k not in _RESERVED)
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
            self._file = open(self.path, "a", encoding="utf-8")
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
                    warnings.warn(f"TensorBoard logging is off: {error} (pip install tensorboard); metrics.jsonl "
                                  "is still written", RuntimeWarning, stacklevel=3)
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

    def _print(self, line: str) -> None:
        if self._progress is None:
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

                self._bar = tqdm(total=self.total_steps, initial=self._start_step, unit="step",
                                 dynamic_ncols=True, file=sys.stderr)
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

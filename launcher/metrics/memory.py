"""Memory of a run: the process's (RSS; CUDA's caching allocator on GPUs) and the model state's (weights, gradients,
optimizer states) on this rank."""

from __future__ import annotations

import sys

import psutil
import torch

GIB = 1024**3


def _rss_bytes() -> int | None:
    return psutil.Process().memory_info().rss


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
        return {
            "mem_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
            "mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "mem_max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
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

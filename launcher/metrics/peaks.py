"""Peak FLOP/s of a device by dtype, the denominator of MFU: a datasheet table for known GPUs (dense, not the sparsity
figure), otherwise a GEMM timed in this process (the CPU, an unknown accelerator)."""

from __future__ import annotations

import re
import time
import warnings

import torch

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


def matmul_peak_flops(
    size: int = 2048, repeats: int = 5, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> float:
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

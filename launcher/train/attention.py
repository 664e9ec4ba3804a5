"""Which SDPA kernel a training run asks for on CUDA: FlashAttention first.

The training path of every text model calls ``F.scaled_dot_product_attention`` with ``is_causal=True`` and no mask
(CRATE's MSSA directly; HF GPT-2 and Llama through ``attn_implementation="sdpa"``, which passes no mask when no
token is padded), the case FlashAttention serves in bf16 and fp16 for head sizes up to 256. torch picks the first
*eligible* backend of a priority order, and that order has changed between releases (2.5.0 put cuDNN first on
Hopper; 2.5.1 moved it back), so the loop states its own: flash, memory-efficient, cuDNN, math. A shape flash cannot
serve (fp32, a padding mask) still falls through to the next backend, as before. The order is set around the loop
(``launcher.train.loop.train``), never in model code, and only on CUDA: the CPU keeps torch's own choice.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

FLASH_FIRST = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]


def flash_attention_first(device: torch.device | str):
    """A context in which SDPA on CUDA tries FlashAttention first (``FLASH_FIRST``); elsewhere it changes nothing.

    torch < 2.6 takes no priority order (``sdpa_kernel`` has no ``set_priority``): there cuDNN is left out instead,
    which keeps flash ahead of everything but math, whatever that release's default order."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(FLASH_FIRST, set_priority=True)
    return sdpa_kernel([backend for backend in FLASH_FIRST if backend != SDPBackend.CUDNN_ATTENTION])

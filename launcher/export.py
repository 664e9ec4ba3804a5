"""HF export: ``<output_dir>/hf/`` holds safetensors, config, generation config, tokenizer and, for CRATE, the
modeling code (``auto_map``), so ``AutoModelForCausalLM.from_pretrained(<output_dir>/hf)`` just works.

ZeRO-3 partitions the parameters over ranks: every rank enters the gather, rank 0 writes. The directory is written
beside the old one and swapped in, so a crash mid-export never leaves a half-written ``hf/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def export_hf(model, tokenizer, out_dir: str | os.PathLike, is_main: bool, zero_stage: int = 0) -> None:
    out = Path(out_dir)
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather:
        if is_main:
            staging = out.with_name(f".{out.name}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            previous = out.with_name(f".{out.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            if out.exists():
                os.replace(out, previous)
            os.replace(staging, out)
            shutil.rmtree(previous, ignore_errors=True)

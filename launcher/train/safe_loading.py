"""Reading DeepSpeed's checkpoint files without letting them run code.

A ``.pt`` file is a zip holding a pickle, and a pickle can call any function while it loads (``__reduce__``). The
manifest's checksums protect against damage, not against a file someone crafted: checkpoints travel between people
and clusters. So every pickle a checkpoint holds is read with torch's restricted unpickler (``weights_only=True``):
tensors, containers, numbers and strings, plus the few DeepSpeed types its files hold (:data:`DEEPSPEED_TYPES`,
each a plain record: building one runs no code a file controls).

Two layers:

- :func:`check_checkpoint_pickles` reads each ``.pt`` file's pickle up front (memory-mapped: the tensors' bytes are
  not read) and turns the first refused one into a one-line :class:`CheckpointError` that names the file and the
  object it tried to build;
- :func:`restricted_unpickling` wraps DeepSpeed's own loaders (``engine.load_checkpoint``, ``zero_to_fp32``), which
  pass ``weights_only=False``: ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that in every ``torch.load`` they make, so a
  file replaced after the check is refused too.

``trust_pickles=True`` (``train.trust_pickled_checkpoints``, ``crate export --trust-pickled-checkpoint``) turns both
off, for a checkpoint of a DeepSpeed version storing other types or one written before the rank state moved to
JSON and safetensors (``crate_rank{R}.pt``), from a source the user trusts.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import CheckpointError

# What DeepSpeed 0.19 pickles besides tensors and plain values: ZeRO optimizer states hold the loss scaler, the stage
# enum and the fragment addresses of bf16/ZeRO partitions.
DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
TRUST_HINT = (
    "if you trust whoever wrote this checkpoint, set train.trust_pickled_checkpoints=true "
    "(crate export: --trust-pickled-checkpoint)"
)
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def allowed_types() -> list[type]:
    """The classes of :data:`DEEPSPEED_TYPES` (imported on first use: DeepSpeed is slow to import)."""
    classes = []
    for name in DEEPSPEED_TYPES:
        module, _, attribute = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attribute))
    return classes


def _refusal(path: Path, error: Exception) -> CheckpointError:
    refused = _REFUSED_GLOBAL.search(str(error))
    what = f"it would call {refused.group(1)}" if refused else str(error).strip().splitlines()[0][:160]
    return CheckpointError(
        f"{path}: refusing to unpickle it ({what}; only tensors, plain values and DeepSpeed's own records are read, "
        f"since a pickle can run code); {TRUST_HINT}"
    )


def check_checkpoint_pickles(directory: Path, trust_pickles: bool = False) -> None:
    """Read the pickle of every DeepSpeed ``.pt`` file under ``directory`` with the restricted unpickler; one-line
    :class:`CheckpointError` naming the first file it refuses. Nothing is checked with ``trust_pickles``."""
    if trust_pickles:
        return
    import torch

    with torch.serialization.safe_globals(allowed_types()):
        for path in sorted(Path(directory).rglob("*.pt")):
            if path.name.startswith("crate_rank"):  # a legacy rank state: read only when trusted (rank_state.py)
                continue
            if not zipfile.is_zipfile(path):  # torch.save has written zips since torch 1.6: a bare pickle is crafted
                raise CheckpointError(f"{path}: not a torch zip archive, refusing to unpickle it; {TRUST_HINT}")
            try:  # mmap: only the pickle is read, not the tensors' bytes
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as error:
                raise _refusal(path, error) from None


@contextlib.contextmanager
def restricted_unpickling(trust_pickles: bool = False) -> Iterator[None]:
    """Every ``torch.load`` inside uses the restricted unpickler with :data:`DEEPSPEED_TYPES` allowed, whatever its
    caller passed; a refused file is a one-line :class:`CheckpointError`. A no-op with ``trust_pickles``."""
    if trust_pickles:
        yield
        return
    import torch

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed_types()):
            yield
    except pickle.UnpicklingError as error:
        raise _refusal(Path("a checkpoint file"), error) from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous

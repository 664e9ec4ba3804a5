"""Each rank's own part of a checkpoint — its data cursor and RNG states — in formats that cannot run code.

``crate_rank{R}.json`` holds the state as JSON; its arrays (the shuffle buffer, the numpy RNG's key, the torch RNG
states) are stored in ``crate_rank{R}.safetensors`` and named in the JSON by a reference. JSON alone would lose types
the readers rely on, so these are tagged: ``{"__tuple__": [...]}`` (``random.setstate`` wants tuples),
``{"__items__": [[key, value], ...]}`` for a dict with keys other than strings, ``{"__tensor__": name}`` and
``{"__ndarray__": name}``. A state round-trips exactly: same types, same values, same dtypes.

Checkpoints written before this format hold ``crate_rank{R}.pt`` (a pickle); it is read only when the user trusts
pickled checkpoints (``launcher.train.safe_loading``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from launcher.errors import CheckpointError
from launcher.train.safe_loading import TRUST_HINT


def rng_state() -> dict:
    """This process's RNG states: Python's, numpy's, torch's (CPU, and each CUDA device's)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, torch.Tensor):
        arrays[name := f"a{len(arrays)}"] = value.detach().cpu().numpy()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        arrays[name := f"a{len(arrays)}"] = value
        return {"__ndarray__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(v, arrays) for key, v in value.items()}
        return {"__items__": [[_encode(key, arrays), _encode(v, arrays)] for key, v in value.items()]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"rank state: cannot store a {type(value).__name__} as JSON or an array")


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return torch.from_numpy(arrays[value["__tensor__"]].copy())
    if "__ndarray__" in value:
        return arrays[value["__ndarray__"]].copy()
    if "__tuple__" in value:
        return tuple(_decode(v, arrays) for v in value["__tuple__"])
    if "__items__" in value:
        return {_to_key(_decode(key, arrays)): _decode(v, arrays) for key, v in value["__items__"]}
    return {key: _decode(v, arrays) for key, v in value.items()}


def _to_key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_rank_state(directory: Path, rank: int, state: dict) -> None:
    """Write ``state`` as ``crate_rank{rank}.json`` and ``crate_rank{rank}.safetensors`` in ``directory``."""
    arrays: dict[str, np.ndarray] = {}
    document = json.dumps(_encode(state, arrays))
    save_file(
        {name: np.ascontiguousarray(array) for name, array in arrays.items()},
        directory / f"crate_rank{rank}.safetensors",
    )
    (directory / f"crate_rank{rank}.json").write_text(document)


def load_rank_state(directory: Path, rank: int, trust_pickles: bool = False) -> dict:
    """The state :func:`save_rank_state` wrote; a legacy ``crate_rank{rank}.pt`` only with ``trust_pickles``."""
    document = directory / f"crate_rank{rank}.json"
    if document.is_file():
        return _decode(json.loads(document.read_text()), load_file(directory / f"crate_rank{rank}.safetensors"))
    legacy = directory / f"crate_rank{rank}.pt"
    if legacy.is_file() and trust_pickles:
        return torch.load(legacy, weights_only=False)
    if legacy.is_file():
        raise CheckpointError(
            f"{legacy}: a pickled rank state (the format before JSON), not read by default; {TRUST_HINT}"
        )
    raise CheckpointError(f"{directory}: no state of rank {rank} (crate_rank{rank}.json); was it saved by more ranks?")

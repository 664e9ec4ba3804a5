"""Checkpoint files never run code: the rank state is JSON and safetensors, DeepSpeed's pickles go through torch's
restricted unpickler. The crafted pickle of issue 16 in each file of real ZeRO checkpoints is in test_pretrain."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.errors import CheckpointError
from launcher.train.rank_state import load_rank_state, rng_state, save_rank_state, set_rng_state
from launcher.train.safe_loading import check_checkpoint_pickles, restricted_unpickling


class RunsACommand:
    """What an attacker puts in a checkpoint: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path, zipped: bool = True) -> None:
    """Replace ``path`` by a pickle that creates ``marker`` when loaded (a torch zip, or a bare pickle)."""
    if zipped:
        torch.save({"module": RunsACommand(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(RunsACommand(marker)))


def same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, (torch.Tensor, np.ndarray)):
        assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
    else:
        assert a == b


def test_rank_state_round_trips_exactly_and_restores_the_rngs(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {
        "data": {
            "streams": {0: {"buffer": torch.arange(12).view(3, 4), "origin": [[0, 1], [1, 0]]}},
            "refs": np.arange(8, dtype=np.int64).reshape(-1, 4),
            "bad": {"a.jsonl": {"count": 2, "first": ["a.jsonl:3"]}},
            "pair": (1, 2.5, None, True),
            "__weird": {("tuple", "key"): "value"},
        },
        "rng": rng_state(),
    }
    save_rank_state(tmp_path, 1, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crate_rank1.json", "crate_rank1.safetensors"]
    loaded = load_rank_state(tmp_path, 1)
    same(loaded, state)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_legacy_pickled_rank_state_is_read_only_when_trusted(tmp_path):
    torch.save({"data": {"consumed": 3}, "rng": rng_state()}, tmp_path / "crate_rank0.pt")
    with pytest.raises(CheckpointError, match=r"crate_rank0.pt: a pickled rank state .*trust_pickled_checkpoints=true"):
        load_rank_state(tmp_path, 0)
    assert load_rank_state(tmp_path, 0, trust_pickles=True)["data"] == {"consumed": 3}
    with pytest.raises(CheckpointError, match="no state of rank 1"):
        load_rank_state(tmp_path, 1)


@pytest.mark.parametrize("zipped", [True, False])
def test_a_crafted_pickle_is_refused_by_name_and_never_runs(zipped, tmp_path):
    marker = tmp_path / "ran"
    victim = tmp_path / "ckpt" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.parent.mkdir()
    torch.save({"weights": torch.ones(2)}, victim.parent / "mp_rank_00_model_states.pt")
    craft(victim, marker, zipped)
    with pytest.raises(CheckpointError, match=f"{victim}: (refusing to unpickle it|not a torch zip)"):
        check_checkpoint_pickles(victim.parent)
    # the second layer: DeepSpeed's loaders pass weights_only=False, which is overridden inside
    with pytest.raises(CheckpointError, match="refusing to unpickle it"), restricted_unpickling():
        torch.load(victim, weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored
    check_checkpoint_pickles(victim.parent, trust_pickles=True)  # trusted: not even read
    assert not marker.exists()

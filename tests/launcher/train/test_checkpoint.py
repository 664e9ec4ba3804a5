"""Checkpoint directories: atomic saves, keep-last-K, and fallback from a damaged newest checkpoint."""

import os

import pytest

from launcher.train.checkpoint import CheckpointManager


def writer(payload: bytes):
    def write(root, tag):
        directory = root / tag
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.pt").write_bytes(payload)
        (directory / "data_rank0.pt").write_bytes(b"cursor" + payload[:4])

    return write


def test_save_writes_manifest_and_latest_and_keeps_the_last_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        manager.save(step, writer(bytes([step]) * 1000), {"world_size": 1})
    assert manager.complete_steps() == [20, 30]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step30"
    assert manager.newest_valid() == (30, tmp_path / "checkpoints" / "global_step30")
    assert manager.manifest(30)["world_size"] == 1 and "model.pt" in manager.manifest(30)["files"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / "model.pt").write_bytes(b"short"), "truncated file model.pt"),
        (lambda d: (d / "model.pt").write_bytes(b"\x00" * 1000), "corrupt file model.pt"),
        (lambda d: os.remove(d / "data_rank0.pt"), "missing file data_rank0.pt"),
        (lambda d: os.remove(d / "manifest.json"), "no manifest"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage, reason):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(10, writer(b"a" * 1000))
    manager.save(20, writer(b"b" * 1000))
    damage(tmp_path / "checkpoints" / "global_step20")
    with pytest.warns(UserWarning, match=reason):
        assert manager.newest_valid()[0] == 10


def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(10, writer(b"a" * 1000))

    def crashing(root, tag):
        writer(b"b" * 1000)(root, tag)
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        manager.save(20, crashing)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step10"
    assert manager.complete_steps() == [10] and manager.newest_valid()[0] == 10
    manager.save(20, writer(b"c" * 1000))  # the next save clears the stale staging directory
    assert manager.newest_valid()[0] == 20

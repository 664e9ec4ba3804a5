"""Checkpoint directories: atomic saves, keep-last-K, fallback from a damaged newest checkpoint, and the checksums
shared out over the ranks (2 processes, gloo)."""

import os
import warnings
from pathlib import Path

import pytest

from launcher.train.checkpoint import CheckpointManager, hash_shares


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


def test_pruning_counts_only_intact_checkpoints_and_keeps_the_one_just_saved(tmp_path):
    # keep_last=1, the newest checkpoint damaged, a resumed run (from the older one) saves a step before it: the
    # fresh checkpoint stays, the damaged newer one is neither counted nor deleted, the older intact one goes.
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(10, writer(b"a" * 1000))
    manager.save(30, writer(b"c" * 1000))
    (tmp_path / "checkpoints" / "global_step30" / "model.pt").write_bytes(b"short")
    manager.keep_last = 2
    manager.save(10, writer(b"a" * 1000))  # the resume would start from here; bring back an older checkpoint
    manager.keep_last = 1
    with pytest.warns(UserWarning, match="truncated file model.pt"):
        assert manager.newest_valid()[0] == 10
    manager.save(20, writer(b"b" * 1000))
    assert manager.complete_steps() == [20, 30]
    assert manager.verify(20) is None and manager.verify(30) is not None
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step20"


def test_pruning_never_deletes_a_checkpoint_without_a_manifest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(10, writer(b"a" * 1000))
    os.remove(tmp_path / "checkpoints" / "global_step10" / "manifest.json")  # damaged, or not ours
    manager.save(20, writer(b"b" * 1000))
    manager.save(30, writer(b"c" * 1000))
    assert manager.complete_steps() == [10, 30]
    assert (tmp_path / "checkpoints" / "global_step10" / "model.pt").read_bytes() == b"a" * 1000


def test_a_corrupt_newer_checkpoint_is_moved_aside_when_its_step_is_saved_again(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(10, writer(b"a" * 1000))
    manager.save(20, writer(b"b" * 1000))
    (tmp_path / "checkpoints" / "global_step20" / "model.pt").write_bytes(b"\x00" * 1000)  # corrupt, same size
    with pytest.warns(UserWarning, match="corrupt file model.pt.*moved to .*damaged-global_step20"):
        manager.save(20, writer(b"B" * 1000))
    assert manager.verify(20) is None and manager.complete_steps() == [10, 20]
    assert (tmp_path / "checkpoints" / "damaged-global_step20" / "model.pt").read_bytes() == b"\x00" * 1000
    (tmp_path / "checkpoints" / "global_step20" / "model.pt").write_bytes(b"x")
    with pytest.warns(UserWarning, match="damaged-global_step20-2"):
        manager.save(20, writer(b"C" * 1000))
    manager.save(20, writer(b"D" * 1000))  # an intact old copy is replaced without a trace, as before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("damaged")) == [
        "damaged-global_step20",
        "damaged-global_step20-2",
    ]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as CI and the developers' machines have; skipped with the reason otherwise)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("writes", ["bytes", "torch.save"])
def test_a_full_disk_is_one_line_and_removes_the_partial_save(small_disk, writes):
    import torch

    from launcher.errors import CheckpointError

    manager = CheckpointManager(small_disk, keep_last=3)
    manager.save(1, writer(b"x" * 100_000))

    def too_big(root, tag):
        (root / tag).mkdir(parents=True)
        if writes == "bytes":
            (root / tag / "model.pt").write_bytes(b"y" * 2_000_000)
        else:  # torch's writer reports "[enforce fail at inline_container.cc] . unexpected pos", without an errno
            torch.save({"weights": torch.zeros(500_000)}, root / tag / "model.pt")

    with pytest.raises(CheckpointError) as error:
        manager.save(2, too_big)
    message = str(error.value)
    assert message.startswith(f"{small_disk / 'checkpoints'}: no space left on device while saving step 2 (")
    assert "the previous checkpoint takes 0.00 GiB" in message and "\n" not in message
    assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == ["global_step1", "latest"]
    assert manager.newest_valid() == (1, small_disk / "checkpoints" / "global_step1")


def test_other_write_errors_keep_their_traceback(tmp_path):
    def broken(root, tag):
        raise RuntimeError("a bug in the writer")

    with pytest.raises(RuntimeError, match="a bug in the writer"):
        CheckpointManager(tmp_path, keep_last=1).save(1, broken)


def test_what_cannot_resume_on_another_world_size_is_refused_in_one_line_before_any_process(tmp_path):
    """From the newest checkpoint's manifest, before any process: a checkpoint from before elastic resume on another
    world size, a world size that does not divide the data's logical streams or the global batch, a changed
    micro-batch size."""
    from pathlib import Path

    from launcher.cluster.local import pretrain
    from launcher.config.run import load_run_config
    from launcher.errors import CheckpointError, ConfigError
    from launcher.train.elastic import check_resume

    run = tmp_path / "run"
    config_path = Path(__file__).resolve().parents[3] / "configs" / "lm" / "crate-tiny.yaml"
    config = load_run_config(str(config_path), [f"output_dir={run}"])
    micro = config.train.micro_batch_size
    manager = CheckpointManager(run, keep_last=5)
    manager.save(5, writer(b"a" * 100), {"step": 5, "world_size": 2, "zero_stage": 2})  # before elastic resume
    check_resume(config, 2)  # the same world size resumes
    check_resume(config.model_copy(update={"output_dir": str(tmp_path / "new")}), 1)  # nothing to resume
    with pytest.raises(CheckpointError) as error:
        check_resume(config, 1)
    assert str(error.value) == (
        f"{run}/checkpoints/global_step5: written by 2 ranks before crate recorded what resuming on another world "
        "size needs, and this run has 1: resume on 2 ranks (--nproc-per-node 2, or a job of 2 ranks in all), or "
        f"run `crate export {run}` and start a new run in another output_dir with model.init_from={run}/hf"
    )
    with pytest.raises(CheckpointError, match=r"global_step5: written by 2 ranks before crate recorded"):
        pretrain(str(config_path), [f"output_dir={run}"], nproc_per_node=1)
    assert not (run / "config.yaml").exists()  # stopped before anything was written

    facts = {"world_size": 2, "zero_stage": 2, "micro_batch_size": micro, "global_batch_size": 4 * micro}
    manager.save(10, writer(b"b" * 100), {"step": 10, **facts, "samples_seen": 40 * micro, "data_streams": 12})
    for world in (1, 2, 4):
        check_resume(config, world)  # the newest checkpoint decides: it records what an elastic resume needs
    with pytest.raises(ConfigError, match=r"train.global_batch_size: the run's global batch 64 \(from the checkp"):
        check_resume(config, 3)  # 12 streams divide among 3 ranks; a global batch of 4 micro-batches does not
    with pytest.raises(ConfigError, match="train.micro_batch_size: 1, and the checkpoint .* was trained at 16"):
        check_resume(config.model_copy(update={"train": config.train.model_copy(update={"micro_batch_size": 1})}), 1)
    manager.save(15, writer(b"c" * 100), {"step": 15, **facts, "samples_seen": 60 * micro, "data_streams": 4})
    with pytest.raises(ConfigError, match="the run's data has 4 logical streams .* do not divide among 3 ranks"):
        check_resume(config, 3)
    (run / "checkpoints" / "global_step15" / "model.pt").write_bytes(b"short")  # unusable: step 10 will be resumed
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        check_resume(config, 3)


def test_hash_shares_cover_every_file_once_balanced_by_bytes():
    sizes = {"optim_rank0.pt": 400, "optim_rank1.pt": 400, "model.pt": 500, "data_rank0.pt": 10, "data_rank1.pt": 10}
    shares = hash_shares(sizes, 2)
    assert sorted(name for share in shares for name in share) == sorted(sizes)
    loads = [sum(sizes[name] for name in share) for share in shares]
    assert max(loads) - min(loads) <= 400 and hash_shares(sizes, 2) == shares  # balanced, deterministic
    assert hash_shares(sizes, 1) == [sorted(sizes, key=lambda n: (-sizes[n], n))]


def _two_rank_save_and_resume(rank: int, world: int, port: int, root: str, hashed_by: dict) -> None:
    """One rank: save two checkpoints collectively, damage a file of the newest, find the older one again."""
    import torch.distributed as dist

    import launcher.train.checkpoint as checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    hashed = []
    original = checkpoint._sha256
    checkpoint._sha256 = lambda path: hashed.append(path.name) or original(path)

    def gather(obj):
        gathered = [None] * world
        dist.all_gather_object(gathered, obj)
        return gathered

    def any_rank(flag):
        flags = gather(flag)
        return any(flags)

    manager = CheckpointManager(root, 3, rank, dist.barrier, any_rank, world_size=world, gather=gather)

    def write(payload):
        def to(directory_root, tag):
            directory = directory_root / tag
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"optim_rank{rank}.pt").write_bytes(payload * (1000 + rank))
            if rank == 0:
                (directory / "model.pt").write_bytes(payload * 1500)

        return to

    manager.save(10, write(b"a"))
    manager.save(20, write(b"b"))
    hashed_by[f"save{rank}"] = sorted(hashed)
    dist.barrier()
    if rank == 0:  # damage the file rank 1 checks
        share = hash_shares({"optim_rank0.pt": 1000, "optim_rank1.pt": 1001, "model.pt": 1500}, 2)[1]
        (Path(root) / "checkpoints" / "global_step20" / share[0]).write_bytes(
            b"x" * (1001 if "1" in share[0] else 1000)
        )
    dist.barrier()
    hashed.clear()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        hashed_by[f"found{rank}"] = manager.newest_valid()[0]
    hashed_by[f"resume{rank}"] = sorted(hashed)
    dist.destroy_process_group()


def test_two_ranks_hash_their_shares_and_agree_on_a_damaged_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    from launcher.cluster.processes import free_port

    with mp.Manager() as sync:
        hashed_by = sync.dict()
        mp.spawn(_two_rank_save_and_resume, args=(2, free_port(), str(tmp_path), hashed_by), nprocs=2)
        hashed_by = dict(hashed_by)
    manifest = CheckpointManager(tmp_path, 3).manifest(20)
    assert sorted(manifest["files"]) == ["model.pt", "optim_rank0.pt", "optim_rank1.pt"]
    # each file hashed once per save, split over the ranks; rank 0 alone used to hash all three
    assert sorted(hashed_by["save0"] + hashed_by["save1"]) == sorted(
        ["model.pt", "optim_rank0.pt", "optim_rank1.pt"] * 2
    )
    assert hashed_by["save0"] and hashed_by["save1"]
    assert hashed_by["found0"] == hashed_by["found1"] == 10  # rank 1 found step 20 damaged: both fall back
    assert hashed_by["resume0"] and hashed_by["resume1"]

"""Exports and runs replace only what they wrote: an export directory is written only if it is missing, empty or an
earlier export; anything else is refused in one line before any work, and left as it was."""

import json
from pathlib import Path

import pytest

from launcher.cluster.local import check_output_dir, pretrain
from launcher.config.run import parse_run_config
from launcher.errors import CheckpointError, ConfigError, InputError
from launcher.train.checkpoint import CheckpointManager
from launcher.train.export import (
    EXPORT_MARKER,
    _write_export,
    adapter_dir_for,
    export_checkpoint,
    export_target_problem,
    is_export,
)

DATA = {"sources": [{"builtin": "shakespeare"}], "seq_len": 64}


def run_config(output_dir, **extra):
    return parse_run_config({"output_dir": str(output_dir), "data": DATA, "train": {"max_steps": 3}, **extra})


def user_files(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    return directory


def fake_save(payload: str):
    def save(staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_text(payload)

    return save


def test_an_export_goes_to_a_missing_or_empty_directory_or_over_an_earlier_export(tmp_path):
    out = tmp_path / "hf"
    assert export_target_problem(out) is None
    _write_export(out, "model", fake_save("one"))
    assert json.loads((out / EXPORT_MARKER).read_text())["written_by"] == "crate" and is_export(out)
    _write_export(out, "model", fake_save("two"))  # an export is replaced, as before
    assert (out / "model.safetensors").read_text() == "two"
    empty = tmp_path / "empty"
    empty.mkdir()
    _write_export(empty, "model", fake_save("three"))
    assert (empty / "model.safetensors").read_text() == "three"


def test_an_export_written_before_the_marker_is_recognised_by_its_layout(tmp_path):
    legacy = tmp_path / "hf"
    fake_save("old")(legacy)
    (legacy / "tokenizer.json").write_text("{}")
    (legacy / "modeling_crate.py").write_text("")
    assert is_export(legacy) and export_target_problem(legacy) is None
    (legacy / "data.csv").write_text("a,b")  # not something an HF save writes
    assert not is_export(legacy)
    assert export_target_problem(legacy) == f"{legacy} is not empty and not a crate export"


def test_an_export_never_replaces_a_directory_it_did_not_write(tmp_path):
    mine = user_files(tmp_path / "mine")
    with pytest.raises(InputError, match=f"{mine} is not empty and not a crate export"):
        _write_export(mine, "model", fake_save("x"))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert export_target_problem(tmp_path / "file") == f"{tmp_path / 'file'} is a file"


def fake_run(run_dir: Path, **extra) -> Path:
    config = run_config(run_dir, **extra)
    CheckpointManager(run_dir, keep_last=1).save(
        5, lambda root, tag: (root / tag).mkdir(parents=True), {"config": config.to_dict()}
    )
    return run_dir


def test_crate_export_refuses_an_out_directory_that_is_not_an_export(tmp_path):
    run = fake_run(tmp_path / "run")
    out = user_files(tmp_path / "out")
    with pytest.raises(InputError) as error:
        export_checkpoint(run, out=out)
    assert str(error.value) == f"--out: {out} is not empty and not a crate export; choose another directory"
    assert (out / "notes.txt").read_text() == "mine"
    user_files(run / "hf")  # the default target, the run's hf/, is held to the same rule
    with pytest.raises(InputError, match=f"^{run}: {run / 'hf'} is not empty and not a crate export"):
        export_checkpoint(run)


def test_crate_export_of_a_lora_run_refuses_an_adapter_directory_that_is_not_an_export(tmp_path):
    run = fake_run(tmp_path / "run", model={"init_from": str(tmp_path / "base")}, lora={})
    out = tmp_path / "merged"
    adapter = user_files(adapter_dir_for(out))
    with pytest.raises(InputError, match=f"^--out: {adapter} is not empty and not a crate export"):
        export_checkpoint(run, out=out)
    assert not out.exists() and (adapter / "notes.txt").read_text() == "mine"


def test_a_run_refuses_an_output_dir_that_is_a_file_or_whose_hf_is_not_an_export(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"^output_dir: {tmp_path / 'file'} is a file$"):
        check_output_dir(run_config(tmp_path / "file"))
    run = tmp_path / "run"
    user_files(run / "hf")
    with pytest.raises(ConfigError, match=f"^output_dir: {run / 'hf'} is not empty and not a crate export"):
        check_output_dir(run_config(run))
    check_output_dir(run_config(run, train={"max_steps": 3, "export_at_end": False}))  # nothing to replace
    lora = {"model": {"init_from": str(tmp_path / "base")}, "lora": {}}
    user_files(tmp_path / "lora" / "adapter")
    with pytest.raises(ConfigError, match=f"output_dir: {tmp_path / 'lora' / 'adapter'} is not empty"):
        check_output_dir(run_config(tmp_path / "lora", **lora))
    check_output_dir(run_config(tmp_path / "new"))  # a new directory, or a foreign one: the run adds beside
    check_output_dir(run_config(tmp_path / "lora" / "adapter"))


def test_pretrain_stops_before_any_work_on_an_unusable_output_dir(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "data": DATA, "train": {"max_steps": 3}}))
    with pytest.raises(ConfigError, match="output_dir: must name a directory"):
        pretrain(str(config), ["output_dir="])
    user_files(tmp_path / "run" / "hf")
    with pytest.raises(ConfigError, match="is not empty and not a crate export"):
        pretrain(str(config), [])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["hf"]  # no config.yaml written either


def test_crate_export_of_a_checkpoint_without_a_run_config_is_one_line(tmp_path):
    run = tmp_path / "run"
    CheckpointManager(run, keep_last=1).save(5, lambda root, tag: (root / tag).mkdir(parents=True), {})
    with pytest.raises(CheckpointError, match=r"manifest.json: no run config recorded \(not written by crate\)$"):
        export_checkpoint(run)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs: writes fail even as root, where permissions do not stop them (mounting needs root, as CI
    and the developers' machines have; skipped with the reason otherwise)."""
    import subprocess

    mount = tmp_path / "read-only"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_an_output_dir_that_cannot_be_written_is_one_line_before_any_work(read_only_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"^output_dir: {read_only_dir} is not writable: Read-only file system$"):
        check_output_dir(run_config(read_only_dir))
    inside = read_only_dir / "runs" / "tiny"  # to be created: its nearest existing ancestor must take it
    with pytest.raises(ConfigError, match=f"^output_dir: {inside} \\(in {read_only_dir}\\) is not writable: "):
        check_output_dir(run_config(inside))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"^output_dir: {tmp_path / 'file' / 'run'} cannot be created: .* a file$"):
        check_output_dir(run_config(tmp_path / "file" / "run"))
    from launcher.cli import main  # the command line: exit 2, one line, before any process or file

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"output_dir": str(inside), "data": DATA, "train": {"max_steps": 3}}))
    assert main(["pretrain", str(config), "--nproc-per-node=2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"crate pretrain: error: output_dir: {inside} (in {read_only_dir}) is not writable: Read-only file system"
    ]

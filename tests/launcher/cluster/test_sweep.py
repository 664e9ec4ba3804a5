"""``crate sweep``: grid expansion (labelled and value axes, config swaps, exclusions), validation of every run up
front with one-line errors, the manifest, skipping finished runs, and the job-array script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.cluster.spec import SweepFile, expand
from launcher.cluster.sweep import load_sweep, submit_sweep, write_manifest
from launcher.errors import ConfigError
from tests.crate_cli import REPO

LM = REPO / "configs" / "lm"


def sweep_file(tmp_path: Path, **raw) -> Path:
    body = {
        "name": "grid",
        "output_root": str(tmp_path / "runs"),
        "config": str(LM / "crate-tiny.yaml"),
        "overrides": {"train.max_steps": 5},
        **raw,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_grid_expands_in_axis_order_with_labels_config_swaps_and_exclusions(tmp_path):
    path = sweep_file(
        tmp_path,
        axes={
            "arch": {"crate": {"model.preset": "crate-tiny"}, "gpt2": {"config": str(LM / "gpt2-tiny.yaml")}},
            "size": {"s": {"model.hidden_size": 64}, "m": {"model.hidden_size": 128}},
            "seed": {"train.seed": [0, 1]},
        },
        exclude=[{"arch": "gpt2", "size": "s"}],
    )
    sweep = load_sweep(path)
    assert [run.name for run in sweep.runs] == [
        "crate-s-seed0",
        "crate-s-seed1",
        "crate-m-seed0",
        "crate-m-seed1",
        "gpt2-m-seed0",
        "gpt2-m-seed1",
    ]
    crate, gpt2 = sweep.runs[0], sweep.runs[-1]
    assert crate.labels == {"arch": "crate", "size": "s", "seed": "seed0"}
    assert crate.config_path.endswith("crate-tiny.yaml") and gpt2.config_path.endswith("gpt2-tiny.yaml")
    assert crate.overrides == (
        "train.max_steps=5",
        "model.preset=crate-tiny",
        "model.hidden_size=64",
        "train.seed=0",
        f"output_dir={tmp_path / 'runs' / 'crate-s-seed0'}",
    )

    manifest = json.loads(write_manifest(sweep).read_text())
    assert [run["name"] for run in manifest["runs"]] == [run.name for run in sweep.runs]
    assert manifest["runs"][4]["labels"] == {"arch": "gpt2", "size": "m", "seed": "seed0"}


def test_when_adds_overrides_only_beside_the_named_label(tmp_path):
    path = sweep_file(
        tmp_path,
        axes={
            "arch": {"crate": {}, "gpt2": {"config": str(LM / "gpt2-tiny.yaml")}},
            "size": {"s": {"model.hidden_size": 128, "when": {"gpt2": {"model.hidden_size": 64}}}},
        },
    )
    crate, gpt2 = load_sweep(path).runs
    assert "model.hidden_size=64" not in crate.overrides
    assert gpt2.overrides.index("model.hidden_size=64") > gpt2.overrides.index("model.hidden_size=128")
    from launcher.cluster.sweep import run_config

    assert run_config(gpt2).model.hidden_size == 64 and run_config(crate).model.hidden_size == 128


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"axes": {"size": {"s": {"when": {"nope": {"model.hidden_size": 1}}}}}}, r"when: 'nope' is not a label"),
        (
            {"axes": {"size": {"s": {"model.hidden_size": 0}}}},
            r"run s: .*model.hidden_size: Input should be greater than or equal to 1",
        ),
        ({"axes": {"size": {"s": {"model.not_a_key": 1}}}}, r"run s: .*model.not_a_key: unknown key"),
        ({"axes": {"size": {"s/x": {}}}}, r"axes.size.s/x: a label names a directory"),
        ({"axes": {"size": {"s": {}}}, "exclude": [{"arch": "x"}]}, r"exclude: 'arch' is not an axis"),
        ({"axes": {"size": {"s": {}}}, "exclude": [{"size": "s"}]}, r"exclude leaves no runs"),
        ({"axes": {"seed": {"train.seed": []}}}, r"axes.seed.train.seed: the list of values is empty"),
        ({"axes": {"size": {"s": {}}}, "colour": "red"}, r"colour: unknown key"),
        ({"axes": {"a": {"x": {"config": "nope.yaml"}}}}, r"run x: config .*nope.yaml does not exist"),
        ({"axes": {"size": {"s": {}}}, "slurm": {"nodes": 0}}, r"slurm.nodes: must be >= 1 \(got 0\)"),
    ],
)
def test_every_run_is_validated_up_front_with_one_line_errors(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(sweep_file(tmp_path, **raw))


def test_the_slurm_array_has_one_index_per_run(tmp_path):
    path = sweep_file(
        tmp_path, axes={"seed": {"train.seed": [0, 1, 2]}}, slurm={"procs_per_node": 2, "time": "00:30:00"}
    )
    script = submit_sweep(load_sweep(path), dry_run=True)
    assert "#SBATCH --array=0-2" in script and "#SBATCH --time=00:30:00" in script
    assert "--nproc-per-node=2" in script and "-m launcher.cli pretrain" in script
    for seed in range(3):
        assert str(tmp_path / "runs" / f"seed{seed}" / "config.yaml") in script
    with pytest.raises(ConfigError, match=r"slurm.gpus: unknown key"):
        submit_sweep(load_sweep(sweep_file(tmp_path, axes={"seed": {"train.seed": [0]}}, slurm={"gpus": 1})))


@pytest.mark.parametrize(
    "raw, key, value",
    [
        ({"slurm": {"partition": "gpu\nrm -rf ~"}}, "slurm.partition", "gpu\nrm -rf ~"),
        ({"slurm": {"account": "proj\r"}}, "slurm.account", "proj\r"),
        ({"slurm": {"job_name": "a\nb"}}, "slurm.job_name", "a\nb"),
        ({"slurm": {"array": "%2\nrm -rf ~"}}, "slurm.array", "%2\nrm -rf ~"),
        ({"slurm": {"extra_sbatch": ["--qos=high", "--x=1\nrm -rf ~"]}}, "slurm.extra_sbatch", "--x=1\nrm -rf ~"),
        ({"slurm": {"env": ["A=1\nrm -rf ~"]}}, "slurm.env", "A=1\nrm -rf ~"),
        ({"name": "grid\nrm -rf ~"}, "name", "grid\nrm -rf ~"),
    ],
)
def test_control_characters_in_the_slurm_section_are_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys, raw, key, value
):
    from launcher.cli import main
    from launcher.cluster import submit as submit_module

    calls = []
    monkeypatch.setattr(submit_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(submit_module.subprocess, "run", lambda *args, **kwargs: calls.append(args))
    path = sweep_file(tmp_path, axes={"seed": {"train.seed": [0, 1]}}, **raw)
    assert main(["sweep", str(path), "--slurm"]) == 2
    stderr = capsys.readouterr().err
    assert stderr == f"crate sweep: error: {path}: {key}: must not contain control characters (got {value!r})\n"
    assert not calls and not (tmp_path / "runs").exists()


# tuning files (tune:, crate tune) live beside the sweeps; tests/launcher/cluster/test_tune.py checks them
SWEEPS = [
    path
    for path in sorted([*(REPO / "configs" / "sweeps").glob("*.yaml"), *(REPO / "configs" / "study").glob("*.yaml")])
    if "tune" not in yaml.safe_load(path.read_text()) and "axes" in yaml.safe_load(path.read_text())
]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_expand_and_validate(path):
    sweep = load_sweep(path)
    assert len(sweep.runs) >= 3 and len({run.output_dir for run in sweep.runs}) == len(sweep.runs)
    assert "arch" in sweep.runs[0].labels  # crate compare groups families by it


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_a_sweep_file_serialises_back_to_the_same_grid(path):
    spec = SweepFile.model_validate(yaml.safe_load(path.read_text()))
    again = SweepFile.model_validate(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)))
    assert again == spec and expand(again) == expand(spec)


def test_parts_of_a_local_sweep_share_its_runs_without_overlap(tmp_path, monkeypatch, capsys):
    """crate sweep --part K/N runs every N-th run from the K-th: the parts together are the grid, once."""
    import launcher.cluster.sweep as sweep_module
    from launcher.cli import main

    ran = []
    monkeypatch.setattr(sweep_module, "run_locally", lambda sweep, nproc: ran.append([r.name for r in sweep.runs]) or 0)
    path = sweep_file(tmp_path, axes={"seed": {"train.seed": [0, 1, 2, 3, 4]}})
    assert main(["sweep", str(path), "--part", "1/2"]) == 0 and main(["sweep", str(path), "--part", "2/2"]) == 0
    assert ran == [["seed0", "seed2", "seed4"], ["seed1", "seed3"]]
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--part", "3/2"])
    assert "expected K/N with 1 <= K <= N (1/2), got '3/2'" in capsys.readouterr().err
